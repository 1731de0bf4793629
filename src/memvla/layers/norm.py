"""RMSNorm (Llama / SmolLM2 style, and Gemma's ``1 + weight`` variant), and π0.5's adaptive
RMSNorm conditioned on a vector, with its gated residual."""

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


def ada_rms_norm(x: Tensor, modulation: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """π0.5's adaptive RMSNorm: x (B, N, D) normalised in float32, then scaled and shifted
    by the condition's ``modulation`` (B, 3D) = [scale; shift; gate]: ``rms(x)·(1 + scale) +
    shift`` -> (that (B, N, D), the gate (B, 1, D) of the residual it feeds)."""
    xf = rms_norm(x.float(), None, eps)  # (B, N, D) float32
    scale, shift, gate = modulation[:, None].float().chunk(3, dim=-1)  # (B, 1, D) each
    return (xf * (1 + scale) + shift).to(x.dtype), gate.to(x.dtype)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:
    """x + y, or x + y·gate after an adaptive norm."""
    return x + y if gate is None else x + y * gate


class AdaRMSNorm(nn.Module):
    """RMSNorm conditioned on a vector (π0.5's action expert, conditioned on the flow time):
    ``dense`` maps the condition (B, Dc) to [scale; shift; gate] (B, 3D). openpi starts
    ``dense``'s weight at zero; here it starts near zero (std 1e-3), so that what feeds the
    condition (the time MLP) gets a gradient from the first step too."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.normal_(self.dense.weight, std=1e-3)
        self.eps = eps

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        if cond is None:
            raise ValueError("an adaptive RMSNorm needs its condition (B, Dc); got None")
        return ada_rms_norm(x, self.dense(cond), self.eps)
