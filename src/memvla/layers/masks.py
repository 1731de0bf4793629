"""Block attention masks from per-token block flags.

A flag of 1 starts a new block. Token i may attend token j iff
``cumsum(flags)[j] <= cumsum(flags)[i]`` and both are real (not padding). All-zero flags
give full bidirectional attention; all-one flags give a causal mask.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_mask(flags: Tensor, pad: Tensor | None = None) -> Tensor:
    """Boolean (B, N, N) mask, True where query i may attend key j.

    flags: (B, N) int or bool, 1 where a new block starts; pad: (B, N) bool, True for real
    tokens (False = padding).
    """
    if flags.dim() != 2:
        raise ValueError(f"block_mask: flags must be (B, N), got shape {tuple(flags.shape)}")
    if pad is not None and pad.shape != flags.shape:
        raise ValueError(
            f"block_mask: pad must have the shape of flags {tuple(flags.shape)}, "
            f"got {tuple(pad.shape)}"
        )
    block = torch.cumsum(flags.long(), dim=1)  # (B, N)
    mask = block[:, None, :] <= block[:, :, None]  # (B, N, N)
    if pad is not None:
        mask = mask & pad[:, None, :] & pad[:, :, None]
    return mask


def block_mask_ref(flags: Tensor, pad: Tensor | None = None) -> Tensor:
    """Loop twin of :func:`block_mask`, for tests."""
    b, n = flags.shape
    out = torch.zeros(b, n, n, dtype=torch.bool)
    for bi in range(b):
        blocks = []
        total = 0
        for f in flags[bi].tolist():
            total += int(f)
            blocks.append(total)
        for i in range(n):
            for j in range(n):
                ok = blocks[j] <= blocks[i]
                if pad is not None:
                    ok = ok and bool(pad[bi, i]) and bool(pad[bi, j])
                out[bi, i, j] = ok
    return out


def positions_from_pad(pad: Tensor, offset: Tensor | int = 0) -> Tensor:
    """Integer positions (B, N) = offset + cumsum(pad) - 1: padding does not advance them."""
    return offset + torch.cumsum(pad.long(), dim=1) - 1


def block_mask_between(q_block: Tensor, q_pad: Tensor, k_block: Tensor, k_pad: Tensor) -> Tensor:
    """Mask (B, N, L) for queries and keys given their cumulative block ids and pad flags
    (the keys may be cached tokens): query i sees key j iff block[j] <= block[i]."""
    mask = k_block[:, None, :] <= q_block[:, :, None]  # (B, N, L)
    return mask & k_pad[:, None, :] & q_pad[:, :, None]
