"""Experience retrieval across episodes: a fixed observation + instruction embedder
(:mod:`~memvla.retrieval.embedder`), the store and its nearest-neighbour search
(:mod:`~memvla.retrieval.store`), and filling it from datasets and rollouts
(:mod:`~memvla.retrieval.record`)."""

from .embedder import ObservationEmbedder
from .record import RolloutRecorder, open_store, rollout_recorder, store_from_dataset
from .store import ExperienceStore

__all__ = ["ExperienceStore", "ObservationEmbedder", "RolloutRecorder", "open_store",
           "rollout_recorder", "store_from_dataset"]
