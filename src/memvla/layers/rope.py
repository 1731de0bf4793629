"""Rotary position embeddings. Positions are explicit integers per token, so they may have
gaps (pruned tokens keep their original positions) and may differ across the batch."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables for integer ``positions`` (B, N); half-split (rotate-half) layout."""
    if head_dim % 2:
        raise ValueError(f"rope: head_dim must be even, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (base ** (exponent / head_dim))  # (Dh/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, N, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, N, Dh)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, Hh, N, Dh) by the angles of ``cos``/``sin`` (B, N, Dh)."""
    dtype = x.dtype
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, Hh, N, Dh)
    out = x * cos[:, None] + rotated * sin[:, None]  # (B, Hh, N, Dh)
    return out.to(dtype)
