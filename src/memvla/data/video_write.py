"""Write camera features as LeRobot v3.0 videos: ``videos/<key>/chunk-XXX/file-XXX.mp4``,
many episodes per file one after the other (a new file once one passes the size limit),
each episode's place in the episodes table as ``videos/<key>/{chunk_index, file_index,
from_timestamp, to_timestamp}``.

The codec is AV1 (SVT-AV1) where PyAV has it, else H.264, with LeRobot's settings: a
keyframe every 2 frames (``g=2``, so that seeking decodes at most one frame more), quality
``crf=30``, ``yuv420p`` (the chroma at half resolution: small images lose colour detail;
``pix_fmt="yuv444p"`` keeps it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from memvla.data.v3_format import VIDEO_PATH, next_chunk_file
from memvla.data.video import require_av

CODECS = {"av1": "libsvtav1", "h264": "libx264"}


def pick_codec(codec: str = "auto") -> str:
    """``auto``: AV1 where PyAV has SVT-AV1, else H.264; or ``av1`` / ``h264`` -> the name
    LeRobot's ``info.json`` uses (``av1``, ``h264``)."""
    av = require_av(["video"])
    if codec == "auto":
        return "av1" if CODECS["av1"] in av.codecs_available else "h264"
    if codec not in CODECS:
        raise ValueError(f"video codec must be 'auto' or one of {sorted(CODECS)}, got "
                         f"{codec!r}")
    if CODECS[codec] not in av.codecs_available:
        raise ValueError(f"video codec {codec!r}: PyAV here has no {CODECS[codec]} encoder")
    return codec


def video_feature_info(shape: list[int], fps: int, codec: str, pix_fmt: str) -> dict:
    """The ``info`` entry of a video feature in ``info.json`` (as LeRobot writes it)."""
    h, w, c = shape
    return {"video.height": h, "video.width": w, "video.codec": codec,
            "video.pix_fmt": pix_fmt, "video.is_depth_map": False, "video.fps": fps,
            "video.channels": c, "has_audio": False}


class VideoFiles:
    """The open video file of every camera key, and where the next episode goes."""

    def __init__(self, root: Path, fps: int, codec: str = "auto", pix_fmt: str = "yuv420p",
                 file_size_in_mb: float = 500, chunks_size: int = 1000, crf: int = 30,
                 gop: int = 2):
        self.av = require_av(["video"])
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only, not its banner
        self.root, self.fps = Path(root), int(fps)
        self.codec, self.pix_fmt = pick_codec(codec), pix_fmt
        self.limit = file_size_in_mb * 2**20
        self.chunks_size = chunks_size
        self.options = {"crf": str(crf), "g": str(gop)}
        self._open: dict[str, dict] = {}  # key -> container, stream, chunk, file, time, path

    def add(self, key: str, frames: np.ndarray) -> dict:
        """Append one episode's frames (T, H, W, 3) uint8 of ``key`` -> its columns of the
        episodes table."""
        f = self._file(key, frames.shape[1:])
        start = f["time"]
        for image in frames:
            frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            packets = f["stream"].encode(frame)
            f["bytes"] += sum(packet.size for packet in packets)
            f["container"].mux(packets)
        f["time"] += len(frames) / self.fps
        return {f"videos/{key}/chunk_index": f["chunk"], f"videos/{key}/file_index": f["file"],
                f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": f["time"]}

    def close(self) -> None:
        for key in list(self._open):
            self._close(key)

    def _file(self, key: str, shape: tuple) -> dict:
        f = self._open.get(key)
        if f is not None and f["bytes"] > self.limit:  # (the encoded bytes so far)
            chunk, file = next_chunk_file(f["chunk"], f["file"], self.chunks_size)
            self._close(key)
            f = self._start(key, shape, chunk, file)
        elif f is None:
            f = self._start(key, shape, 0, 0)
        return f

    def _start(self, key: str, shape: tuple, chunk: int, file: int) -> dict:
        h, w, _ = shape
        path = self.root / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        container = self.av.open(str(path), "w")
        stream = container.add_stream(CODECS[self.codec], rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, self.pix_fmt
        stream.options = dict(self.options)
        self._open[key] = {"container": container, "stream": stream, "chunk": chunk,
                           "file": file, "time": 0.0, "bytes": 0}
        return self._open[key]

    def _close(self, key: str) -> None:
        f = self._open.pop(key)
        f["container"].mux(f["stream"].encode())  # flush the encoder
        f["container"].close()
