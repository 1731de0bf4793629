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


DEPTH_KEY = "observation.depth"
POSE_KEY = "observation.pose"
INTRINSICS_KEY = "observation.intrinsics"


def check_geometry(batch: dict, cfg: PolicyConfig, b: int) -> tuple[Tensor, Tensor, Tensor]:
    """The camera geometry voxel pruning needs, checked: depth (B, H, W) metres at the
    camera's resolution (a (B, 1, H, W) or (B, H, W, 1) channel axis is accepted), pose
    (B, 4, 4) world-from-camera, rigid, and intrinsics (B, 3, 3) (or one (3, 3) for all).
    The samples of an episode segment past the episode's end (``segment_is_pad``, (B,))
    hold no frame: their pose and intrinsics are taken as the identity."""
    _, h, w = cfg.image_shape
    why = f"context.voxel_size={cfg.context.voxel_size} back-projects the camera's tokens"
    for key in (DEPTH_KEY, POSE_KEY, INTRINSICS_KEY):
        if key not in batch:
            raise ValueError(f"missing key {key!r}: {why} with {DEPTH_KEY}, {POSE_KEY} and "
                             f"{INTRINSICS_KEY}; the batch has {sorted(batch)}")
    depth = _tensor(DEPTH_KEY, batch[DEPTH_KEY])
    if depth.dim() == 4 and 1 in (depth.shape[1], depth.shape[3]):
        depth = depth.squeeze(1 if depth.shape[1] == 1 else 3)
    if depth.dim() != 3 or tuple(depth.shape) != (b, h, w) or not depth.is_floating_point():
        raise ValueError(f"{DEPTH_KEY}: expected float depth of shape ({b}, {h}, {w}) (the "
                         f"camera's resolution), got {depth.dtype} {tuple(depth.shape)}")
    pose = _tensor(POSE_KEY, batch[POSE_KEY])
    if tuple(pose.shape) != (b, 4, 4) or not pose.is_floating_point():
        raise ValueError(f"{POSE_KEY}: expected float (B, 4, 4) = ({b}, 4, 4) "
                         f"world-from-camera matrices, got {pose.dtype} {tuple(pose.shape)}")
    k = _tensor(INTRINSICS_KEY, batch[INTRINSICS_KEY])
    if k.dim() == 2:
        k = k.expand(b, 3, 3) if tuple(k.shape) == (3, 3) else k
    if tuple(k.shape) != (b, 3, 3) or not k.is_floating_point():
        raise ValueError(f"{INTRINSICS_KEY}: expected float (B, 3, 3) = ({b}, 3, 3) or (3, 3) "
                         f"pinhole matrices, got {k.dtype} {tuple(k.shape)}")
    padded = batch.get("segment_is_pad")
    if isinstance(padded, Tensor) and bool(padded.any()):
        gone = padded.to(pose.device).view(b, 1, 1)  # (B, 1, 1)
        pose = torch.where(gone, torch.eye(4, dtype=pose.dtype, device=pose.device), pose)
        k = torch.where(gone.to(k.device), torch.eye(3, dtype=k.dtype, device=k.device), k)
    _finite(POSE_KEY, pose)
    check_rigid(POSE_KEY, pose)
    _finite(INTRINSICS_KEY, k)
    if bool((k[:, 0, 0] <= 0).any() or (k[:, 1, 1] <= 0).any()):
        raise ValueError(f"{INTRINSICS_KEY}: expected focal lengths fx, fy > 0, got "
                         f"{k[:, 0, 0].tolist()}, {k[:, 1, 1].tolist()}")
    return depth, pose, k


def check_rigid(key: str, pose: Tensor, tol: float = 1e-3) -> None:
    """A clear error unless every (4, 4) matrix of ``pose`` (B, 4, 4) is a rigid transform:
    an orthonormal rotation (det +1) and a last row (0, 0, 0, 1)."""
    p = pose.double()
    r = p[:, :3, :3]  # (B, 3, 3)
    eye = torch.eye(3, dtype=p.dtype, device=p.device)
    ortho = (r.transpose(1, 2) @ r - eye).abs().amax((1, 2))  # (B,)
    det = torch.linalg.det(r)  # (B,)
    row = (p[:, 3] - torch.tensor([0, 0, 0, 1.0], dtype=p.dtype, device=p.device)).abs()
    bad = (ortho > tol) | ((det - 1).abs() > tol) | (row.amax(1) > tol)  # (B,)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{key}[{i}]: expected a rigid world-from-camera matrix (R^T R = I, "
                         f"det R = 1, last row 0 0 0 1), got |R^T R - I| = "
                         f"{float(ortho[i]):.3g}, det R = {float(det[i]):.4g}, last row "
                         f"{p[i, 3].tolist()}")
