"""Dropping pruned tokens inside the vision tower (``model.pruner.tower_layer = k``).

LightVLA prunes the tower's output tokens, so the tower itself runs on every patch. Here
the pruner votes on a *preview* of the tokens instead: the features after the tower's first
k layers, through the tower's final LayerNorm and the connector (pixel shuffle and
projection), as the finished tokens would be. A token stands for an s×s group of patches
(s = the connector's pixel shuffle), so a kept token keeps its whole group, and the tower's
other layers run on the kept groups' patches only, attending to each other.

- :func:`finish_kept` (inference): gathers the kept groups' patches, padded to the batch's
  largest count, runs the remaining layers with the padding masked out of the keys, then
  the connector group by group -> the finished tokens, scattered back into place (zero at
  the dropped ones).
- :func:`finish_masked` (training, and the slow twin): every patch runs every layer, the
  dropped groups masked out of the keys; its kept tokens equal :func:`finish_kept`'s
  (tested), so training sees what inference computes.

:class:`TowerPreview` is the image encoder of one prefix: it gives the previews and keeps
the features of each camera until the pruner has voted.

Axis letters: P = patches of one image, G = its tokens (groups of s² patches), Dv = the
tower's width, K = kept groups (padded).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .token_pruner import kept_first
from .vision import ImageEncoder


def group_major_order(side: int, scale: int, device=None) -> Tensor:
    """Patch indices (P,) of a side × side grid ordered group by group (groups of scale ×
    scale patches, row-major), each group's patches row-major: the pixel shuffle's (r, c)
    order, so ``feats[:, order].view(B, G, s²·Dv)`` is the shuffled tokens."""
    g = side // scale
    grid = torch.arange(side * side, device=device).view(g, scale, g, scale)  # (gi, r, gj, c)
    return grid.permute(0, 2, 1, 3).reshape(-1)  # (P,)


def tower_head(vision, images: Tensor, k: int) -> Tensor:
    """images (B, C, S, S) -> the tower's features after its first ``k`` layers (B, P, Dv)."""
    x = vision.embeddings(images)  # (B, P, Dv)
    for layer in vision.encoder.layers[:k]:
        x = layer(x)
    return x


def preview(encoder: ImageEncoder, feats: Tensor) -> Tensor:
    """Features (B, P, Dv) of any layer -> tokens (B, G, D) as if the tower ended there."""
    return encoder.project(encoder.vision.post_layernorm(feats))  # (B, G, D)


def _patch_mask(keep: Tensor, side: int, scale: int) -> Tensor:
    """Kept tokens (B, G) bool -> kept patches (B, P) bool (row-major over the patch grid)."""
    g = side // scale
    grid = keep.view(-1, g, g)  # (B, g, g)
    return grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).flatten(1)  # (B, P)


def finish_masked(encoder: ImageEncoder, feats: Tensor, k: int, keep: Tensor) -> Tensor:
    """The tokens (B, G, D) from the features after ``k`` layers (B, P, Dv), the remaining
    layers over every patch with the dropped groups (``keep`` (B, G) bool False) masked out
    of the keys. Rows of dropped tokens are computed too (they are not used)."""
    vision = encoder.vision
    key_valid = _patch_mask(keep, vision.embeddings.side, encoder.connector.scale)  # (B, P)
    x = feats
    for layer in vision.encoder.layers[k:]:
        x = layer(x, key_valid)  # (B, P, Dv)
    return preview(encoder, x)  # (B, G, D)


def finish_kept(encoder: ImageEncoder, feats: Tensor, k: int, keep: Tensor) -> Tensor:
    """:func:`finish_masked` on the kept groups only: (B, G, D), zero at dropped tokens."""
    vision, s = encoder.vision, encoder.connector.scale
    b, p, dv = feats.shape
    s2 = s * s
    order = group_major_order(vision.embeddings.side, s, feats.device)  # (P,)
    groups = feats[:, order].view(b, p // s2, s2, dv)  # (B, G, s², Dv)
    idx, valid, _ = kept_first(keep)  # (B, K), (B, K)
    n = idx.shape[1]
    x = groups.gather(1, idx[:, :, None, None].expand(-1, -1, s2, dv))  # (B, K, s², Dv)
    x = x.reshape(b, n * s2, dv)  # (B, K·s², Dv)
    key_valid = valid.repeat_interleave(s2, 1)  # (B, K·s²)
    for layer in vision.encoder.layers[k:]:
        x = layer(x, key_valid)  # (B, K·s², Dv)
    x = vision.post_layernorm(x).view(b, n, s2 * dv)  # (B, K, s²·Dv) pixel-shuffled
    tokens = encoder.connector.modality_projection(x)  # (B, K, D)
    if encoder.scale != 1.0:
        tokens = tokens * encoder.scale
    tokens = torch.where(valid[..., None], tokens, torch.zeros_like(tokens))  # (B, K, D)
    out = tokens.new_zeros(b, p // s2, tokens.shape[-1])  # (B, G, D)
    return out.scatter(1, idx[..., None].expand(-1, -1, tokens.shape[-1]), tokens)


class TowerPreview:
    """The image encoder of one prefix with ``model.pruner.tower_layer = k``: calling it
    on a camera's images (B, C, S, S) gives the preview tokens (B, G, D) and keeps the
    features; :meth:`finish` turns the pruner's kept mask over every camera's tokens into
    the finished tokens."""

    def __init__(self, encoder: ImageEncoder, k: int):
        self.encoder, self.k = encoder, k
        self.feats: list[Tensor] = []  # (B, P, Dv) per camera, in call order

    def __call__(self, images: Tensor) -> Tensor:
        feats = tower_head(self.encoder.vision, images, self.k)  # (B, P, Dv)
        self.feats.append(feats)
        return preview(self.encoder, feats)  # (B, G, D)

    def finish(self, keep: Tensor, fast: bool) -> Tensor:
        """Kept tokens (B, C·G) bool, cameras in call order -> tokens (B, C·G, D): only the
        kept groups computed (``fast``) or every patch with the dropped ones masked."""
        if not self.feats:
            raise RuntimeError("TowerPreview.finish: no camera was encoded")
        g = keep.shape[1] // len(self.feats)
        if g * len(self.feats) != keep.shape[1]:
            raise ValueError(f"TowerPreview.finish: {keep.shape[1]} kept flags do not split "
                             f"into {len(self.feats)} cameras")
        fn = finish_kept if fast else finish_masked
        return torch.cat([fn(self.encoder, f, self.k, keep[:, i * g:(i + 1) * g])
                          for i, f in enumerate(self.feats)], 1)  # (B, C·G, D)
