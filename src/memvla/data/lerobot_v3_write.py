"""Write recorded episodes as a LeRobot v3.0 dataset directory (no torch needed).

Example::

    with LeRobotV3Writer("out/ds", fps=30) as writer:
        writer.add_episode(
            {
                "observation.images.top": images,  # (T, H, W, 3) uint8
                "observation.state": states,  # (T, Ds) float32
                "action": actions,  # (T, Da) float32
            },
            task="pick the red cube",
        )

Frames are stored many episodes per parquet file (a new file is started when one would
grow past ``data_files_size_in_mb``), images as PNG bytes in Hugging Face ``Image``
columns. ``timestamp``, ``frame_index``, ``episode_index``, ``index`` and ``task_index``
are added. Everything is written into a hidden sibling directory and renamed to ``root``
by ``finalize()`` (or on leaving the ``with`` block without an exception), so a crash
never leaves a half-written dataset at ``root``. An existing non-empty ``root`` is only
replaced with ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memvla.data.png import encode_png
from memvla.data.stats import (
    array_stats,
    histogram_stats,
    image_histogram,
    merge_array_stats,
    stats_to_json,
    vector_stats,
)
from memvla.data.v3_format import (
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DATA_FILE_SIZE_IN_MB,
    DEFAULT_FEATURES,
    DEFAULT_VIDEO_FILE_SIZE_IN_MB,
    EPISODES_PATH,
    IMAGE_NAMES,
    IMAGE_TYPE,
    INFO_PATH,
    MAX_ARRAY_DIMS,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
    data_schema,
    is_visual,
    next_chunk_file,
    write_tasks,
)
from memvla.data.video_write import video_feature_info

# buffered frames are written as one parquet row group once either limit is reached
_ROW_GROUP_ROWS = 8192
_ROW_GROUP_BYTES = 32 * 2**20


def infer_features(frames: Mapping[str, Any]) -> dict[str, dict]:
    """LeRobot feature specs from one episode's arrays (each with a leading time axis T).

    uint8 arrays of shape (T, H, W, C) become ``"image"`` features; (T,) and (T, D) arrays
    become scalar (shape [1]) and vector (shape [D]) features, and other arrays (T, D1, ...,
    Dk) with k = 2..5 (a depth map (T, H, W), poses (T, 4, 4)) array features of shape
    [D1, ..., Dk]: float32 for floats, int64 for integers, bool for booleans.
    """
    features = {}
    for key, value in frames.items():
        if key in DEFAULT_FEATURES or key == "task":
            continue
        x = np.asarray(value)
        if x.dtype == np.uint8 and x.ndim == 4:
            features[key] = {"dtype": "image", "shape": list(x.shape[1:]), "names": IMAGE_NAMES}
            continue
        if not 1 <= x.ndim <= MAX_ARRAY_DIMS + 1:
            raise ValueError(f"cannot infer a feature for {key!r} with array shape {x.shape}")
        if x.dtype == np.bool_:
            dtype = "bool"
        elif np.issubdtype(x.dtype, np.integer):
            dtype = "int64"
        elif np.issubdtype(x.dtype, np.floating):
            dtype = "float32"
        else:
            raise ValueError(f"cannot infer a feature for {key!r} with dtype {x.dtype}")
        shape = [1] if x.ndim == 1 else list(x.shape[1:])
        features[key] = {"dtype": dtype, "shape": shape, "names": None}
    return features


def _check_features(features: Mapping[str, dict]) -> dict[str, dict]:
    """User features (without the default ones) + the defaults, shapes as lists."""
    out = {}
    for key, ft in features.items():
        if key in DEFAULT_FEATURES:
            continue
        if "/" in key:
            raise ValueError(f"feature names may not contain '/': {key!r}")
        ft = {"dtype": ft["dtype"], "shape": list(ft["shape"]), "names": ft.get("names")}
        if is_visual(ft):
            if len(ft["shape"]) != 3:
                raise ValueError(f"image feature {key!r} needs shape [H, W, C], got {ft['shape']}")
            ft["names"] = ft["names"] or IMAGE_NAMES
        elif not 1 <= len(ft["shape"]) <= MAX_ARRAY_DIMS:
            raise ValueError(f"feature {key!r}: expected a shape of 1 to {MAX_ARRAY_DIMS} "
                             f"axes, got {ft['shape']}")
        out[key] = ft
    return {**out, **{k: dict(v) for k, v in DEFAULT_FEATURES.items()}}


def _is_array(feature: dict) -> bool:
    """A numeric feature of 2 or more axes (a depth map, a pose), not a vector or scalar."""
    return not is_visual(feature) and len(feature["shape"]) >= 2


class LeRobotV3Writer:
    """Record episodes into a new LeRobot v3.0 dataset at ``root``.

    Args:
        root: the dataset directory to create.
        fps: frames per second (``info.json``'s ``fps``; timestamps are frame_index / fps).
        features: LeRobot feature specs ``{key: {"dtype", "shape", "names"}}`` for the
            recorded keys (images: dtype "image", shape [H, W, C]). None: inferred from the
            first episode (see ``infer_features``).
        robot_type: stored in ``info.json``.
        overwrite: replace an existing non-empty ``root`` (else FileExistsError).
        data_files_size_in_mb: start a new data file when one would grow past this.
        chunks_size: data files per ``chunk-XXX`` directory.
        png_level: zlib level of the PNG images (1 = fast, 9 = small).
        video: store camera features as MP4 videos (``dtype: video``, see
            :mod:`memvla.data.video_write`) instead of PNG columns.
        video_codec, pix_fmt: the videos' codec ("auto": AV1 where available, else H.264)
            and pixel format ("yuv420p" as LeRobot; "yuv444p" keeps small images' colours).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        fps: int,
        features: Mapping[str, dict] | None = None,
        robot_type: str | None = None,
        overwrite: bool = False,
        data_files_size_in_mb: float = DEFAULT_DATA_FILE_SIZE_IN_MB,
        chunks_size: int = DEFAULT_CHUNK_SIZE,
        png_level: int = 1,
        video: bool = False,
        video_codec: str = "auto",
        pix_fmt: str = "yuv420p",
    ):
        self.root = Path(root)
        self.overwrite = overwrite
        self._check_target()
        self.fps = int(fps)
        self.robot_type = robot_type
        self.data_files_size_in_mb = data_files_size_in_mb
        self.chunks_size = int(chunks_size)
        self.png_level = png_level
        self.features: dict[str, dict] | None = None
        self._schema: pa.Schema | None = None
        self._tmp = self.root.parent / f".{self.root.name}.tmp-{uuid.uuid4().hex[:12]}"
        self._videos, self._video_keys = None, []
        if video:
            from memvla.data.video_write import VideoFiles

            self._videos = VideoFiles(self._tmp, self.fps, video_codec, pix_fmt,
                                      DEFAULT_VIDEO_FILE_SIZE_IN_MB, self.chunks_size)
        if features is not None:
            self._set_features(features)
        self._tmp.mkdir(parents=True)
        self._tasks: dict[str, int] = {}
        self._episodes: list[dict] = []
        self._numeric: dict[str, list[np.ndarray]] = {}
        self._image_hist: dict[str, np.ndarray] = {}
        self._array_stats: dict[str, list[dict[str, np.ndarray]]] = {}
        self._total_frames = 0
        self._writer: pq.ParquetWriter | None = None
        self._chunk, self._file, self._file_bytes = 0, 0, 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = self._pending_bytes = 0
        self._done = False

    # -- public API -------------------------------------------------------------------
    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def num_frames(self) -> int:
        return self._total_frames

    def add_episode(
        self,
        frames: Mapping[str, Any],
        task: str | Sequence[str],
        extra: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one episode and return its episode_index.

        Args:
            frames: ``{key: array (T, ...)}`` for every feature (images uint8 (T, H, W, C));
                an optional ``"timestamp"`` (T,) replaces frame_index / fps.
            task: the task string of the episode, or one string per frame.
            extra: scalar values stored as extra columns of the episodes parquet (e.g. the
                seed); every episode should give the same keys.
        """
        if self._done:
            raise RuntimeError("this writer is finalized")
        if self.features is None:
            self._set_features(infer_features(frames))
        arrays = self._check_episode(frames)
        length = len(next(iter(arrays.values())))
        tasks = [task] * length if isinstance(task, str) else list(task)
        if len(tasks) != length:
            raise ValueError(f"got {len(tasks)} task strings for an episode of {length} frames")
        for t in tasks:
            self._tasks.setdefault(t, len(self._tasks))
        episode_index, start = len(self._episodes), self._total_frames
        timestamps = frames.get("timestamp")
        arrays["timestamp"] = (
            np.arange(length, dtype=np.float32) / self.fps
            if timestamps is None
            else np.asarray(timestamps, dtype=np.float32).reshape(length)
        )
        arrays["frame_index"] = np.arange(length, dtype=np.int64)
        arrays["episode_index"] = np.full(length, episode_index, dtype=np.int64)
        arrays["index"] = np.arange(start, start + length, dtype=np.int64)
        arrays["task_index"] = np.array([self._tasks[t] for t in tasks], dtype=np.int64)

        batch, ep_stats = self._episode_batch(arrays, length)
        self._store_batch(batch)
        videos = {}
        for key in self._video_keys:  # not in the parquet: the frames go to the videos
            ep_stats[key] = self._image_stats(key, arrays[key])
            videos.update(self._videos.add(key, arrays[key]))
        row = {
            "episode_index": episode_index,
            "tasks": list(dict.fromkeys(tasks)),
            "length": length,
            "data/chunk_index": self._chunk,
            "data/file_index": self._file,
            "dataset_from_index": start,
            "dataset_to_index": start + length,
            **videos,
        }
        for key, ft_stats in ep_stats.items():
            for name, value in ft_stats.items():
                row[f"stats/{key}/{name}"] = np.asarray(value).tolist()
        row["meta/episodes/chunk_index"] = 0
        row["meta/episodes/file_index"] = 0
        row.update(extra or {})
        self._episodes.append(row)
        self._total_frames += length
        return episode_index

    def finalize(self, extra_info: Mapping[str, Any] | None = None) -> dict:
        """Write the metadata, move the dataset to ``root`` and return its ``info.json``.

        ``extra_info`` adds entries to ``info.json`` (LeRobot ignores unknown keys).
        """
        if self._done:
            raise RuntimeError("this writer is already finalized")
        if not self._episodes:
            self.abort()
            raise ValueError(f"no episodes were recorded for {self.root}")
        self._flush(close=True)
        if self._videos is not None:
            self._videos.close()
        (self._tmp / "meta").mkdir(exist_ok=True)
        write_tasks(self._tmp / TASKS_PATH, list(self._tasks))
        self._write_episodes()
        self._write_json(STATS_PATH, stats_to_json(self._global_stats()))
        info = {**self._info(), **(extra_info or {})}
        self._write_json(INFO_PATH, info)
        self._check_target()
        old = None
        if self.root.exists():
            if any(self.root.iterdir()):
                old = self.root.parent / f".{self.root.name}.old-{uuid.uuid4().hex[:12]}"
                os.replace(self.root, old)
            else:
                self.root.rmdir()
        os.replace(self._tmp, self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return info

    def abort(self) -> None:
        """Drop everything recorded so far (``root`` is left untouched)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._videos is not None:
            self._videos.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._done = True

    def __enter__(self) -> LeRobotV3Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    # -- internals --------------------------------------------------------------------
    def _check_target(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory")
        if root.is_dir() and any(root.iterdir()) and not self.overwrite:
            raise FileExistsError(f"{root} exists and is not empty (use overwrite=True)")

    def _set_features(self, features: Mapping[str, dict]) -> None:
        features = _check_features(features)
        if self._videos is not None:  # every camera as a video, described as written
            v = self._videos
            features = {k: {**ft, "dtype": "video", "info": video_feature_info(
                ft["shape"], self.fps, v.codec, v.pix_fmt)} if is_visual(ft) else ft
                for k, ft in features.items()}
        videos = [k for k, ft in features.items() if ft["dtype"] == "video"]
        if videos and self._videos is None:
            raise ValueError(f"features {videos} are videos: make the writer with video=True")
        self.features = features
        self._video_keys = videos
        self._schema = data_schema(self.features)

    def _check_episode(self, frames: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The recorded arrays, cast to the feature dtypes, after checking keys and shapes."""
        recorded = {k: ft for k, ft in self.features.items() if k not in DEFAULT_FEATURES}
        unknown = set(frames) - set(recorded) - {"timestamp", "task"}
        missing = set(recorded) - set(frames)
        if unknown or missing:
            raise ValueError(
                f"episode keys do not match the features: missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        arrays, length = {}, None
        for key, ft in recorded.items():
            camera = is_visual(ft)
            dtype = np.uint8 if camera else np.dtype(ft["dtype"])
            x = np.asarray(frames[key])
            if camera and x.dtype != np.uint8:
                raise ValueError(f"{key!r}: images must be uint8, got {x.dtype}")
            x = x.astype(dtype, copy=False)
            shape = tuple(ft["shape"])
            if x.ndim == 1 and shape == (1,):
                x = x[:, None]
            if x.shape[1:] != shape:
                raise ValueError(f"{key!r}: expected frames of shape {shape}, got {x.shape[1:]}")
            if length is None:
                length = len(x)
            if len(x) != length or length == 0:
                raise ValueError(f"{key!r}: {len(x)} frames, expected {length} (and at least 1)")
            arrays[key] = x
        return arrays

    def _episode_batch(self, arrays: dict[str, np.ndarray], length: int):
        """Arrow record batch of one episode (built column by column) and its statistics."""
        columns, ep_stats, numeric = [], {}, {}
        for key in self._schema.names:
            ft, x = self.features[key], arrays[key]
            if ft["dtype"] == "image":
                encoded = pa.array([encode_png(im, self.png_level) for im in x], pa.binary())
                column = pa.StructArray.from_arrays(
                    [encoded, pa.nulls(length, pa.string())], fields=list(IMAGE_TYPE)
                )
                ep_stats[key] = self._image_stats(key, x)
            else:
                column = pa.array(np.ascontiguousarray(x).reshape(-1))
                if tuple(ft["shape"]) != (1,):
                    for size in reversed(ft["shape"]):  # nested fixed-size lists
                        column = pa.FixedSizeListArray.from_arrays(column, size)
                if _is_array(ft):  # statistics over all the elements, kept per episode
                    ep_stats[key] = array_stats(x)
                    self._array_stats.setdefault(key, []).append(ep_stats[key])
                else:  # statistics per entry
                    numeric[key] = x.reshape(length, -1)  # (T, D)
                    self._numeric.setdefault(key, []).append(numeric[key])
            columns.append(column)
        # statistics of all vector features at once (one quantile call), split per feature
        if not numeric:
            return pa.RecordBatch.from_arrays(columns, schema=self._schema), ep_stats
        joint = vector_stats(np.concatenate(list(numeric.values()), axis=1))  # (T, sum D)
        offset = 0
        for key, x in numeric.items():
            cut = slice(offset, offset + x.shape[1])
            ep_stats[key] = {k: v if k == "count" else v[cut] for k, v in joint.items()}
            offset += x.shape[1]
        return pa.RecordBatch.from_arrays(columns, schema=self._schema), ep_stats

    def _image_stats(self, key: str, images: np.ndarray) -> dict[str, np.ndarray]:
        """An episode's statistics of camera ``key`` (T, H, W, C), its histogram added to
        the dataset's."""
        hist = image_histogram(images)  # (C, 256)
        self._image_hist[key] = self._image_hist.get(key, 0) + hist
        return histogram_stats(hist, len(images))

    def _store_batch(self, batch: pa.RecordBatch) -> None:
        """Queue an episode's rows, starting a new data file when this one would be too big."""
        limit = self.data_files_size_in_mb * 2**20
        if self._file_bytes > 0 and self._file_bytes + batch.nbytes > limit:
            self._flush(close=True)
            self._chunk, self._file = next_chunk_file(self._chunk, self._file, self.chunks_size)
            self._file_bytes = 0
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._pending_bytes += batch.nbytes
        self._file_bytes += batch.nbytes
        if self._pending_rows >= _ROW_GROUP_ROWS or self._pending_bytes >= _ROW_GROUP_BYTES:
            self._flush(close=False)

    def _flush(self, close: bool) -> None:
        if self._pending:
            if self._writer is None:
                path = self._tmp / DATA_PATH.format(chunk_index=self._chunk, file_index=self._file)
                path.parent.mkdir(parents=True, exist_ok=True)
                plain = [k for k in self._schema.names if self.features[k]["dtype"] != "image"]
                self._writer = pq.ParquetWriter(path, self._schema, use_dictionary=plain)
            self._writer.write_table(pa.Table.from_batches(self._pending, schema=self._schema))
            self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        if close and self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_episodes(self) -> None:
        keys = list(dict.fromkeys(k for row in self._episodes for k in row))
        table = pa.table({k: [row.get(k) for row in self._episodes] for k in keys})
        path = self._tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)

    def _global_stats(self) -> dict[str, dict[str, np.ndarray]]:
        stats = {}
        for key in self.features:
            if key in self._image_hist:
                stats[key] = histogram_stats(self._image_hist[key], self._total_frames)
            elif key in self._array_stats:
                stats[key] = merge_array_stats(self._array_stats[key])
            else:
                stats[key] = vector_stats(np.concatenate(self._numeric[key]))
        return stats

    def _info(self) -> dict:
        return {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(self._episodes),
            "total_frames": self._total_frames,
            "total_tasks": len(self._tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_files_size_in_mb,
            "video_files_size_in_mb": DEFAULT_VIDEO_FILE_SIZE_IN_MB,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self._episodes)}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self._video_keys else None,
            "features": self.features,
        }

    def _write_json(self, rel_path: str, obj: Any) -> None:
        path = self._tmp / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=4) + "\n")
