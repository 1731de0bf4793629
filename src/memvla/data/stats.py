"""Normalisation statistics in LeRobot's ``meta/stats.json`` layout.

For every feature: ``min``, ``max``, ``mean``, ``std`` (population), ``count`` (frames) and
the quantiles ``q01``, ``q10``, ``q50``, ``q90``, ``q99`` (as in recent LeRobot releases).

- Vector features of shape (D,) get statistics of shape (D,); scalar features (shape (1,))
  get shape (1,).
- Image features get per-channel statistics of shape (C, 1, 1), in [0, 1] (pixel / 255).
  They are computed exactly from 256-bin histograms of the uint8 pixels (LeRobot samples
  frames and estimates quantiles; here every pixel counts).
- Array features of k >= 2 axes (a depth map (H, W), a pose (4, 4)) get statistics over
  the frames and all their elements, of shape (1,) * k (broadcastable, like an image's
  (C, 1, 1)): per-pixel statistics of a depth map would be millions of numbers for a
  large dataset. The global ones merge the episodes' (:func:`merge_array_stats`): min,
  max, mean and std exactly, the quantiles as the frame-weighted mean of the episodes'
  quantiles (as LeRobot aggregates statistics), so the data need not stay in memory.
- Quantiles use numpy's default ("linear") definition, also for images.

Per-episode statistics are stored in the episodes parquet as ``stats/<feature>/<stat>``
columns; the global ones are computed from all the data (not averaged over episodes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
QUANTILE_KEYS = tuple(f"q{round(q * 100):02d}" for q in QUANTILES)


def vector_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics over the first axis of ``values`` (T,) or (T, D): arrays (1,) or (D,)."""
    x = np.asarray(values, dtype=np.float64)
    x = x.reshape(len(x), -1)  # (T, D)
    stats = {
        "min": x.min(axis=0),
        "max": x.max(axis=0),
        "mean": x.mean(axis=0),
        "std": x.std(axis=0),
        "count": np.array([len(x)]),
    }
    quantiles = np.quantile(x, QUANTILES, axis=0)  # (5, D)
    stats.update(zip(QUANTILE_KEYS, quantiles, strict=True))
    return stats


def array_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of an array feature's frames (T, D1, ..., Dk) over every element: arrays
    of shape (1,) * k; ``count`` is T (frames)."""
    x = np.asarray(values)
    stats = vector_stats(x.reshape(-1, 1))
    ones = (1,) * (x.ndim - 1)
    out = {k: v.reshape(ones) for k, v in stats.items() if k != "count"}
    out["count"] = np.array([len(x)])
    return out


def merge_array_stats(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One set of :func:`array_stats` from several (the episodes'): min, max, mean and std
    exact, quantiles weighted by the frame counts (every frame has as many elements)."""
    n = np.array([float(p["count"][0]) for p in parts])  # (E,)
    w = n / n.sum()
    mean = sum(wi * p["mean"] for wi, p in zip(w, parts, strict=True))
    second = sum(wi * (p["std"] ** 2 + p["mean"] ** 2) for wi, p in zip(w, parts, strict=True))
    out = {
        "min": np.minimum.reduce([p["min"] for p in parts]),
        "max": np.maximum.reduce([p["max"] for p in parts]),
        "mean": mean,
        "std": np.sqrt(np.maximum(second - mean**2, 0.0)),
    }
    for key in QUANTILE_KEYS:
        out[key] = sum(wi * p[key] for wi, p in zip(w, parts, strict=True))
    out["count"] = np.array([int(n.sum())])
    return out


def image_histogram(images: np.ndarray) -> np.ndarray:
    """Per-channel pixel histogram of uint8 images (T, H, W, C) -> counts (C, 256)."""
    c = images.shape[-1]
    flat = images.reshape(-1, c)  # (T*H*W, C)
    return np.stack([np.bincount(flat[:, k], minlength=256) for k in range(c)])  # (C, 256)


def _sorted_value_at(cumulative: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Value (0..255) of the element at 0-based ``rank`` in a sorted sample with this histogram."""
    return np.searchsorted(cumulative, rank, side="right").astype(np.float64)


def histogram_stats(hist: np.ndarray, frames: int) -> dict[str, np.ndarray]:
    """Image statistics from per-channel histograms (C, 256): arrays (C, 1, 1) in [0, 1]."""
    hist = np.asarray(hist, dtype=np.int64)
    values = np.arange(256, dtype=np.float64)
    n = hist.sum(axis=1)  # (C,)
    mean = hist @ values / n  # (C,)
    var = hist @ values**2 / n - mean**2
    nonzero = hist > 0
    stats = {
        "min": np.argmax(nonzero, axis=1).astype(np.float64),
        "max": 255 - np.argmax(nonzero[:, ::-1], axis=1).astype(np.float64),
        "mean": mean,
        "std": np.sqrt(np.maximum(var, 0.0)),
    }
    cumulative = np.cumsum(hist, axis=1)  # (C, 256)
    for key, q in zip(QUANTILE_KEYS, QUANTILES, strict=True):
        pos = q * (n - 1)  # (C,) numpy "linear" quantile position
        lo = np.floor(pos)
        out = np.empty(len(hist))
        for ch in range(len(hist)):
            a = _sorted_value_at(cumulative[ch], lo[ch])
            b = _sorted_value_at(cumulative[ch], min(lo[ch] + 1, n[ch] - 1))
            out[ch] = a + (pos[ch] - lo[ch]) * (b - a)
        stats[key] = out
    stats = {k: (v / 255.0).reshape(-1, 1, 1) for k, v in stats.items()}  # (C, 1, 1)
    stats["count"] = np.array([frames])
    return stats


def stats_to_json(stats: dict[str, dict[str, np.ndarray]]) -> dict:
    """Nested lists (JSON-ready), one entry per feature and statistic."""
    return {
        key: {name: np.asarray(value).tolist() for name, value in ft.items()}
        for key, ft in stats.items()
    }


def read_stats_json(root: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """``meta/stats.json`` of the dataset at ``root`` as float64 numpy arrays.

    Raises FileNotFoundError or ValueError naming the file when it is missing or corrupt.
    """
    path = Path(root) / "meta" / "stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"missing statistics file {path}")
    try:
        raw = json.loads(path.read_text())
        return {
            key: {name: np.asarray(value, dtype=np.float64) for name, value in ft.items()}
            for key, ft in raw.items()
        }
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"corrupt statistics file {path}: {e}") from e


def load_stats(root: str | os.PathLike):
    """Normalisation statistics of a dataset as float32 torch tensors.

    Returns ``{feature: {"min"|"max"|"mean"|"std"|"count"|"q01"|...: Tensor}}``; vectors have
    shape (D,), images (C, 1, 1) in [0, 1]. Raises FileNotFoundError or ValueError naming
    ``meta/stats.json`` when it is missing or corrupt.
    """
    import torch

    return {
        key: {name: torch.as_tensor(value, dtype=torch.float32) for name, value in ft.items()}
        for key, ft in read_stats_json(root).items()
    }
