"""Dropping pruned tokens inside the vision tower (``model.pruner.tower_layer = k``).

LightVLA prunes the tower's output tokens, so the tower itself runs on every patch. Here
the pruner votes on a *preview* of the tokens instead: the features after the tower's first
k layers, through the tower's head (its final LayerNorm) and the connector (pixel shuffle
and projection, or the parallel family's MLP projector), as the finished tokens would be.
A token stands for an s×s group of patches (s = the connector's pixel shuffle), so a kept
token keeps its whole group, and the tower's other layers run on the kept groups' patches
only, attending to each other. Every tower the model reads is cut at the same depth (the
parallel family's fused pair too); a tower's prefix tokens (class, registers) stay.

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
tower's width, K = kept groups (padded), R = a tower's prefix tokens.
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


def towers_of(vision) -> list:
    """The towers of an encoder's ``vision``: itself, or the ``towers`` it holds (e.g. the
    parallel family's fused pair over the same image, whose features concatenate). A tower
    runs in stages: ``stem`` (images -> its prefix tokens, then the patches), the
    ``feature_blocks`` (each ``block(x, key_valid)``) and ``head`` (-> the patch features),
    with ``num_prefix`` tokens before the patches and a ``side`` × ``side`` patch grid."""
    return list(getattr(vision, "towers", None) or [vision])


def tower_head(vision, images: Tensor, k: int) -> list[Tensor]:
    """images (B, C, S, S) -> each tower's tokens after its first ``k`` blocks
    (B, R + P, Dv) (R = its prefix tokens)."""
    out = []
    for tower in towers_of(vision):
        x = tower.stem(images)  # (B, R + P, Dv)
        for block in tower.feature_blocks[:k]:
            x = block(x)
        out.append(x)
    return out


def _features(encoder: ImageEncoder, states: list[Tensor]) -> Tensor:
    """Each tower's tokens after some blocks -> the patch features (B, N, ΣDv) as if the
    towers ended there."""
    return torch.cat([t.head(x) for t, x in zip(towers_of(encoder.vision), states,
                                                strict=True)], -1)  # (B, N, ΣDv)


def preview(encoder: ImageEncoder, states: list[Tensor]) -> Tensor:
    """The towers' tokens (B, R + P, Dv) after any block -> tokens (B, G, D) as if the
    towers ended there."""
    return encoder.project(_features(encoder, states))  # (B, G, D)


def _patch_mask(keep: Tensor, side: int, scale: int) -> Tensor:
    """Kept tokens (B, G) bool -> kept patches (B, P) bool (row-major over the patch grid)."""
    g = side // scale
    grid = keep.view(-1, g, g)  # (B, g, g)
    return grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).flatten(1)  # (B, P)


def _with_prefix(valid: Tensor, tower) -> Tensor:
    """Patch flags (B, N) -> the tower's token flags (B, R + N): its prefix always valid."""
    return torch.cat([valid.new_ones(valid.shape[0], tower.num_prefix), valid], 1)


def finish_masked(encoder: ImageEncoder, states: list[Tensor], k: int, keep: Tensor
                  ) -> Tensor:
    """The tokens (B, G, D) from the towers' tokens after ``k`` blocks (B, R + P, Dv),
    the remaining blocks over every patch with the dropped groups (``keep`` (B, G) bool
    False) masked out of the keys. Rows of dropped tokens are computed too (unused)."""
    out = []
    for tower, x in zip(towers_of(encoder.vision), states, strict=True):
        key_valid = _with_prefix(_patch_mask(keep, tower.side, encoder.connector.scale),
                                 tower)  # (B, R + P)
        for block in tower.feature_blocks[k:]:
            x = block(x, key_valid)  # (B, R + P, Dv)
        out.append(x)
    return preview(encoder, out)  # (B, G, D)


def finish_kept(encoder: ImageEncoder, states: list[Tensor], k: int, keep: Tensor
                ) -> Tensor:
    """:func:`finish_masked` on the kept groups only: (B, G, D), zero at dropped tokens."""
    s = encoder.connector.scale
    s2 = s * s
    idx, valid, _ = kept_first(keep)  # (B, K), (B, K)
    b, n = idx.shape
    out = []
    for tower, x in zip(towers_of(encoder.vision), states, strict=True):
        r, dv = tower.num_prefix, x.shape[-1]
        order = group_major_order(tower.side, s, x.device)  # (P,)
        groups = x[:, r:][:, order].view(b, -1, s2, dv)  # (B, G, s², Dv)
        kept = groups.gather(1, idx[:, :, None, None].expand(-1, -1, s2, dv))  # (B, K, s², Dv)
        y = torch.cat([x[:, :r], kept.reshape(b, n * s2, dv)], 1)  # (B, R + K·s², Dv)
        key_valid = _with_prefix(valid.repeat_interleave(s2, 1), tower)  # (B, R + K·s²)
        for block in tower.feature_blocks[k:]:
            y = block(y, key_valid)  # (B, R + K·s², Dv)
        out.append(y)
    feats = _features(encoder, out).view(b, n, s2, -1)  # (B, K, s², ΣDv)
    tokens = encoder.connector.project_groups(feats)  # (B, K, D)
    if encoder.scale != 1.0:
        tokens = tokens * encoder.scale
    tokens = torch.where(valid[..., None], tokens, torch.zeros_like(tokens))  # (B, K, D)
    out = tokens.new_zeros(b, keep.shape[1], tokens.shape[-1])  # (B, G, D)
    return out.scatter(1, idx[..., None].expand(-1, -1, tokens.shape[-1]), tokens)


class TowerPreview:
    """The image encoder of one prefix with ``model.pruner.tower_layer = k``: calling it
    on a camera's images (B, C, S, S) gives the preview tokens (B, G, D) and keeps the
    features; :meth:`finish` turns the pruner's kept mask over every camera's tokens into
    the finished tokens."""

    def __init__(self, encoder: ImageEncoder, k: int):
        self.encoder, self.k = encoder, k
        self.states: list[list[Tensor]] = []  # per camera, in call order: each tower's

    def __call__(self, images: Tensor) -> Tensor:
        states = tower_head(self.encoder.vision, images, self.k)  # per tower (B, R + P, Dv)
        self.states.append(states)
        return preview(self.encoder, states)  # (B, G, D)

    def values(self, training: bool):
        """What the pruner selects from (its ``values``): kept mask -> the finished tokens,
        every patch masked in training (the twin), only the kept ones at inference."""
        return lambda kept: self.finish(kept, fast=not training)

    def finish(self, keep: Tensor, fast: bool) -> Tensor:
        """Kept tokens (B, C·G) bool, cameras in call order -> tokens (B, C·G, D): only the
        kept groups computed (``fast``) or every patch with the dropped ones masked."""
        if not self.states:
            raise RuntimeError("TowerPreview.finish: no camera was encoded")
        g = keep.shape[1] // len(self.states)
        if g * len(self.states) != keep.shape[1]:
            raise ValueError(f"TowerPreview.finish: {keep.shape[1]} kept flags do not split "
                             f"into {len(self.states)} cameras")
        fn = finish_kept if fast else finish_masked
        return torch.cat([fn(self.encoder, f, self.k, keep[:, i * g:(i + 1) * g])
                          for i, f in enumerate(self.states)], 1)  # (B, C·G, D)
