"""Connectors from vision features to the language width: pixel shuffle + linear
(SmolVLM / Idefics3) and a plain linear projector (PaliGemma, scale factor 1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def pixel_shuffle(x: Tensor, scale: int) -> Tensor:
    """Merge every scale×scale neighbourhood of the square patch grid into one token.

    x (B, P, D) -> (B, P / scale², D·scale²). The new token at grid cell (i, j) holds the
    features of patches (i·s + r, j·s + c), concatenated in (r, c, D) order.
    """
    b, p, d = x.shape
    side = round(p**0.5)
    if side * side != p or side % scale:
        raise ValueError(f"pixel_shuffle: {p} patches is not a square grid divisible by "
                         f"scale {scale}")
    g = side // scale
    x = x.view(b, g, scale, g, scale, d)  # (B, gi, r, gj, c, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, gi, gj, r, c, D)
    return x.reshape(b, g * g, scale * scale * d)  # (B, P/s², D·s²)


def pixel_shuffle_ref(x: Tensor, scale: int) -> Tensor:
    """Loop twin of :func:`pixel_shuffle`."""
    b, p, d = x.shape
    side = round(p**0.5)
    g = side // scale
    grid = x.view(b, side, side, d)
    tokens = []
    for i in range(g):
        for j in range(g):
            parts = [grid[:, i * scale + r, j * scale + c] for r in range(scale)
                     for c in range(scale)]
            tokens.append(torch.cat(parts, dim=-1))  # (B, D·s²)
    return torch.stack(tokens, dim=1)  # (B, P/s², D·s²)


class ModalityProjection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Connector(nn.Module):
    """Pixel shuffle by ``scale`` (1 = none) then a linear projection to ``out_dim``.
    Holds ``modality_projection.proj`` as SmolVLM's connector does."""

    def __init__(self, vision_dim: int, out_dim: int, scale: int = 1, bias: bool = False):
        super().__init__()
        self.scale = scale
        self.modality_projection = ModalityProjection(vision_dim * scale * scale, out_dim, bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale > 1:
            x = pixel_shuffle(x, self.scale)  # (B, P/s², D·s²)
        return self.modality_projection(x)  # (B, P/s², Dout)
