"""``TokenSegment``: a run of tokens with the flags the block attention mask is built from.

A sequence (a prefix, a suffix) is assembled from segments: images, language, state,
memory tokens, actions. Each carries embeddings (B, N, D), real-token flags ``pad``
(B, N) bool (False = padding), block flags ``flags`` (B, N) (1 starts a new attention block,
see :mod:`memvla.layers.masks`) and optionally ``sees_all`` (B, N) bool: such tokens (the
SmolVLA-Memory tokens) attend to every real token of their sequence whatever the blocks,
while others still see them by the block rule. ``positions`` (B, N) long, optional: explicit
RoPE positions counted from the start of the sequence, which may have gaps (pruned image
tokens keep their original positions); None = counted from ``pad`` (padding does not
advance them). Segments are concatenated with all or none of them explicit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenSegment:
    embs: Tensor
    pad: Tensor
    flags: Tensor
    sees_all: Tensor | None = None
    positions: Tensor | None = None

    @property
    def length(self) -> int:
        return self.embs.shape[1]

    @staticmethod
    def cat(parts: list[TokenSegment]) -> TokenSegment:
        sees = positions = None
        explicit = [p.positions is not None for p in parts]
        if any(explicit) and not all(explicit):
            raise ValueError(f"TokenSegment.cat: explicit positions on {sum(explicit)} of "
                             f"{len(parts)} parts; give every part positions or none")
        if all(explicit):
            positions = torch.cat([p.positions for p in parts], 1)  # (B, N)
        if any(p.sees_all is not None for p in parts):
            sees = torch.cat([p.sees_all if p.sees_all is not None
                              else torch.zeros_like(p.pad) for p in parts], 1)  # (B, N)
        return TokenSegment(torch.cat([p.embs for p in parts], 1),  # (B, N, D)
                            torch.cat([p.pad for p in parts], 1),  # (B, N)
                            torch.cat([p.flags for p in parts], 1),  # (B, N)
                            sees, positions)

    @staticmethod
    def full(embs: Tensor, first_flag: int, rest_flag: int,
             sees_all: bool = False) -> TokenSegment:
        """All tokens real; the first has block flag ``first_flag``, the rest ``rest_flag``."""
        b, n, _ = embs.shape
        flags = torch.full((b, n), rest_flag, dtype=torch.long, device=embs.device)
        flags[:, 0] = first_flag
        pad = torch.ones(b, n, dtype=torch.bool, device=embs.device)
        return TokenSegment(embs, pad, flags, pad.clone() if sees_all else None)

    def query_blocks(self, blocks: Tensor) -> Tensor:
        """Block ids for the query side: ``sees_all`` tokens get a block above every key."""
        if self.sees_all is None:
            return blocks
        return torch.where(self.sees_all, torch.iinfo(blocks.dtype).max, blocks)
