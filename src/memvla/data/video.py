"""Decode the frames of LeRobot video features (``videos/<key>/chunk-XXX/file-XXX.mp4``).

Needs PyAV (in the ``sim`` extra). :func:`decode_video_frames` decodes a file front to back
(what a dataset that fits in memory caches); :class:`VideoSeeker` seeks, for datasets that do
not. A LeRobot v3.0 video file holds many episodes
one after the other; episode e starts at ``videos/<key>/from_timestamp`` seconds, and its
frame with dataset ``timestamp`` t is the video frame at ``from_timestamp + t``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np


def require_av(keys: list[str]):
    """The ``av`` module, or a NotImplementedError naming the video features."""
    try:
        import av
    except ImportError as e:
        raise NotImplementedError(
            f"features {keys} are stored as videos (videos/<key>/...mp4); decoding them needs "
            "PyAV: pip install av"
        ) from e
    return av


def decode_video_frames(path: Path, times: np.ndarray, fps: float) -> np.ndarray:
    """The frames of the video at ``path`` shown at ``times`` (n,) seconds, uint8 (n, H, W, 3).

    The file is decoded once, front to back, keeping only the wanted frames. Raises
    FileNotFoundError or ValueError naming the file when it is missing or unreadable, or
    when no frame lies within a quarter of a frame period of a wanted time.
    """
    av = require_av([path.parent.parent.name])
    if not path.is_file():
        raise FileNotFoundError(f"missing video file {path}")
    times = np.asarray(times, dtype=np.float64)
    tolerance = 0.25 / fps
    wanted: dict[int, list[int]] = {}  # video frame number -> positions in ``times``
    for i, k in enumerate(np.round(times * fps).astype(np.int64).tolist()):
        wanted.setdefault(k, []).append(i)
    out: np.ndarray | None = None
    found = np.zeros(len(times), dtype=bool)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                rows = [i for i in wanted.get(round(t * fps), []) if abs(times[i] - t) < tolerance]
                if not rows:
                    continue
                image = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                if out is None:
                    out = np.zeros((len(times), *image.shape), dtype=np.uint8)  # (n, H, W, 3)
                out[rows] = image
                found[rows] = True
    except av.error.FFmpegError as e:
        raise ValueError(f"corrupt video file {path}: {e}") from e
    return _all_found(path, out, found, times)


def _all_found(path: Path, out: np.ndarray | None, found: np.ndarray, times: np.ndarray
               ) -> np.ndarray:
    """``out``, once every wanted time has its frame; else the error naming the times."""
    if out is None or not found.all():
        missing = times[~found]
        raise ValueError(f"video file {path} has no frames at {missing[:5].tolist()} s")
    return out


class VideoSeeker:
    """Frames of video files at given times, decoded by seeking: memory bounded whatever the
    dataset's size (at most ``max_open`` files open; no frame kept after it is returned),
    for datasets too large to decode into memory.

    For each file the wanted times are read in increasing order: a time within
    ``ahead`` seconds after the last frame decoded is reached by decoding on, any other by
    seeking to the keyframe before it (so the consecutive frames of an episode segment cost
    one seek). Safe across ``fork``: a process opens its own files."""

    def __init__(self, max_open: int = 4, ahead: float = 1.0):
        self.max_open = max_open
        self.ahead = ahead
        self._pid = os.getpid()
        self._open: OrderedDict[Path, tuple] = OrderedDict()  # path -> (container, stream)

    def __getstate__(self):
        return {"max_open": self.max_open, "ahead": self.ahead}

    def __setstate__(self, state):
        self.__init__(**state)

    @property
    def open_files(self) -> int:
        return len(self._open)

    def _container(self, path: Path):
        if os.getpid() != self._pid:  # a forked worker: never share the parent's files
            self._open, self._pid = OrderedDict(), os.getpid()
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        av = require_av([path.parent.parent.name])
        if not path.is_file():
            raise FileNotFoundError(f"missing video file {path}")
        try:
            container = av.open(str(path))
        except av.error.FFmpegError as e:
            raise ValueError(f"corrupt video file {path}: {e}") from e
        self._open[path] = (container, container.streams.video[0])
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1][0].close()
        return self._open[path]

    def frames(self, path: Path, times: np.ndarray, fps: float) -> np.ndarray:
        """The frames shown at ``times`` (n,) seconds, uint8 (n, H, W, 3); the same errors
        as :func:`decode_video_frames`."""
        av = require_av([path.parent.parent.name])
        container, stream = self._container(path)
        times = np.asarray(times, dtype=np.float64)
        tolerance = 0.25 / fps
        out: np.ndarray | None = None
        found = np.zeros(len(times), dtype=bool)
        frames = None  # the decoding iterator, from the last seek on
        cur, cur_t, cur_img = None, None, None  # the frame decoded last, its time, its pixels
        try:
            for i in np.argsort(times, kind="stable"):
                t = times[i]
                if cur is None or abs(cur_t - t) >= tolerance:  # not the frame decoded last
                    if frames is None or cur_t is None or not cur_t < t <= cur_t + self.ahead:
                        container.seek(max(int((t - tolerance) / stream.time_base), 0),
                                       stream=stream, backward=True, any_frame=False)
                        frames, cur, cur_t = container.decode(stream), None, None
                    for frame in frames:
                        if frame.pts is None:
                            continue
                        cur, cur_t, cur_img = frame, float(frame.pts * stream.time_base), None
                        if cur_t >= t - tolerance:
                            break
                    else:
                        frames = None  # the end of the file
                    if cur is None or abs(cur_t - t) >= tolerance:
                        continue  # no frame at t
                if cur_img is None:
                    cur_img = cur.to_ndarray(format="rgb24")  # (H, W, 3)
                if out is None:
                    out = np.zeros((len(times), *cur_img.shape), dtype=np.uint8)  # (n, H, W, 3)
                out[i], found[i] = cur_img, True
        except av.error.FFmpegError as e:
            raise ValueError(f"corrupt video file {path}: {e}") from e
        return _all_found(path, out, found, times)
