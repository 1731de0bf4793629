"""A decoder stack of the Llama / SmolLM2 family (and Gemma, by configuration):
pre-RMSNorm blocks of grouped-query attention with RoPE and a gated MLP.
Module names follow Hugging Face's Llama: embed_tokens, layers.{i}.self_attn.{q,k,v,o}_proj,
layers.{i}.mlp.{gate,up,down}_proj, layers.{i}.input_layernorm,
layers.{i}.post_attention_layernorm, norm."""

from __future__ import annotations

from torch import Tensor, nn

from ..configs import DecoderConfig
from ..layers.attention import Attention
from ..layers.kv_cache import KVCache
from ..layers.mlp import GatedMLP
from ..layers.norm import AdaRMSNorm, RMSNorm, gated_residual
from ..layers.rope import rope_cos_sin


def make_norm(cfg: DecoderConfig) -> nn.Module:
    """The decoder's norm: RMSNorm, or with ``cond_dim`` π0.5's adaptive one."""
    if cfg.cond_dim:
        return AdaRMSNorm(cfg.width, cfg.cond_dim, cfg.rms_eps)
    return RMSNorm(cfg.width, cfg.rms_eps, cfg.norm_unit_offset)


def apply_norm(norm: nn.Module, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """-> (normed x, the gate of the residual it feeds: None for a plain norm)."""
    return norm(x, cond) if isinstance(norm, AdaRMSNorm) else (norm(x), None)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, kv_in_dim: int | None = None):
        super().__init__()
        self.self_attn = Attention(cfg.width, cfg.heads, cfg.kv_heads, cfg.head_dim,
                                   kv_in_dim=kv_in_dim)
        self.mlp = GatedMLP(cfg.width, cfg.mlp_dim, cfg.act)
        self.input_layernorm = make_norm(cfg)
        self.post_attention_layernorm = make_norm(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache: KVCache | None = None, layer: int = 0,
                past: tuple[Tensor, Tensor] | None = None, cond: Tensor | None = None
                ) -> Tensor:
        """Self-attention block (see :meth:`Attention.forward` for cache / past; ``cond``
        (B, Dc): the condition of adaptive norms)."""
        return self._block(x, cond, lambda h: self.self_attn(h, cos, sin, mask, cache, layer,
                                                             past))

    def forward_cross(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                      src_k: Tensor, src_v: Tensor, cond: Tensor | None = None) -> Tensor:
        """Cross-attention block over another stack's keys/values."""
        return self._block(x, cond, lambda h: self.self_attn.cross(h, cos, sin, mask, src_k,
                                                                   src_v))

    def _block(self, x: Tensor, cond: Tensor | None, attend) -> Tensor:
        """Pre-norm attention (``attend``: normed x -> its output) and MLP, each added to
        the residual (gated after adaptive norms)."""
        h, gate = apply_norm(self.input_layernorm, x, cond)
        x = gated_residual(x, attend(h), gate)
        h, gate = apply_norm(self.post_attention_layernorm, x, cond)
        return gated_residual(x, self.mlp(h), gate)


class Decoder(nn.Module):
    """Token embeddings (optional: vocab_size 0 has none), layers, final norm.

    ``forward`` takes embeddings, not ids, so that images, state and memory tokens can be
    mixed into the sequence; :meth:`embed` maps ids to embeddings.
    """

    def __init__(self, cfg: DecoderConfig, kv_in_dims: list[int | None] | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width) if cfg.vocab_size else None
        dims = kv_in_dims or [None] * cfg.depth
        self.layers = nn.ModuleList(DecoderLayer(cfg, d) for d in dims)
        self.norm = make_norm(cfg)

    def embed(self, ids: Tensor) -> Tensor:
        if self.embed_tokens is None:
            raise RuntimeError("this decoder has no token embeddings (vocab_size = 0)")
        return self.embed_tokens(ids)  # (B, N, D)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_base)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor,
                cache: KVCache | None = None, final_norm: bool = True) -> Tensor:
        """x (B, N, D), positions (B, N), mask (B, N, L) -> normed hidden states (B, N, D)
        (the residual stream before the final norm with ``final_norm=False``).
        With ``cache`` every layer appends its keys/values (L = cached + N)."""
        cos, sin = self.rope(positions)  # (B, N, Dh)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.final_norm(x) if final_norm else x

    def final_norm(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return apply_norm(self.norm, x, cond)[0]
