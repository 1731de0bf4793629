"""Grouped-query attention through ``scaled_dot_product_attention``.

``scaled_attention`` is the fast path; ``scaled_attention_ref`` is its slow twin (explicit
softmax, key/value heads repeated), compared in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kv_cache import KVCache
from .rope import apply_rope


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> None:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {q.shape[1]} query heads not a multiple of {k.shape[1]}")
    want = (q.shape[0], q.shape[2], k.shape[2])
    if tuple(mask.shape) != want:
        raise ValueError(f"attention: mask must be (B, N, L) = {want}, got {tuple(mask.shape)}")


def _never_empty(mask: Tensor) -> Tensor:
    # A query with no visible key (a padding token) would give NaN; let it see every key.
    # Its output is never read, and this keeps gradients finite.
    return mask | ~mask.any(dim=-1, keepdim=True)


# ``enable_gqa`` (key/value heads shared by groups of query heads without copies) came with
# torch 2.5; older releases get the key/value heads repeated instead.
SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def scaled_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q (B, Hh, N, Dh), k/v (B, Hkv, L, Dh), mask (B, N, L) bool -> (B, Hh, N, Dh)."""
    _check(q, k, v, mask)
    mask = _never_empty(mask)[:, None]  # (B, 1, N, L)
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1),
                                          v.repeat_interleave(rep, dim=1), attn_mask=mask)


def scaled_attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Slow twin of :func:`scaled_attention` (float32 softmax, heads repeated)."""
    _check(q, k, v, mask)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)  # (B, Hh, L, Dh)
    v = v.repeat_interleave(rep, dim=1)  # (B, Hh, L, Dh)
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, Hh, N, L)
    scores = scores.masked_fill(~_never_empty(mask)[:, None], float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)  # (B, Hh, N, Dh)


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)  # (B, H, N, Dh)


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, H*Dh)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (q_proj/k_proj/v_proj/o_proj, Llama naming).

    ``kv_in_dim`` sets the input width of k_proj/v_proj when they read something other
    than this layer's hidden states (the action expert's cross-attention layers read the
    backbone's keys and values).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int,
                 kv_in_dim: int | None = None, bias: bool = False):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"Attention: heads ({heads}) must be a multiple of kv_heads "
                             f"({kv_heads})")
        kv_in = dim if kv_in_dim is None else kv_in_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_in, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_in, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries (B, Hh, N, Dh), rotated keys and values (B, Hkv, N, Dh)."""
        q = apply_rope(split_heads(self.q_proj(x), self.heads), cos, sin)  # (B, Hh, N, Dh)
        k = apply_rope(split_heads(self.k_proj(x), self.kv_heads), cos, sin)  # (B, Hkv, N, Dh)
        v = split_heads(self.v_proj(x), self.kv_heads)  # (B, Hkv, N, Dh)
        return q, k, v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache: KVCache | None = None, layer: int = 0,
                past: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Self-attention of x (B, N, D). With ``cache`` the new keys/values are appended
        to it and the queries see everything cached; with ``past`` they are prepended
        without storing (a read-only cache). mask: (B, N, L) over the key sequence."""
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, Hkv, L, Dh)
        elif past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, Hkv, L, Dh)
            v = torch.cat([past[1], v], dim=2)  # (B, Hkv, L, Dh)
        return self.o_proj(merge_heads(scaled_attention(q, k, v, mask)))  # (B, N, D)

    def cross(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
              src_k: Tensor, src_v: Tensor) -> Tensor:
        """Cross-attention: queries from x, keys/values projected from another stack's
        keys/values src_k/src_v (B, Hkv', L, Dh') flattened over heads. No RoPE is applied
        to the projected keys (the source keys carry their positions already)."""
        q = apply_rope(split_heads(self.q_proj(x), self.heads), cos, sin)  # (B, Hh, N, Dh)
        k = split_heads(self.k_proj(merge_heads(src_k)), self.kv_heads)  # (B, Hkv, L, Dh)
        v = split_heads(self.v_proj(merge_heads(src_v)), self.kv_heads)  # (B, Hkv, L, Dh)
        return self.o_proj(merge_heads(scaled_attention(q, k, v, mask)))  # (B, N, D)
