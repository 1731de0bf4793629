"""An associative memory written by the delta rule (ARMT-style), behind memory tokens.

The carried state is a matrix A (B, D, K) that maps unit keys (K) to values (D). What the
memory tokens write (B, M, D) is stored token by token with the delta rule: a key
k = unit(W_k h), a value v = W_v h and a strength β = sigmoid(w_β · h) per token, and

    A ← A + β (v − A k) kᵀ

so that A k moves a share β of the way to v (a key stored again overwrites its value
instead of adding to it, and with unit keys A's gain along any key stays within the
values' norm however many writes). The next prefix reads M memory tokens as the initial
memory plus A q_m for M learned unit queries q_m.

ARMT keeps one such matrix per layer and adds its read to every token's hidden state;
here there is one, at the memory tokens' read and write (the rest of the policy's memory
path is unchanged), which is what the context interface can hold without touching the
backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def delta_write(assoc: Tensor, keys: Tensor, values: Tensor, beta: Tensor) -> Tensor:
    """Store ``values`` (B, M, D) under unit ``keys`` (B, M, K) with strengths ``beta``
    (B, M) in ``assoc`` (B, D, K), one token after the other. Returns (B, D, K)."""
    for m in range(keys.shape[1]):
        k, v = keys[:, m], values[:, m]  # (B, K), (B, D)
        error = v - torch.einsum("bdk,bk->bd", assoc, k)  # (B, D)
        assoc = assoc + beta[:, m, None, None] * error[:, :, None] * k[:, None, :]  # (B,D,K)
    return assoc


def delta_write_reference(assoc: Tensor, keys: Tensor, values: Tensor, beta: Tensor) -> Tensor:
    """Loop twin of :func:`delta_write` (sample by sample, matrix-vector), for tests."""
    out = assoc.clone()
    for b in range(assoc.shape[0]):
        for m in range(keys.shape[1]):
            k = keys[b, m]
            out[b] = out[b] + beta[b, m] * torch.outer(values[b, m] - out[b] @ k, k)
    return out


def associative_read(assoc: Tensor, queries: Tensor) -> Tensor:
    """``assoc`` (B, D, K) read at ``queries`` (M, K) -> (B, M, D)."""
    return torch.einsum("bdk,mk->bmd", assoc, queries)


class AssociativeMemory(nn.Module):
    """The projections of :func:`delta_write` and the read queries, for M tokens of width
    D and a key space of K dimensions."""

    def __init__(self, num_tokens: int, width: int, key_dim: int, beta_bias: float = 0.0):
        super().__init__()
        self.key_dim = key_dim
        self.key = nn.Linear(width, key_dim, bias=False)
        self.value = nn.Linear(width, width, bias=False)
        self.beta = nn.Linear(width, 1)
        nn.init.constant_(self.beta.bias, beta_bias)
        self.queries = nn.Parameter(torch.randn(num_tokens, key_dim))

    def initial(self, batch: int, like: Tensor) -> Tensor:
        """The empty memory (B, D, K) in ``like``'s dtype and device."""
        return like.new_zeros(batch, self.value.out_features, self.key_dim)

    def read(self, assoc: Tensor) -> Tensor:
        return associative_read(assoc, F.normalize(self.queries, dim=-1).to(assoc.dtype))

    def write(self, assoc: Tensor, written: Tensor) -> Tensor:
        """``assoc`` (B, D, K) with the written memory tokens (B, M, D) stored."""
        written = written.to(assoc.dtype)
        keys = F.normalize(self.key(written), dim=-1)  # (B, M, K)
        beta = torch.sigmoid(self.beta(written))[..., 0]  # (B, M)
        return delta_write(assoc, keys, self.value(written), beta)

    def extra_repr(self) -> str:
        return f"key_dim={self.key_dim}"
