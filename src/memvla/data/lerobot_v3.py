"""LeRobot v3.0 datasets on disk: the public API in one place.

- ``LeRobotV3Writer`` (``memvla.data.lerobot_v3_write``): record episodes into a new
  dataset directory; needs only numpy and pyarrow (no torch).
- ``LeRobotV3Dataset`` (``memvla.data.lerobot_v3_read``): frames with observation history
  and action chunks (``delta_indices``, ``<key>_is_pad``), like LeRobot's dataset; images
  from PNG columns, or from mp4 videos with the optional PyAV.
- ``EpisodeSegmentLoader`` / ``SegmentBatch`` (``memvla.data.segments``): whole episodes
  cut into chunk-aligned segments, batched with padding masks, for recurrent training.
- ``load_stats`` (``memvla.data.stats``): ``meta/stats.json`` as tensors.
- ``read_info`` / ``read_tasks`` (``memvla.data.v3_format``): the metadata files, checked.

The layout itself is described in ``memvla.data.v3_format``.
"""

from memvla.data.lerobot_v3_read import LeRobotV3Dataset
from memvla.data.lerobot_v3_write import LeRobotV3Writer, infer_features
from memvla.data.segments import EpisodeSegmentLoader, SegmentBatch
from memvla.data.stats import load_stats
from memvla.data.v3_format import CODEBASE_VERSION, read_info, read_tasks

__all__ = [
    "CODEBASE_VERSION",
    "EpisodeSegmentLoader",
    "LeRobotV3Dataset",
    "LeRobotV3Writer",
    "SegmentBatch",
    "infer_features",
    "load_stats",
    "read_info",
    "read_tasks",
]
