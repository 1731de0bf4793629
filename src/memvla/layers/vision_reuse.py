"""Vision-token reuse across frames (VLA-Cache's idea, applied to the vision tower).

A robot's camera sees mostly the same scene from one chunk to the next: the patches whose
pixels did not change need not go through the tower again. :func:`reuse_forward` runs a
tower (any layout in stages: :func:`memvla.layers.vision_drop.towers_of`; the parallel
family's fused pair tower by tower) on a new frame given the cache of the previous one: a
patch is *changed* if any of its pixels moved by more than ``threshold``
(images in [-1, 1]); only changed patches are computed, layer by layer, as queries that
attend to every patch — the changed ones' new keys and values and the unchanged ones'
cached keys and values of the same layer. Unchanged patches keep their cached hidden
states. The output is exact when every patch changed (it is then the full forward) and
when none did (the cache); in between the unchanged patches are stale by what the changed
ones would have told them, the approximation VLA-Cache makes in the language model's KV
cache. Cost per layer: ``C · P`` attention and ``C`` MLP rows instead of ``P · P`` and
``P`` (C changed patches of P). A timm tower's prefix tokens (class, registers) are
computed with the changed patches (they attend to every patch).

:func:`reuse_forward_ref` is the slow twin: sample by sample, each changed patch through
the layer on its own.

Axis letters: P = patches of one image, C = changed patches (padded to the batch's largest
count), R = the tower's prefix tokens, Hh = heads, Dh = head width.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class VisionCache:
    """What the tower computed for the previous frame of each sample."""

    images: Tensor  # (B, C, H, W) the frame the cache was computed on
    keys: list[Tensor]  # per layer (B, Hh, R + P, Dh)
    values: list[Tensor]  # per layer (B, Hh, R + P, Dh)
    hidden: list[Tensor]  # per layer, its output (B, R + P, D)


def changed_patches(prev: Tensor, images: Tensor, patch: int, threshold: float) -> Tensor:
    """(B, P) bool, row-major over the patch grid: the largest absolute pixel change inside
    the patch is above ``threshold``."""
    diff = (images - prev).abs().amax(1, keepdim=True)  # (B, 1, H, W)
    return F.max_pool2d(diff, patch).flatten(1) > threshold  # (B, P)


def full_forward(tower, images: Tensor) -> tuple[Tensor, VisionCache]:
    """The tower's forward, recording each block's keys, values and output -> (features
    (B, P, D), cache). Equal to ``tower(images)``."""
    x = tower.stem(images)  # (B, R + P, D)
    keys, values, hidden = [], [], []
    for block in tower.feature_blocks:
        q, k, v = block.attention_inputs(x)  # (B, Hh, R + P, Dh) each
        x = block.finish(x, q, k, v)  # (B, R + P, D)
        keys.append(k)
        values.append(v)
        hidden.append(x)
    return tower.head(x), VisionCache(images, keys, values, hidden)


def _put(full: Tensor, idx: Tensor, rows: Tensor, ok: Tensor, dim: int) -> Tensor:
    """``full`` with ``rows`` written at ``idx`` along ``dim`` where ``ok`` (padding rows
    write back what is there)."""
    shape = [1] * full.dim()
    shape[0], shape[dim] = idx.shape
    expand = list(full.shape)
    expand[dim] = idx.shape[1]
    index = idx.view(shape).expand(expand)
    keep = ok.view(shape).expand(expand)
    return full.scatter(dim, index, torch.where(keep, rows, full.gather(dim, index)))


def _rows(tower, changed: Tensor) -> tuple[Tensor, Tensor]:
    """The token rows to compute (B, R + C) and which are real (B, R + C): the tower's R
    prefix tokens (always: they attend to every patch), then the changed patches (C: the
    batch's largest count, padded)."""
    b, r = changed.shape[0], tower.num_prefix
    n = changed.sum(1)  # (B,)
    idx = torch.sort((~changed).long(), dim=1, stable=True).indices[:, : int(n.max())]  # (B, C)
    ok = torch.arange(idx.shape[1], device=idx.device)[None] < n[:, None]  # (B, C)
    prefix = torch.arange(r, device=idx.device).expand(b, r)  # (B, R)
    return torch.cat([prefix, idx + r], 1), torch.cat([ok.new_ones(b, r), ok], 1)


def reuse_forward(tower, images: Tensor, cache: VisionCache | None,
                  threshold: float) -> tuple[Tensor, VisionCache, Tensor]:
    """images (B, C, H, W) -> (features (B, P, D), the new cache, changed (B, P) bool) for
    a tower in stages (:func:`memvla.layers.vision_drop.towers_of`). Without a cache (an
    episode's first frame) every patch is computed."""
    if cache is None or tuple(cache.images.shape) != tuple(images.shape):
        feats, cache = full_forward(tower, images)
        return feats, cache, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
    changed = changed_patches(cache.images, images, tower.patch_size, threshold)  # (B, P)
    if not bool(changed.any()):
        return tower.head(cache.hidden[-1]), cache, changed
    idx, ok = _rows(tower, changed)  # (B, R + C)
    x = tower.stem(images)  # (B, R + P, D) cheap: one matmul per patch
    h = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # (B, R + C, D)
    keys, values, hidden = [], [], []
    for layer, block in enumerate(tower.feature_blocks):
        q, k_new, v_new = block.attention_inputs(h)  # (B, Hh, R + C, Dh) each
        k = _put(cache.keys[layer], idx, k_new, ok, 2)  # (B, Hh, R + P, Dh)
        v = _put(cache.values[layer], idx, v_new, ok, 2)  # (B, Hh, R + P, Dh)
        h = block.finish(h, q, k, v)  # (B, R + C, D) over all R + P keys
        keys.append(k)
        values.append(v)
        hidden.append(_put(cache.hidden[layer], idx, h, ok, 1))  # (B, R + P, D)
    return tower.head(hidden[-1]), VisionCache(images, keys, values, hidden), changed


def reuse_forward_ref(tower, images: Tensor, cache: VisionCache, threshold: float) -> Tensor:
    """Slow twin of :func:`reuse_forward` with a cache: sample by sample, token by token
    (the prefix tokens, then each patch any of whose pixels moved) -> features (B, P, D)."""
    out = []
    s, r = tower.patch_size, tower.num_prefix
    for i in range(images.shape[0]):
        pix = (images[i] - cache.images[i]).abs().amax(0)  # (H, W)
        side = pix.shape[0] // s
        moved = [pix[a * s:(a + 1) * s, c * s:(c + 1) * s].max() > threshold
                 for a in range(side) for c in range(side)]
        last = cache.hidden[-1][i].clone()  # (R + P, D)
        if any(moved):
            x = tower.stem(images[i:i + 1])[0]  # (R + P, D)
            rows = list(range(r)) + [r + j for j, m in enumerate(moved) if m]
            hid = {j: x[j] for j in rows}
            for layer, block in enumerate(tower.feature_blocks):
                k, v = cache.keys[layer][i].clone(), cache.values[layer][i].clone()  # (Hh,N,Dh)
                qs = {}
                for j in rows:
                    q1, k1, v1 = block.attention_inputs(hid[j][None, None])  # (1, Hh, 1, Dh)
                    k[:, j], v[:, j], qs[j] = k1[0, :, 0], v1[0, :, 0], q1
                hid = {j: block.finish(hid[j][None, None], qs[j], k[None], v[None])[0, 0]
                       for j in rows}
            for j in rows:
                last[j] = hid[j]
        out.append(tower.head(last[None])[0])
    return torch.stack(out)  # (B, P, D)


class VisionReuse:
    """The episode's caches, one per camera, and the changed share of each call: a model
    with ``vision.reuse`` holds one and encodes its current frames through
    :meth:`encoder_for` at inference (training always runs the full tower)."""

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError(f"vision.reuse_threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.caches: dict[tuple[int, int], VisionCache] = {}  # by (camera, tower)
        self.changed: list[float] = []  # share of the patches computed, per call and camera

    def reset(self) -> None:
        """A new episode: forget every camera's previous frame."""
        self.caches.clear()

    def tower(self, tower, key) -> object:
        """``tower`` as a callable images -> features that reuses the cache under ``key``."""
        def run(images: Tensor) -> Tensor:
            feats, self.caches[key], changed = reuse_forward(
                tower, images, self.caches.get(key), self.threshold)
            self.changed.append(float(changed.float().mean()))
            return feats  # (B, P, D)
        return run

    def encoder_for(self, encoder, camera: int):
        """An :class:`~memvla.layers.vision.ImageEncoder` like ``encoder`` whose towers
        (one, or the parallel family's fused pair) reuse camera ``camera``'s unchanged
        patches."""
        from .vision_drop import towers_of

        runs = [self.tower(t, (camera, i)) for i, t in enumerate(towers_of(encoder.vision))]
        if len(runs) == 1:
            return replace(encoder, vision=runs[0])
        return replace(encoder, vision=lambda images: torch.cat([run(images) for run in runs],
                                                                -1))  # (B, P, ΣD)


def make_vision_reuse(vision_cfg, context) -> VisionReuse | None:
    """The reuse a model with ``vision_cfg`` holds (None with ``vision.reuse`` off)."""
    if not vision_cfg.reuse:
        return None
    if getattr(getattr(context, "cfg", None), "frames_mode", None) == "mem":
        raise ValueError("vision.reuse encodes the current frame on its own, "
                         "context.frames_mode='mem' encodes it with its history: use one")
    return VisionReuse(vision_cfg.reuse_threshold)


def current_frame_encoder(reuse: VisionReuse | None, training: bool, encoder, camera: int):
    """The encoder of camera ``camera``'s current frame: ``encoder`` itself in training or
    without reuse, else the one that reuses the previous frame's unchanged patches."""
    return encoder if reuse is None or training else reuse.encoder_for(encoder, camera)
