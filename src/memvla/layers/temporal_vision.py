"""MEM's space-time separable video encoder: a short frame history through one ViT.

The T frames of a history (oldest first, the current frame last) go through the *same*
:class:`~memvla.layers.vision.VisionTransformer` weights. Every layer attends over the
patches of each frame as usual; every ``temporal_every``-th layer (layers k, 2k, ... counted
from 1) additionally attends causally across time between the tokens of the same patch
position, each frame seeing itself and the earlier frames. Only the current frame's patch
features leave the tower, so a VLA's prefix is as long as with one image.

A temporal layer keeps the layer's pre-LayerNorm residual form and its own modules; it adds
no parameter. With ``z`` the layer input (B, T, P, D) and ``e`` the temporal embedding::

    h = layer_norm1(z + e)                     q, k, v = q_proj(h), k_proj(h), v_proj(h)
    v' = causal attention over T (per patch)   with q, k, v
    z = z + out_proj(attention over P (per frame) with q, k and the mixed values v')
    z = z + mlp(layer_norm2(z))

i.e. the spatial attention applied to the temporally attended values, one ``out_proj``.
The embedding ``e`` is fixed sinusoidal in the frame offset ``t - (T - 1)`` (sin on even
channels, ``cos - 1`` on odd ones), exactly zero for the current frame; it feeds the
queries/keys/values only, the residual stays ``z`` so it does not accumulate over layers.
A softmax over one key is the identity, so with one frame every layer is the plain ViT
layer: the encoder is the image encoder it wraps, and a pretrained ViT starts from itself.
The fast path then runs the ViT's own layers, so that equality holds bit for bit.

Past frames are computed with gradient. No layer above the last temporal one mixes frames,
so the past frames' tokens are dropped right after it.

These are the choices of MEM (Torne et al., 2026, appendix C) as LeRobot's π0.5 visual
memory implements them (temporal attention every 4th layer by default, the layer's own
projections reused, the composed attention above, the zero-at-present embedding). LeRobot
also masks frames from before the episode start; here every frame is taken as real (a
caller at an episode's start can repeat its first frame).

:func:`space_time_reference` is the slow twin (loops over frames and patches, explicit
softmax), compared in the tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .attention import merge_heads, scaled_attention, scaled_attention_ref, split_heads
from .vision import VisionAttention, VisionBlock, VisionTransformer


def temporal_embedding(frames: int, dim: int, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed sinusoidal embedding (T, D) of the frame offsets -(T-1) .. 0: row ``t`` holds
    ``sin(o·f_i)`` on channel 2i and ``cos(o·f_i) - 1`` on channel 2i+1 with
    ``o = t - (T - 1)`` and ``f_i = 10000^(-2i/D)``, so row T-1 (the current frame) is
    exactly zero. Computed in float32, then cast."""
    offsets = torch.arange(1 - frames, 1, device=device, dtype=torch.float32)  # (T,)
    freqs = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                      * (-math.log(10_000.0) / dim))  # (ceil(D/2),)
    angles = offsets[:, None] * freqs[None]  # (T, ceil(D/2))
    emb = torch.zeros(frames, dim, device=device, dtype=torch.float32)  # (T, D)
    emb[:, 0::2] = angles.sin()
    emb[:, 1::2] = (angles.cos() - 1.0)[:, : dim // 2]
    return emb.to(dtype)  # (T, D)


def causal_time_mask(frames: int, device: torch.device | str | None = None) -> Tensor:
    """(T, T) bool, True where frame t (row) may attend to frame s (column): s <= t."""
    return torch.ones(frames, frames, dtype=torch.bool, device=device).tril()  # (T, T)


def space_time_attention(attn: VisionAttention, h: Tensor, mask: Tensor) -> Tensor:
    """The composed attention of a temporal layer, with ``attn``'s projections.

    h (B, T, P, D) normed input, mask (T, T) bool over time -> (B, T, P, D): causal
    attention across T per patch position gives mixed values, then attention across P per
    frame reads them with the frame's own queries and keys."""
    b, t, p, d = h.shape
    flat = h.reshape(b * t, p, d)  # (B·T, P, D)
    q, k, v = (split_heads(proj(flat), attn.heads)  # (B·T, Hh, P, Dh)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    hh, dh = q.shape[1], q.shape[3]

    def over_time(x: Tensor) -> Tensor:  # (B·T, Hh, P, Dh) -> (B·P, Hh, T, Dh)
        return x.view(b, t, hh, p, dh).permute(0, 3, 2, 1, 4).reshape(b * p, hh, t, dh)

    time_mask = mask.expand(b * p, t, t)  # (B·P, T, T)
    qt, kt, vt = over_time(q), over_time(k), over_time(v)  # (B·P, Hh, T, Dh)
    mixed = scaled_attention(qt, kt, vt, time_mask)  # (B·P, Hh, T, Dh)
    mixed = mixed.view(b, p, hh, t, dh).permute(0, 3, 2, 1, 4).reshape(b * t, hh, p, dh)
    full = h.new_ones(b * t, p, p, dtype=torch.bool)  # (B·T, P, P)
    out = scaled_attention(q, k, mixed, full)  # (B·T, Hh, P, Dh)
    return attn.out_proj(merge_heads(out)).view(b, t, p, d)  # (B, T, P, D)


def space_time_block(layer: VisionBlock, z: Tensor, emb: Tensor, mask: Tensor) -> Tensor:
    """A temporal layer: z (B, T, P, D), emb (T, D), mask (T, T) -> (B, T, P, D)."""
    h = layer.layer_norm1(z + emb[:, None])  # (B, T, P, D)
    z = z + space_time_attention(layer.self_attn, h, mask)  # (B, T, P, D)
    return z + layer.mlp(layer.layer_norm2(z))  # (B, T, P, D)


def _check_every(vit: VisionTransformer, temporal_every: int) -> None:
    depth = len(vit.encoder.layers)
    if isinstance(temporal_every, bool) or not isinstance(temporal_every, int) \
            or not 1 <= temporal_every <= depth:
        raise ValueError(f"space-time vision: temporal_every must be an integer in 1..{depth} "
                         f"(the ViT's depth), got {temporal_every!r}")


def _check(vit: VisionTransformer, frames: Tensor, temporal_every: int) -> None:
    _check_every(vit, temporal_every)
    want = (vit.channels, vit.image_size, vit.image_size)
    if frames.dim() != 5 or tuple(frames.shape[2:]) != want:
        raise ValueError(f"space-time vision: frames must be (B, T, {want[0]}, {want[1]}, "
                         f"{want[2]}), got {tuple(frames.shape)}")
    if frames.shape[1] < 1:
        raise ValueError(f"space-time vision: frames must hold T >= 1 frames, got T = "
                         f"{frames.shape[1]}")


def is_temporal(layer: int, temporal_every: int) -> bool:
    """Whether layer ``layer`` (0-based) attends across time: layers k-1, 2k-1, ..."""
    return (layer + 1) % temporal_every == 0


def space_time_encode(vit: VisionTransformer, frames: Tensor, temporal_every: int) -> Tensor:
    """frames (B, T, C, H, W) in [-1, 1], oldest first -> the current (last) frame's patch
    features (B, P, D) after space-time attention in every ``temporal_every``-th layer."""
    _check(vit, frames, temporal_every)
    b, t = frames.shape[:2]
    z = vit.embeddings(frames.flatten(0, 1)).unflatten(0, (b, t))  # (B, T, P, D)
    layers = vit.encoder.layers
    last = max(i for i in range(len(layers)) if is_temporal(i, temporal_every)) if t > 1 else -1
    emb = temporal_embedding(t, z.shape[-1], z.device, z.dtype)  # (T, D)
    mask = causal_time_mask(t, z.device)  # (T, T)
    for i, layer in enumerate(layers):
        if i <= last and is_temporal(i, temporal_every):
            z = space_time_block(layer, z, emb, mask)  # (B, T, P, D)
            if i == last:
                z = z[:, -1:]  # (B, 1, P, D): nothing above mixes frames
        else:
            z = layer(z.flatten(0, 1)).unflatten(0, z.shape[:2])  # (B, T, P, D)
    return vit.post_layernorm(z[:, -1])  # (B, P, D)


def space_time_reference(vit: VisionTransformer, frames: Tensor, temporal_every: int) -> Tensor:
    """Slow twin of :func:`space_time_encode`: frame by frame, and patch by patch for the
    time attention (explicit softmax); every frame runs through every layer, and temporal
    layers run even with one frame."""
    _check(vit, frames, temporal_every)
    t = frames.shape[1]
    zs = [vit.embeddings(frames[:, s]) for s in range(t)]  # T × (B, P, D)
    for i, layer in enumerate(vit.encoder.layers):
        if not is_temporal(i, temporal_every):
            zs = [layer(z) for z in zs]
            continue
        attn = layer.self_attn
        emb = temporal_embedding(t, zs[0].shape[-1], zs[0].device, zs[0].dtype)  # (T, D)
        hs = [layer.layer_norm1(z + emb[s]) for s, z in enumerate(zs)]  # T × (B, P, D)
        qs, ks, vs = ([split_heads(proj(h), attn.heads) for h in hs]  # T × (B, Hh, P, Dh)
                      for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = []
        for s in range(t):
            mixed = torch.empty_like(vs[s])  # (B, Hh, P, Dh)
            for p in range(mixed.shape[2]):
                keys = torch.stack([ks[r][:, :, p] for r in range(s + 1)], 2)  # (B, Hh, s+1, Dh)
                vals = torch.stack([vs[r][:, :, p] for r in range(s + 1)], 2)  # (B, Hh, s+1, Dh)
                scores = (keys.float() @ qs[s][:, :, p, :, None].float())[..., 0]  # (B, Hh, s+1)
                w = (scores / qs[s].shape[-1] ** 0.5).softmax(-1)  # (B, Hh, s+1)
                mixed[:, :, p] = (w[..., None] * vals.float()).sum(2).to(mixed.dtype)
            full = hs[s].new_ones(hs[s].shape[0], hs[s].shape[1], hs[s].shape[1], dtype=bool)
            spatial = scaled_attention_ref(qs[s], ks[s], mixed, full)  # (B, Hh, P, Dh)
            z = zs[s] + attn.out_proj(merge_heads(spatial))  # (B, P, D)
            out.append(z + layer.mlp(layer.layer_norm2(z)))
        zs = out
    return vit.post_layernorm(zs[-1])  # (B, P, D)


class SpaceTimeVisionEncoder(nn.Module):
    """A view of ``vit`` as MEM's video encoder: the same modules and weights (``vit`` is
    this module's only child), no new parameter. frames (B, T, C, H, W) -> (B, P, D), the
    current (last) frame's patch features; with T = 1 exactly ``vit(frames[:, 0])``."""

    def __init__(self, vit: VisionTransformer, temporal_every: int = 4):
        super().__init__()
        _check_every(vit, temporal_every)
        self.vit = vit
        self.temporal_every = temporal_every

    @property
    def num_patches(self) -> int:
        return self.vit.num_patches

    def forward(self, frames: Tensor) -> Tensor:
        return space_time_encode(self.vit, frames, self.temporal_every)  # (B, P, D)
