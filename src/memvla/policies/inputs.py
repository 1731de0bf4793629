"""Validation of policy inputs (LeRobot keys). Bad input raises a ValueError that names the
key, the expected and the received value; nothing is broadcast, truncated or dropped."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..configs import PolicyConfig


def _tensor(key: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(f"{key}: expected a torch.Tensor or numpy array, got {type(value).__name__}")


def _require_key(batch: dict, key: str) -> Any:
    if key not in batch:
        raise ValueError(f"missing key {key!r}; the batch has {sorted(batch)}")
    return batch[key]


def _finite(key: str, x: Tensor) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{key}: expected finite values, got {bad} NaN/inf entries")


def check_images(key: str, value: Any, cfg: PolicyConfig) -> Tensor:
    """uint8 (B, H, W, C) or float (B, C, H, W) in [0, 1] -> (B, C, H, W): a uint8 view
    (no copy; it travels to the model's device as bytes, see :func:`images_to_float`) or
    the float images as given."""
    c, h, w = cfg.image_shape
    x = _tensor(key, value)
    if x.dtype == torch.uint8:
        if x.dim() != 4 or tuple(x.shape[1:]) != (h, w, c):
            raise ValueError(f"{key}: expected uint8 images of shape (B, {h}, {w}, {c}) "
                             f"(HWC), got {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2)  # (B, C, H, W) uint8
    if not x.is_floating_point():
        raise ValueError(f"{key}: expected uint8 (B, H, W, C) or float (B, C, H, W) images, "
                         f"got dtype {x.dtype}")
    if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
        raise ValueError(f"{key}: expected float images of shape (B, {c}, {h}, {w}) (CHW), "
                         f"got {tuple(x.shape)}")
    _finite(key, x)
    lo, hi = x.min().item(), x.max().item()
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{key}: expected float images in [0, 1], got values in "
                         f"[{lo:.3g}, {hi:.3g}]")
    return x


def images_to_float(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Checked images (B, C, H, W), uint8 or float in [0, 1] -> ``dtype`` in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.to(dtype) / 255.0  # (B, C, H, W)
    return x.to(dtype)


def check_history(key: str, value: Any, frames: int, cfg: PolicyConfig) -> Tensor:
    """Past frames of one camera: uint8 (B, K, H, W, C) or float (B, K, C, H, W) in [0, 1]
    -> (B, K, C, H, W), uint8 (a view) or float as given."""
    x = _tensor(key, value)
    if x.dim() != 5 or x.shape[1] != frames:
        raise ValueError(f"{key}: expected {frames} past frames per sample, (B, {frames}, ...) "
                         f"images, got shape {tuple(x.shape)}")
    b, k = x.shape[:2]
    images = check_images(key, x.flatten(0, 1), cfg)  # (B·K, C, H, W)
    return images.unflatten(0, (b, k))  # (B, K, C, H, W)


def check_vector(key: str, value: Any, dim: int, batch: int | None) -> Tensor:
    x = _tensor(key, value)
    if x.dim() != 2 or x.shape[1] != dim or (batch is not None and x.shape[0] != batch):
        b = "B" if batch is None else batch
        raise ValueError(f"{key}: expected shape ({b}, {dim}), got {tuple(x.shape)}")
    x = x.float()
    _finite(key, x)
    return x


def check_tasks(value: Any, batch: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"task: expected a string or a list of {batch} strings, got "
                         f"{type(value).__name__}")
    if len(value) != batch:
        raise ValueError(f"task: expected {batch} strings (one per sample), got {len(value)}")
    return list(value)


def check_observation(batch: dict, cfg: PolicyConfig) -> tuple[list[Tensor], Tensor, list[str]]:
    """-> images per camera (B, C, H, W) in [0, 1], state (B, Ds), tasks (B strings)."""
    images = [check_images(k, _require_key(batch, k), cfg) for k in cfg.image_keys]
    b = images[0].shape[0]
    if b == 0:
        raise ValueError(f"{cfg.image_keys[0]}: expected a batch of at least 1 sample, got an "
                         f"empty batch of shape {tuple(images[0].shape)}")
    for k, img in zip(cfg.image_keys, images, strict=True):
        if img.shape[0] != b:
            raise ValueError(f"{k}: batch size {img.shape[0]} differs from "
                             f"{cfg.image_keys[0]}'s {b}")
    state = check_vector("observation.state", _require_key(batch, "observation.state"),
                         cfg.state_dim, b)
    tasks = check_tasks(_require_key(batch, "task"), b)
    return images, state, tasks


def check_actions(batch: dict, cfg: PolicyConfig, b: int) -> tuple[Tensor, Tensor]:
    """-> actions (B, A, Da) and action_is_pad (B, A) bool (all False when absent)."""
    a = cfg.model.chunk_size
    x = _tensor("action", _require_key(batch, "action"))
    if x.dim() != 3 or tuple(x.shape) != (b, a, cfg.action_dim):
        raise ValueError(f"action: expected shape ({b}, {a}, {cfg.action_dim}) "
                         f"(batch, chunk_size, action_dim), got {tuple(x.shape)}")
    x = x.float()
    _finite("action", x)
    if "action_is_pad" in batch:
        pad = _tensor("action_is_pad", batch["action_is_pad"])
        if tuple(pad.shape) != (b, a) or pad.dtype != torch.bool:
            raise ValueError(f"action_is_pad: expected bool of shape ({b}, {a}), got "
                             f"{pad.dtype} {tuple(pad.shape)}")
    else:
        pad = torch.zeros(b, a, dtype=torch.bool)
    return x, pad


def batch_observation(obs: dict) -> dict:
    """Add a batch axis of 1 to a single (unbatched) observation from an environment."""
    out = {}
    for k, v in obs.items():
        if k == "task":
            out[k] = [v] if isinstance(v, str) else v
        else:
            out[k] = _tensor(k, v)[None]
    return out
