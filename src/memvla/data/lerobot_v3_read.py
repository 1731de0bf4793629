"""Read LeRobot v3.0 datasets from a local directory (no hub access).

``LeRobotV3Dataset(root)`` opens datasets written by ``memvla datagen`` and by LeRobot
itself: it follows ``meta/info.json`` (feature dtypes and shapes, the ``data_path``
template) and ``meta/episodes/*/*.parquet`` (which data file holds which episode), so any
number of data chunks and files works. Image features stored as parquet image columns
(``{bytes: PNG, path}``) are decoded with ``memvla.data.png``; features stored as videos
(``videos/<key>/chunk-XXX/file-XXX.mp4``) need PyAV (without it a NotImplementedError
names them): with ``image_cache=True`` a whole file is decoded at a time and kept, with
``image_cache=False`` the wanted frames are decoded by seeking and nothing is kept
(memory bounded whatever the dataset's size).

Samples look like LeRobot's: ``ds[i]`` is a dict of torch tensors, one per feature, with
images as float32 (C, H, W) in [0, 1], scalars as 0-d tensors, plus ``task`` (str). With
``delta_indices`` (or ``delta_timestamps``) a feature becomes a stack over those frame
offsets, clamped to the episode, plus a ``<key>_is_pad`` bool mask::

    ds = LeRobotV3Dataset(root, delta_indices={"observation.images.top": [-1, 0],
                                               "action": list(range(8))})
    ds[i]["observation.images.top"]  # (2, C, H, W); [-1] repeats frame 0 at an episode start
    ds[i]["action"]                  # (8, Da); steps past the end repeat the last action
    ds[i]["action_is_pad"]           # (8,) bool, True where clamped

Memory: every non-image column is loaded into numpy arrays at once. Images stay PNG bytes
until first used; with ``image_cache=True`` (default) each frame is decoded once and kept
as uint8 (N, H, W, C) in memory (so the first epoch decodes and later ones do not; 4,000
episodes of 50 frames at 64x64x3 take 2.5 GB). ``image_cache=False`` decodes on every
access (videos by seeking). ``preload_images()`` decodes everything up front.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from memvla.data.png import decode_png
from memvla.data.stats import load_stats
from memvla.data.v3_format import (
    DEFAULT_FEATURES,
    EPISODES_DIR,
    read_info,
    read_table,
    read_tasks,
)
from memvla.data.video import VideoSeeker, decode_video_frames, require_av

_CAMERA = ("image", "video")
_VIDEO_COLUMNS = ["chunk_index", "file_index", "from_timestamp"]
_EPISODE_COLUMNS = [
    "episode_index",
    "length",
    "dataset_from_index",
    "dataset_to_index",
    "data/chunk_index",
    "data/file_index",
]


def _column_numpy(column: pa.ChunkedArray, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A numeric (fixed-size) list or plain column -> (N,) for shape (1,), else (N, *shape)."""
    array = column.combine_chunks()
    n = len(array)
    while (
        pa.types.is_list(array.type)
        or pa.types.is_fixed_size_list(array.type)
        or (pa.types.is_large_list(array.type))
    ):
        array = array.flatten()
    values = array.to_numpy(zero_copy_only=False).astype(np.dtype(dtype), copy=False)
    if values.size != n * int(np.prod(shape)):
        raise ValueError(f"expected {n} values of shape {shape}, got {values.size} numbers")
    return values.reshape(n) if tuple(shape) == (1,) else values.reshape(n, *shape)


IMAGE_FORMATS = ("float", "uint8")


def to_tensor(x: np.ndarray, image: bool, images_as: str = "float") -> torch.Tensor:
    """numpy -> torch; uint8 images (..., H, W, C) -> float32 (..., C, H, W) in [0, 1]
    (``images_as="float"``, LeRobot's layout) or kept as they are (``"uint8"``: a quarter
    of the bytes to collate and move to the device; memvla policies take both)."""
    if image and images_as == "uint8":
        return torch.from_numpy(np.ascontiguousarray(x))  # (..., H, W, C) uint8
    if image:
        chw = np.ascontiguousarray(np.moveaxis(x, -1, -3))  # (..., C, H, W)
        return torch.from_numpy(chw).float().div_(255.0)
    return torch.from_numpy(x if x.flags.c_contiguous else x.copy())


class LeRobotV3Dataset(torch.utils.data.Dataset):
    """A local LeRobot v3.0 dataset: frames as dicts of tensors (see the module doc).

    Args:
        root: the dataset directory (the one holding ``meta/info.json``).
        delta_indices: ``{feature: [frame offsets]}`` to stack around each frame.
        delta_timestamps: the same in seconds (multiples of 1/fps), as in LeRobot.
        episodes: load only these episode indices (default: all).
        image_cache: keep decoded images in memory (see the module doc).
        images_as: "float" (default, LeRobot's): images as float32 (C, H, W) in [0, 1];
            "uint8": as stored, uint8 (H, W, C), converted later on the model's device.

    Raises FileNotFoundError or ValueError naming the file when a file is missing or
    corrupt, or when ``root`` is not a v3.0 dataset.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        delta_indices: dict[str, Sequence[int]] | None = None,
        delta_timestamps: dict[str, Sequence[float]] | None = None,
        episodes: Sequence[int] | None = None,
        image_cache: bool = True,
        images_as: str = "float",
    ):
        if images_as not in IMAGE_FORMATS:
            raise ValueError(f"images_as must be one of {IMAGE_FORMATS}, got {images_as!r}")
        self.images_as = images_as
        self.root = Path(root)
        self.info = read_info(self.root)
        self.fps = self.info["fps"]
        self.features: dict[str, dict] = self.info["features"]
        self.video_keys = [k for k, ft in self.features.items() if ft["dtype"] == "video"]
        if self.video_keys:
            require_av(self.video_keys)
        # every camera, whether stored as image columns or as videos
        self.image_keys = [k for k, ft in self.features.items() if ft["dtype"] in _CAMERA]
        self.tasks = read_tasks(self.root)
        self._load_episodes(episodes)
        self._load_data()
        self._locate_video_frames()
        self.image_cache = image_cache
        self._seeker = VideoSeeker()
        self._cache: dict[str, np.ndarray] = {}
        self._cached: dict[str, np.ndarray] = {}
        self.delta_indices = self._check_deltas(delta_indices, delta_timestamps)

    # -- loading ----------------------------------------------------------------------
    def _load_episodes(self, episodes: Sequence[int] | None) -> None:
        directory = self.root / EPISODES_DIR
        paths = sorted(directory.glob("*/*.parquet"))
        if not paths:
            raise FileNotFoundError(f"missing episodes metadata: no parquet file in {directory}")
        columns = _EPISODE_COLUMNS + [
            f"videos/{k}/{c}" for k in self.video_keys for c in _VIDEO_COLUMNS
        ]
        tables = [read_table(p, "episodes file", columns=columns) for p in paths]
        meta = pa.concat_tables(tables)
        cols = {c: meta.column(c).to_numpy() for c in columns}
        cols.update({c: cols[c].astype(np.int64) for c in _EPISODE_COLUMNS})
        order = np.argsort(cols["episode_index"], kind="stable")
        cols = {c: v[order] for c, v in cols.items()}
        if episodes is not None:
            wanted = np.unique(np.asarray(episodes, dtype=np.int64))
            unknown = np.setdiff1d(wanted, cols["episode_index"])
            if unknown.size:
                raise ValueError(f"{self.root}: no episodes {unknown.tolist()} in this dataset")
            keep = np.isin(cols["episode_index"], wanted)
            cols = {c: v[keep] for c, v in cols.items()}
        self._meta_paths = paths
        self.episode_index = cols["episode_index"]  # (E,) episode indices in the dataset
        self.episode_lengths = cols["length"]  # (E,)
        self._files = cols["data/chunk_index"], cols["data/file_index"]
        self._video_meta = {c: v for c, v in cols.items() if c.startswith("videos/")}

    def _load_data(self) -> None:
        keys = [k for k, ft in self.features.items() if ft["dtype"] != "video"]
        pairs = sorted(set(zip(*(f.tolist() for f in self._files), strict=True)))
        paths = [
            self.root / self.info["data_path"].format(chunk_index=c, file_index=f) for c, f in pairs
        ]
        tables = [read_table(p, "data file", columns=keys) for p in paths]
        table = pa.concat_tables(tables, promote_options="default")
        where = ", ".join(str(p) for p in paths)

        ep = table.column("episode_index").to_numpy().astype(np.int64)
        if "frame_index" in table.column_names:
            frame = table.column("frame_index").to_numpy().astype(np.int64)
        else:
            frame = np.zeros_like(ep)
        rows = np.nonzero(np.isin(ep, self.episode_index))[0]
        order = rows[np.lexsort((frame[rows], ep[rows]))]  # rows grouped by episode, in order
        counts = np.bincount(
            np.searchsorted(self.episode_index, ep[order]), minlength=len(self.episode_index)
        )
        bad = np.nonzero(counts != self.episode_lengths)[0]
        if bad.size:
            e = bad[0]
            raise ValueError(
                f"{where}: episode {self.episode_index[e]} has {counts[e]} frames, but the "
                f"episodes metadata ({self._meta_paths[0].parent}) says {self.episode_lengths[e]}"
            )
        self.episode_starts = np.concatenate([[0], np.cumsum(self.episode_lengths)[:-1]])  # (E,)
        expected = np.arange(len(order)) - np.repeat(self.episode_starts, self.episode_lengths)
        if "frame_index" in table.column_names and not np.array_equal(frame[order], expected):
            raise ValueError(f"{where}: frame_index is not 0, 1, 2, ... within each episode")
        if not np.array_equal(order, np.arange(len(table))):
            table = table.take(pa.array(order))
        self.frame_episode = np.repeat(np.arange(len(self.episode_index)), self.episode_lengths)

        self._arrays: dict[str, np.ndarray | list] = {}
        self._png: dict[str, pa.ChunkedArray] = {}
        for key in keys:
            ft, column = self.features[key], table.column(key)
            try:
                if ft["dtype"] == "image":
                    self._png[key] = column  # kept chunked: one binary array holds < 2 GiB
                elif ft["dtype"] == "string":
                    self._arrays[key] = column.to_pylist()
                else:
                    self._arrays[key] = _column_numpy(column, tuple(ft["shape"]), ft["dtype"])
            except (pa.ArrowException, ValueError, TypeError) as e:
                raise ValueError(f"{where}: cannot read feature {key!r}: {e}") from e

    def _locate_video_frames(self) -> None:
        """For every video feature: which file holds each frame, and at what time."""
        self._video_file: dict[str, np.ndarray] = {}
        self._video_time: dict[str, np.ndarray] = {}
        self._video_paths: dict[str, list[Path]] = {}
        ep = self.frame_episode
        for key in self.video_keys:
            meta = {c: self._video_meta[f"videos/{key}/{c}"] for c in _VIDEO_COLUMNS}
            pairs = np.stack([meta["chunk_index"], meta["file_index"]], axis=1).astype(np.int64)
            files, episode_file = np.unique(pairs, axis=0, return_inverse=True)
            template = self.info["video_path"]
            self._video_paths[key] = [
                self.root / template.format(video_key=key, chunk_index=c, file_index=f)
                for c, f in files.tolist()
            ]
            self._video_file[key] = episode_file.reshape(-1)[ep]  # (N,)
            from_time = meta["from_timestamp"].astype(np.float64)[ep]
            self._video_time[key] = from_time + self._arrays["timestamp"]  # (N,) seconds

    def _check_deltas(self, delta_indices, delta_timestamps) -> dict[str, np.ndarray]:
        deltas = dict(delta_indices or {})
        for key, seconds in (delta_timestamps or {}).items():
            steps = np.asarray(seconds, dtype=np.float64) * self.fps
            if np.any(np.abs(steps - np.round(steps)) > 1e-4 * self.fps):
                raise ValueError(f"delta_timestamps[{key!r}] are not multiples of 1/{self.fps} s")
            deltas[key] = np.round(steps).astype(np.int64).tolist()
        for key in deltas:
            if key not in self.features:
                raise ValueError(f"delta key {key!r} is not a feature: {sorted(self.features)}")
        return {k: np.asarray(v, dtype=np.int64) for k, v in deltas.items()}

    # -- access -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frame_episode)

    @property
    def num_frames(self) -> int:
        return len(self.frame_episode)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_index)

    @property
    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Normalisation statistics from ``meta/stats.json`` (see ``load_stats``)."""
        return load_stats(self.root)

    def episode_range(self, episode: int) -> tuple[int, int]:
        """Frames [start, end) of the ``episode``-th loaded episode (0-based, not episode_index)."""
        start = int(self.episode_starts[episode])
        return start, start + int(self.episode_lengths[episode])

    def task_at(self, frame: int) -> str:
        return self.tasks[int(self._arrays["task_index"][frame])]

    def get_numpy(self, key: str, frames: np.ndarray) -> np.ndarray:
        """Raw values of ``key`` at frame positions ``frames`` (any shape F...).

        Returns (F..., *shape) in the stored dtype, images as uint8 (F..., H, W, C); scalar
        features have no trailing axis.
        """
        frames = np.asarray(frames, dtype=np.int64)
        flat = frames.reshape(-1)
        # (n, *shape); images (n, H, W, C) uint8
        values = self._images(key, flat) if key in self.image_keys else self._arrays[key][flat]
        return values.reshape((*frames.shape, *values.shape[1:]))

    def preload_images(self) -> None:
        """Decode every image now (needs ``image_cache=True`` to be of any use)."""
        for key in self._png:
            self._images(key, np.arange(len(self)))

    def _decode(self, key: str, frame: int) -> np.ndarray:
        item = self._png[key][frame]
        data = item["bytes"].as_py()
        if data is None:  # an image file referenced by path (not embedded)
            path = item["path"].as_py()
            if path is None:
                raise ValueError(f"{self.root}: image {key!r} of frame {frame} is empty")
            full = Path(path) if Path(path).is_absolute() else self.root / path
            if not full.is_file():
                raise FileNotFoundError(f"missing image file {full}")
            data = full.read_bytes()
        try:
            image = decode_png(data)  # (H, W, C)
        except (OSError, ValueError, zlib.error) as e:
            raise ValueError(f"{self.root}: corrupt image {key!r} of frame {frame}: {e}") from e
        shape = tuple(self.features[key]["shape"])
        if image.shape != shape:
            if image.shape[:2] == shape[:2] and image.shape[2] == 1 and shape[2] == 3:
                image = np.repeat(image, 3, axis=2)
            else:
                raise ValueError(
                    f"{self.root}: image {key!r} of frame {frame} has shape {image.shape}, "
                    f"info.json says {shape}"
                )
        return image

    def _images(self, key: str, flat: np.ndarray) -> np.ndarray:
        if not self.image_cache and key not in self.video_keys:
            return np.stack([self._decode(key, int(i)) for i in flat])  # (n, H, W, C)
        if not self.image_cache:  # videos by seeking: nothing kept
            out = np.empty((len(flat), *self.features[key]["shape"]), np.uint8)  # (n, H, W, C)
            files = self._video_file[key][flat]  # (n,)
            for f in np.unique(files):
                rows = np.nonzero(files == f)[0]
                try:
                    out[rows] = self._seeker.frames(self._video_paths[key][f],
                                                    self._video_time[key][flat[rows]], self.fps)
                except ValueError as e:
                    episodes = sorted(set(self.frame_episode[flat[rows]].tolist()))
                    raise ValueError(f"{e} (frames of episodes {episodes[:8]} of {key})") from e
            return out
        if key not in self._cache:
            self._cache[key] = np.empty((len(self), *self.features[key]["shape"]), np.uint8)
            self._cached[key] = np.zeros(len(self), dtype=bool)
        cache, done = self._cache[key], self._cached[key]
        if key in self.video_keys:  # decode whole video files (videos are always cached)
            for f in np.unique(self._video_file[key][flat[~done[flat]]]):
                rows = np.nonzero(self._video_file[key] == f)[0]
                path = self._video_paths[key][f]
                cache[rows] = decode_video_frames(path, self._video_time[key][rows], self.fps)
                done[rows] = True
        for i in np.unique(flat[~done[flat]]):
            cache[i] = self._decode(key, int(i))
            done[i] = True
        return cache[flat]  # (n, H, W, C)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} out of range for {len(self)} frames")
        start, end = self.episode_range(int(self.frame_episode[index]))
        item = {}
        for key, ft in self.features.items():
            image = key in self.image_keys
            if ft["dtype"] == "string":
                item[key] = self._arrays[key][index]
            elif key in self.delta_indices:
                wanted = index + self.delta_indices[key]  # (K,)
                item[key] = to_tensor(self.get_numpy(key, np.clip(wanted, start, end - 1)), image,
                                      self.images_as)
                item[f"{key}_is_pad"] = torch.from_numpy((wanted < start) | (wanted >= end))
            else:
                item[key] = to_tensor(self.get_numpy(key, np.array(index)), image,
                                      self.images_as)
        item["task"] = self.task_at(index)
        return item

    def __repr__(self) -> str:
        keys = [k for k in self.features if k not in DEFAULT_FEATURES]
        return (
            f"LeRobotV3Dataset({str(self.root)!r}, episodes={self.num_episodes}, "
            f"frames={self.num_frames}, fps={self.fps}, features={keys})"
        )
