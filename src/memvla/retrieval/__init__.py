"""Experience retrieval across episodes: a fixed observation + instruction embedder
(:mod:`~memvla.retrieval.embedder`), the store and its nearest-neighbour search
(:mod:`~memvla.retrieval.store`), what a policy retrieves from it
(:mod:`~memvla.retrieval.source`), and filling it from datasets and rollouts
(:mod:`~memvla.retrieval.record`)."""

from .embedder import ObservationEmbedder
from .record import RolloutRecorder, open_store, rollout_recorder, store_from_dataset
from .source import ExperienceSource
from .store import ExperienceStore

__all__ = ["ExperienceSource", "ExperienceStore", "ObservationEmbedder", "RolloutRecorder",
           "open_store", "rollout_recorder", "store_from_dataset"]
