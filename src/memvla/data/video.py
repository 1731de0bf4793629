"""Decode the frames of LeRobot video features (``videos/<key>/chunk-XXX/file-XXX.mp4``).

Optional: needs PyAV (``pip install av``). A LeRobot v3.0 video file holds many episodes
one after the other; episode e starts at ``videos/<key>/from_timestamp`` seconds, and its
frame with dataset ``timestamp`` t is the video frame at ``from_timestamp + t``.
"""

from __future__ import annotations

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
    if out is None or not found.all():
        missing = times[~found]
        raise ValueError(f"video file {path} has no frames at {missing[:5].tolist()} s")
    return out
