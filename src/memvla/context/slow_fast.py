"""StreamVLN's slow-fast context: recent turns in the backbone's KV cache (fast), pooled
frames of older turns in the prefix (slow).

A turn is one predicted chunk. The carried state is

- ``cache``: the keys and values of the previous turns of the window, per backbone layer
  (B, Hkv, L, Dh), with their real-token flags, block ids and RoPE positions (B, L) and
  the turn each key belongs to (``turn_of_key``, (B, L)); each new turn's prefix is
  appended to it and attends to all of it, and so does the action expert;
- ``frames``: every past turn's prepared images per camera, in buffers
  (B, capacity ≥ T, C, S, S) that double when full, from which the slow memory samples
  (it grows with the episode, as StreamVLN's list of past frames does);
- ``turn``: the turns done.

Window (``context.window``, over ``context.num_turns`` turns): ``reset`` empties the cache
after every ``num_turns`` turns (StreamVLN's schedule, which restarts positions), ``slide``
evicts the oldest turn so that a turn sees at most ``num_turns - 1`` earlier ones;
``num_turns = 0`` keeps the whole episode (the full-history baseline, whose cost grows).
Slow memory: the frames of turns ``history_indices(t0, num_history)`` (StreamVLN's
``slice(0, t0, max(t0 // num_history, 1))``, at most ``num_history``) with t0 the first
turn of the window, encoded by the model's image tower, 2-D pooled
(:func:`memvla.layers.pooling.pool_grid`) and put before the current prefix. StreamVLN
samples every past frame; here the frames the policy saw when it predicted (one per turn),
which training sees as well (episodes are trained turn by turn, the cache carried with
truncated back-propagation).

Voxel pruning (``context.voxel_size``, :mod:`memvla.layers.voxel`): the policy adds each
turn's camera geometry to the state it gives the model (``geometry``: the world points of
the slow-token patch centres, (B, T', 3), and whether each exists); the state keeps them
per turn (``points``, ``points_valid``), and the slow memory keeps, over its frames, the
newest token per voxel (the others are masked: padding of the prefix). The counts of the
last prefix are in :attr:`SlowFastContext.last_memory` (``tokens`` before, ``kept`` after).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..configs import ContextConfig
from ..layers.kv_cache import KVCache
from ..layers.pooling import pool_grid, pooled_side
from ..layers.tokens import TokenSegment
from ..layers.voxel import VoxelPruner
from .base import TemporalContext
from .history import history_indices


class SlowFastContext(TemporalContext):
    kind = "slow_fast"

    def __init__(self, cfg: ContextConfig, width: int):
        super().__init__()
        self.cfg = cfg
        self.voxel = None if cfg.voxel_size is None else VoxelPruner(cfg.voxel_size)
        self.last_memory: dict[str, Tensor] = {}  # slow tokens of the last prefix (B,) each

    @property
    def recurrent(self) -> bool:
        return True

    @property
    def keeps_cache(self) -> bool:
        return True

    def initial_state(self, batch: int) -> dict:
        state = {"cache": None, "frames": None, "turn": 0}
        if self.voxel is not None:  # each turn's slow-token points (B, T, T', 3), valid
            state.update(points=None, points_valid=None)
        return state

    def memory_grid(self, tokens_per_image: int) -> int:
        """The side of a slow-memory frame's token grid (the pooled image-token grid)."""
        return pooled_side(math.isqrt(tokens_per_image), self.cfg.pool_stride)

    # -- fast: the cache of the window's turns ----------------------------------------------
    def prefix_cache(self, state: dict) -> KVCache | None:
        """The previous turns' cache to append this turn's prefix to (None: an empty one)."""
        c = state["cache"]
        if c is None:
            return None
        cache = KVCache(len(c["keys"]))
        cache.keys, cache.values = list(c["keys"]), list(c["values"])
        cache.key_pad, cache.key_block, cache.key_pos = c["pad"], c["block"], c["pos"]
        return cache

    def window_start(self, turn: int) -> int:
        """The first turn whose keys turn ``turn`` sees in the cache."""
        n = self.cfg.num_turns
        if n == 0:
            return 0
        return turn - turn % n if self.cfg.window == "reset" else max(0, turn - n + 1)

    def update(self, state: dict, hidden: Tensor, cache: KVCache | None = None,
               images: list[Tensor] | None = None) -> dict:
        """The next turn's state: this turn's keys join the cache (the window applied for
        the next turn) and its images the slow memory's frames."""
        turn = state["turn"]
        old = state["cache"]
        new_keys = len(cache) - (0 if old is None else old["pad"].shape[1])
        here = torch.full_like(cache.key_pad[:, -new_keys:], turn, dtype=torch.long)  # (B, n)
        turn_of_key = here if old is None else torch.cat([old["turn_of_key"], here], 1)
        kept = {"keys": cache.keys, "values": cache.values, "pad": cache.key_pad,
                "block": cache.key_block, "pos": cache.key_pos, "turn_of_key": turn_of_key}
        first = self.window_start(turn + 1)
        if first > turn:  # a new window: an empty cache
            kept = None
        elif first > 0:  # evict the turns before the window (the same for every sample)
            cut = int((turn_of_key[0] < first).sum())
            kept = {k: ([t[:, :, cut:] for t in v] if isinstance(v, list) else v[:, cut:])
                    for k, v in kept.items()}
        out = {"cache": kept, "frames": self._append(state["frames"], images, turn),
               "turn": turn + 1}
        if self.voxel is not None:
            geometry = state.get("geometry")
            if geometry is None:
                raise ValueError("context.voxel_size: the state has no 'geometry' of this "
                                 "turn (the policy adds it from observation.depth / pose / "
                                 "intrinsics)")
            out["points"], out["points_valid"] = self._append(
                [state["points"], state["points_valid"]] if state["points"] is not None
                else None, [geometry["points"], geometry["valid"]], turn)
        return out

    @staticmethod
    def _append(frames: list[Tensor] | None, images: list[Tensor], turn: int) -> list[Tensor]:
        """Write this turn's images at index ``turn`` of per-camera buffers
        (B, capacity, C, S, S) that double when full: appending costs O(1) amortised (a
        copy of the whole past at every turn would grow with the episode)."""
        if frames is None:
            frames = [img[:, None].repeat_interleave(8, 1) for img in images]  # (B, 8, ...)
        out = []
        for buf, img in zip(frames, images, strict=True):
            if turn >= buf.shape[1]:
                buf = torch.cat([buf, torch.empty_like(buf)], 1)  # (B, 2·capacity, ...)
            buf[:, turn] = img  # in place: earlier turns' entries stay as they were
            out.append(buf)
        return out

    # -- slow: pooled frames of the turns before the window ---------------------------------
    def slow_turns(self, turn: int) -> list[int]:
        """The past turns whose frames the slow memory holds at ``turn``."""
        if self.cfg.num_history == 0:
            return []
        start = self.window_start(turn)
        return history_indices(start, self.cfg.num_history)[: self.cfg.num_history]

    def extend_prefix(self, parts: list[TokenSegment], state: dict,
                      encoder=None) -> list[TokenSegment]:
        turns = self.slow_turns(state["turn"])
        self.last_memory = {}
        if not turns or state["frames"] is None:
            return parts
        slow = []
        for frames in state["frames"]:  # per camera (B, T, C, S, S)
            picked = frames[:, turns]  # (B, K, C, S, S)
            b, k = picked.shape[:2]
            tokens = encoder(picked.flatten(0, 1))  # (B·K, Ti, D)
            tokens = pool_grid(tokens, math.isqrt(tokens.shape[1]), self.cfg.pool_stride,
                               self.cfg.pool_mode).unflatten(0, (b, k))  # (B, K, T', D)
            keep = self._voxel_keep(state, turns, tokens)  # (B, K, T')
            slow += [TokenSegment(tokens[:, j], keep[:, j], torch.zeros_like(keep[:, j]).long())
                     for j in range(k)]
        return [*slow, *parts]

    def _voxel_keep(self, state: dict, turns: list[int], tokens: Tensor) -> Tensor:
        """Which slow tokens (B, K, T', D) stay (B, K, T'): all of them, or with voxel
        pruning the newest per voxel over the K frames (oldest first). Records the counts
        in :attr:`last_memory`."""
        b, k, n = tokens.shape[:3]
        present = torch.ones(b, k, n, dtype=torch.bool, device=tokens.device)  # (B, K, T')
        keep = present if self.voxel is None else self.voxel.frames(
            state["points"][:, turns], state["points_valid"][:, turns], present)  # (B, K, T')
        self.last_memory = {"tokens": present.sum((1, 2)), "kept": keep.sum((1, 2))}  # (B,)
        return keep

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"num_turns={c.num_turns}, window={c.window!r}, num_history={c.num_history}"
                + ("" if c.voxel_size is None else f", voxel_size={c.voxel_size}"))
