"""RMSNorm (Llama / SmolLM2 style, and Gemma's ``1 + weight`` variant)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, unit_offset: bool = False) -> Tensor:
    """Normalise the last axis by its root mean square, computed in float32.

    ``unit_offset`` scales by ``1 + weight`` (Gemma) instead of ``weight`` (Llama).
    """
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., D)
    if weight is None:
        return xf.to(dtype)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(dtype)
    return weight * xf.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        # Gemma stores w with the scale 1 + w, so a fresh norm starts at w = 0.
        init = torch.zeros(dim) if unit_offset else torch.ones(dim)
        self.weight = nn.Parameter(init)
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.unit_offset)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"
