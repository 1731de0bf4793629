"""Connectors from vision features to the language width: pixel shuffle + linear
(SmolVLM / Idefics3), a plain linear projector (PaliGemma, scale factor 1) and OpenVLA's
GELU MLP projector."""

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

    def project_groups(self, groups: Tensor) -> Tensor:
        """Groups of s² patch features (B, K, s², D) in the pixel shuffle's (r, c) order ->
        their tokens (B, K, Dout): the forward on any subset of the grid's groups."""
        return self.modality_projection(groups.flatten(2))  # (B, K, Dout)


class MLPProjector(nn.Module):
    """OpenVLA's projector from patch features to the decoder width, with GELUs between the
    layers: 2 layers ``fc1`` (in -> out), ``fc2`` (out -> out) for one vision tower; 3 layers
    ``fc1`` (in -> 4·in), ``fc2`` (4·in -> out), ``fc3`` (out -> out) for the fused towers."""

    def __init__(self, in_dim: int, out_dim: int, layers: int = 2):
        super().__init__()
        if layers not in (2, 3):
            raise ValueError(f"MLPProjector: layers must be 2 or 3, got {layers}")
        dims = [in_dim, out_dim, out_dim] if layers == 2 else [in_dim, 4 * in_dim, out_dim,
                                                               out_dim]
        for i in range(layers):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.layers = layers

    scale = 1  # a token per patch (no pixel shuffle)

    def project_groups(self, groups: Tensor) -> Tensor:
        """Patch features as groups of one (B, K, 1, D) -> their tokens (B, K, Dout)."""
        return self(groups[:, :, 0])  # (B, K, Dout)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.layers):
            x = getattr(self, f"fc{i + 1}")(x)  # (B, P, D_i)
            if i < self.layers - 1:
                x = nn.functional.gelu(x)
        return x  # (B, P, Dout)
