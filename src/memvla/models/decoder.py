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
from ..layers.norm import RMSNorm
from ..layers.rope import rope_cos_sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, kv_in_dim: int | None = None):
        super().__init__()
        self.self_attn = Attention(cfg.width, cfg.heads, cfg.kv_heads, cfg.head_dim,
                                   kv_in_dim=kv_in_dim)
        self.mlp = GatedMLP(cfg.width, cfg.mlp_dim, cfg.act)
        self.input_layernorm = RMSNorm(cfg.width, cfg.rms_eps, cfg.norm_unit_offset)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.rms_eps, cfg.norm_unit_offset)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache: KVCache | None = None, layer: int = 0,
                past: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Self-attention block (see :meth:`Attention.forward` for cache / past)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, past)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cross(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                      src_k: Tensor, src_v: Tensor) -> Tensor:
        """Cross-attention block over another stack's keys/values."""
        x = x + self.self_attn.cross(self.input_layernorm(x), cos, sin, mask, src_k, src_v)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        self.norm = RMSNorm(cfg.width, cfg.rms_eps, cfg.norm_unit_offset)

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
        return self.norm(x) if final_norm else x
