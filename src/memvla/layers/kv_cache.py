"""An explicit key/value cache for a stack of attention layers.

The cache holds, for every layer, keys and values ``(B, Hkv, L, Dh)`` (keys already
rotated by RoPE) and, shared across layers, which cached keys are real tokens
(``key_pad``, (B, L) bool) and their block ids (``key_block``, (B, L)) so that later
queries can build their masks. It is appended to by a prefill, read without being
changed by the denoising steps, cropped or windowed by temporal-context strategies, and
detached when state is carried across steps.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int):
        if num_layers <= 0:
            raise ValueError(f"KVCache: num_layers must be > 0, got {num_layers}")
        self.num_layers = num_layers
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.key_pad: Tensor | None = None  # (B, L) bool, True for real tokens
        self.key_block: Tensor | None = None  # (B, L) long, cumulative block ids
        self.key_pos: Tensor | None = None  # (B, L) long, RoPE positions of the keys
        # a recurrent backbone's state (Mamba: one per layer), continued by the prefill
        self.recurrent: list | None = None

    # -- writing ---------------------------------------------------------------------------
    def append_tokens(self, pad: Tensor, block: Tensor, positions: Tensor) -> None:
        """Record the per-token metadata of tokens about to be appended by every layer."""
        self.key_pad = pad if self.key_pad is None else torch.cat([self.key_pad, pad], 1)
        self.key_block = block if self.key_block is None else torch.cat([self.key_block, block], 1)
        self.key_pos = (
            positions if self.key_pos is None else torch.cat([self.key_pos, positions], 1)
        )

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values (B, Hkv, N, Dh) of ``layer``; returns the full (…, L, Dh)."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)  # (B, Hkv, L, Dh)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)  # (B, Hkv, L, Dh)
        return self.keys[layer], self.values[layer]

    # -- reading ---------------------------------------------------------------------------
    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is None:
            raise RuntimeError(f"KVCache: layer {layer} is empty; run the prefix first")
        return self.keys[layer], self.values[layer]

    def __len__(self) -> int:
        """Number of cached token positions (L)."""
        return 0 if self.key_pad is None else self.key_pad.shape[1]

    @property
    def is_empty(self) -> bool:
        return self.key_pad is None

    def next_position(self) -> Tensor:
        """(B, 1) the position after the last real cached token: its largest position + 1
        (0 with no real token). Without gaps in the positions this is ``key_pad.sum(1)``;
        with gaps (pruned tokens keep their original positions) it still continues them."""
        if self.is_empty:
            raise RuntimeError("KVCache: empty; run the prefix first")
        real_pos = torch.where(self.key_pad, self.key_pos, torch.full_like(self.key_pos, -1))
        return real_pos.max(1, keepdim=True).values + 1  # (B, 1)

    # -- editing ---------------------------------------------------------------------------
    def _slice(self, sl: slice) -> None:
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][:, :, sl]
                self.values[i] = self.values[i][:, :, sl]
        self.key_pad = self.key_pad[:, sl]
        self.key_block = self.key_block[:, sl]
        self.key_pos = self.key_pos[:, sl]

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (drop what was appended after them)."""
        if length < 0:
            raise ValueError(f"KVCache.crop: length must be >= 0, got {length}")
        if not self.is_empty:
            self._slice(slice(0, length))

    def keep_last(self, length: int) -> None:
        """Keep the last ``length`` positions: a sliding window over the cached tokens."""
        if length <= 0:
            raise ValueError(f"KVCache.keep_last: length must be > 0, got {length}")
        if not self.is_empty and len(self) > length:
            self._slice(slice(len(self) - length, None))

    def reset(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.key_pad = self.key_block = self.key_pos = None

    def repeat_interleave(self, k: int) -> KVCache:
        """A cache whose batch repeats each of this one's rows ``k`` times (B·k, ...): one
        prefix read by k samples (e.g. K noise draws of one observation)."""
        if self.recurrent is not None:
            raise ValueError("KVCache.repeat_interleave: a recurrent backbone's state is not "
                             "repeated here")
        out = KVCache(self.num_layers)
        out.keys = [None if t is None else t.repeat_interleave(k, 0) for t in self.keys]
        out.values = [None if t is None else t.repeat_interleave(k, 0) for t in self.values]
        out.key_pad, out.key_block, out.key_pos = (
            None if t is None else t.repeat_interleave(k, 0)
            for t in (self.key_pad, self.key_block, self.key_pos))
        return out

    def detach(self) -> KVCache:
        """Cut the autograd graph in place (state carried across steps); returns self."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i].detach()
                self.values[i] = self.values[i].detach()
        return self
