"""Voxel pruning of memory tokens (StreamVLN's paper; no released code has it).

Each memory token stands for a patch of a past frame. With that frame's depth, camera pose
and intrinsics the patch's centre is back-projected to a point of the world; points are
bucketed into voxels of ``voxel_size`` metres, and of the tokens that fall in one voxel
only the newest is kept: the memory holds one token per place, however often the place
was seen. Nothing is learnt.

Conventions: pixels (u, v) with u to the right and v down, pixel centres at half-integers
(pixel (0, 0) covers [0, 1)²); a pinhole camera ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``
in those pixels; depth along the optical axis (z of the camera, OpenCV: x right, y down,
z forward); ``pose`` world-from-camera (4 × 4, rigid). Newest = the largest index along
the token axis: callers order tokens oldest first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def patch_centres(grid: int, image_size: int, height: int, width: int,
                  pad: str = "top_left") -> tuple[Tensor, Tensor]:
    """Centres of a ``grid × grid`` patch grid over the model's ``image_size`` square image,
    in pixels of the raw (``height × width``) image it was resized and padded from
    (:func:`memvla.policies.processor.resize_with_pad`), row-major -> (uv (T, 2) float,
    inside (T,) bool: False for a centre in the padding)."""
    step = image_size / grid
    c = (torch.arange(grid, dtype=torch.float64) + 0.5) * step  # (g,) in the square image
    ys, xs = torch.meshgrid(c, c, indexing="ij")  # (g, g)
    scale = image_size / max(height, width)
    if height == image_size and width == image_size:
        scale = 1.0
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    ph, pw = image_size - nh, image_size - nw
    top, left = (ph // 2, pw // 2) if pad == "center" else (ph, pw)
    u = (xs.flatten() - left) * (width / nw)  # (T,) raw pixels
    v = (ys.flatten() - top) * (height / nh)  # (T,)
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)  # (T,)
    return torch.stack([u, v], -1).float(), inside


def backproject(depth: Tensor, pose: Tensor, intrinsics: Tensor, uv: Tensor
                ) -> tuple[Tensor, Tensor]:
    """World points of pixels: depth (B, H, W) metres, pose (B, 4, 4) world-from-camera,
    intrinsics (B, 3, 3), uv (T, 2) pixel coordinates -> (points (B, T, 3), valid (B, T):
    the depth there is finite and > 0). Depth is read at the pixel that contains uv."""
    b, h, w = depth.shape
    col = uv[:, 0].floor().long().clamp(0, w - 1)  # (T,)
    row = uv[:, 1].floor().long().clamp(0, h - 1)  # (T,)
    z = depth[:, row, col].float()  # (B, T)
    valid = torch.isfinite(z) & (z > 0)  # (B, T)
    z = torch.where(valid, z, torch.zeros_like(z))  # (B, T)
    k = intrinsics.float()
    fx, fy = k[:, 0, 0, None], k[:, 1, 1, None]  # (B, 1)
    cx, cy = k[:, 0, 2, None], k[:, 1, 2, None]  # (B, 1)
    uvf = uv.to(z.device)
    x = (uvf[None, :, 0] - cx) / fx * z  # (B, T)
    y = (uvf[None, :, 1] - cy) / fy * z  # (B, T)
    cam = torch.stack([x, y, z], -1)  # (B, T, 3)
    p = pose.float()
    world = cam @ p[:, :3, :3].transpose(1, 2) + p[:, None, :3, 3]  # (B, T, 3)
    return world, valid


def voxel_keep(points: Tensor, valid: Tensor, voxel_size: float) -> Tensor:
    """Which tokens to keep (B, N) bool: of the valid tokens (``valid`` (B, N)) whose points
    (B, N, 3) fall in one voxel of ``voxel_size``, the one with the largest index (the
    newest). A token without a valid point (no depth) is kept: it cannot be placed."""
    b, n, _ = points.shape
    cells = torch.floor(points / voxel_size).long()  # (B, N, 3)
    batch = torch.arange(b, device=points.device)[:, None, None].expand(b, n, 1)  # (B, N, 1)
    keys = torch.cat([batch, cells], -1)[valid]  # (V, 4) the valid tokens' (sample, voxel)
    order = torch.arange(n, device=points.device).expand(b, n)[valid]  # (V,)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)  # (V,) voxel of each token
    newest = torch.full((int(inverse.max()) + 1 if len(inverse) else 0,), -1,
                        dtype=torch.long, device=points.device)  # (U,)
    newest = newest.scatter_reduce(0, inverse, order, "amax")  # (U,) newest index per voxel
    keep = ~valid.clone()  # (B, N) the unplaceable tokens stay
    keep[valid] = order == newest[inverse]
    return keep


def voxel_keep_ref(points: Tensor, valid: Tensor, voxel_size: float) -> Tensor:
    """Slow twin of :func:`voxel_keep`: a dictionary from voxel to its newest token."""
    b, n, _ = points.shape
    keep = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        newest: dict[tuple[int, ...], int] = {}
        for j in range(n):
            if not valid[i, j]:
                keep[i, j] = True
                continue
            cell = tuple(int(torch.floor(c / voxel_size)) for c in points[i, j])
            newest[cell] = j  # later tokens overwrite earlier ones
        for j in newest.values():
            keep[i, j] = True
    return keep


class VoxelPruner(nn.Module):
    """Keeps the newest memory token per voxel of ``voxel_size`` metres (no parameters)."""

    def __init__(self, voxel_size: float):
        super().__init__()
        if not voxel_size > 0:
            raise ValueError(f"context.voxel_size must be > 0 metres, got {voxel_size}")
        self.voxel_size = float(voxel_size)

    def forward(self, points: Tensor, valid: Tensor, present: Tensor) -> Tensor:
        """points (B, N, 3), valid (B, N) (a point exists), present (B, N) (the token is a
        real one: e.g. not a frame before the episode's start) -> keep (B, N) bool, a
        subset of ``present``."""
        return voxel_keep(points, valid & present, self.voxel_size) & present

    def frames(self, points: Tensor, valid: Tensor, present: Tensor) -> Tensor:
        """The same over K frames of T' tokens, oldest first: points (B, K, T', 3), valid
        and present (B, K, T') -> keep (B, K, T'), the newest per voxel across the frames."""
        b, k, n = present.shape
        if points.shape[2] != n:
            raise ValueError(f"context.voxel_size: the state's points hold {points.shape[2]} "
                             f"patch centres per frame, the memory has {n} tokens per frame")
        return self(points.flatten(1, 2), valid.flatten(1, 2),
                    present.flatten(1, 2)).unflatten(1, (k, n))  # (B, K, T')

    def extra_repr(self) -> str:
        return f"voxel_size={self.voxel_size}"
