"""Mamba as the flow-matching VLA's backbone (RoboMamba, ``model.backbone=mamba``).

The prefix (image, language and state tokens) runs through a Mamba stack
(:class:`memvla.models.mamba.MambaBackbone`, Hugging Face's names) that continues the
recurrent state it is given: with ``context.kind=ssm_state`` that is the state the
previous chunk left (the whole episode so far, at a fixed size); without, zeros. The action
expert reads the step's prefix as it reads a transformer's KV cache: each Mamba layer's
output is projected to keys and values (``kv_proj.{i}``, the geometry of ``model.text``:
``kv_heads × head_dim``, keys rotated by RoPE at the prefix positions) for the expert layer
beside it.

A Mamba layer is causal and has no mask, so the prefix's padding (a short prompt) is moved
after the sequence's real tokens for the scan (and back for the outputs): padding changes
neither the convolution nor the SSM state, and a sample of a padded batch gets what it
gets alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..configs import FlowVLAConfig
from ..layers.kv_cache import KVCache
from ..layers.rope import apply_rope, rope_cos_sin
from ..layers.tokens import TokenSegment
from .mamba import MambaBackbone, MambaConfig


def mamba_config(cfg: FlowVLAConfig) -> MambaConfig:
    """The Mamba stack of a flow VLA config: ``model.text``'s width, depth and vocabulary,
    ``model.mamba``'s state size, convolution, expansion and kernels."""
    t, m = cfg.text, cfg.mamba
    return MambaConfig(d_model=t.width, n_layer=t.depth, d_state=m.d_state, d_conv=m.d_conv,
                       expand=m.expand, dt_rank=m.dt_rank, vocab_size=t.vocab_size,
                       rms_eps=t.rms_eps, kernels=m.kernels)


def real_first(pad: Tensor) -> Tensor:
    """The permutation (B, N) that puts each row's real tokens first, in order."""
    n = pad.shape[1]
    key = (~pad).long() * n + torch.arange(n, device=pad.device)  # (B, N)
    return key.argsort(1)  # (B, N)


class MambaTextModel(nn.Module):
    """``backbone`` (the Mamba stack) + ``kv_proj`` (keys and values for the expert)."""

    def __init__(self, cfg: FlowVLAConfig):
        super().__init__()
        t = cfg.text
        self.cfg = t
        self.backbone = MambaBackbone(mamba_config(cfg))
        self.kv_proj = nn.ModuleList(nn.Linear(t.width, 2 * t.kv_heads * t.head_dim,
                                               bias=False) for _ in range(t.depth))

    @property
    def norm(self):
        return self.backbone.norm_f

    def embed(self, ids: Tensor) -> Tensor:
        return self.backbone.embed(ids)  # (B, N, D)

    def init_states(self, batch: int, device=None):
        return self.backbone.init_states(batch, device)

    def prefill(self, prefix: TokenSegment, pos: Tensor, block: Tensor, cache: KVCache,
                final_norm: bool = True) -> Tensor:
        """Run the stack over the prefix (B, Np, D) from ``cache.recurrent`` (the layers'
        states; zeros when None), leaving there the states after it and appending the
        keys/values of every layer -> hidden (B, Np, D) (before norm_f with
        ``final_norm=False``)."""
        if not cache.is_empty:
            raise ValueError("model.backbone='mamba' carries the episode in its recurrent "
                             "state, not in a KV cache of earlier turns")
        b, n, _ = prefix.embs.shape
        order = real_first(prefix.pad)  # (B, Np)
        back = order.argsort(1)  # (B, Np) the inverse permutation

        def gather(x: Tensor, idx: Tensor) -> Tensor:
            return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))

        outputs: list[Tensor] = []
        hidden, cache.recurrent = self.backbone(
            gather(prefix.embs, order), cache.recurrent, final_norm=final_norm,
            mask=prefix.pad.gather(1, order), layer_outputs=outputs)  # (B, Np, D)
        cache.append_tokens(prefix.pad, block, pos)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_base)  # (B, Np, Dh)
        h, dh = self.cfg.kv_heads, self.cfg.head_dim
        for i, out in enumerate(outputs):
            kv = self.kv_proj[i](gather(out, back).to(self.kv_proj[i].weight.dtype))
            k, v = kv.view(b, n, 2, h, dh).permute(2, 0, 3, 1, 4)  # (B, Hkv, Np, Dh) each
            cache.append(i, apply_rope(k, cos, sin), v)
        return gather(hidden, back)  # (B, Np, D) in the prefix's order
