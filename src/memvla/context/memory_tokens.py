"""Recurrent memory tokens (RMT / "SmolVLA Memory") as a temporal context.

The state is the memory (B, M, D). :meth:`~MemoryTokensContext.extend_prefix` puts it in
the prefix in the configured layout (:mod:`memvla.layers.memory_tokens`: ``smolvla`` read
= write at the start, ``rmt`` read at the start and write at the end);
:meth:`~MemoryTokensContext.update` takes the backbone's hidden states at the write
positions as the next memory, bounded by ``context.write``: ``clip`` (the residual stream,
each token's RMS clipped to ``context.max_rms``) or ``norm`` (the output of the backbone's
final RMSNorm). ``context.memory_update="gated"`` interpolates between the old and the
written memory with a learned gate (:func:`~memvla.layers.memory_tokens.gated_write`);
``context.memory_update="associative"`` carries an associative matrix instead, written by
the delta rule and read at learned queries (:mod:`memvla.layers.associative_memory`);
``context.memory_noise`` perturbs the written memory in training;
``context.memory_scale="match"`` puts the memory in the prefix at the RMS of the other
prefix tokens (:func:`~memvla.layers.memory_tokens.match_scale`).
"""

from __future__ import annotations

from torch import Tensor

from ..configs import ContextConfig
from ..layers.associative_memory import AssociativeMemory
from ..layers.memory_tokens import (
    MemoryGate,
    MemoryTokens,
    bound_written,
    match_scale,
    memory_noise,
)
from ..layers.tokens import TokenSegment
from .base import TemporalContext


class MemoryTokensContext(TemporalContext):
    kind = "memory_tokens"

    def __init__(self, cfg: ContextConfig, width: int):
        super().__init__()
        self.cfg = cfg
        self.width = width
        self.tokens = MemoryTokens(cfg.num_tokens, width, cfg.layout, cfg.init_std)
        self.gate = MemoryGate(width) if cfg.memory_update == "gated" else None
        self.assoc = (AssociativeMemory(cfg.num_tokens, width, cfg.memory_key_dim)
                      if cfg.memory_update == "associative" else None)

    @property
    def recurrent(self) -> bool:
        return True

    @property
    def reads_prefix_output(self) -> bool:
        return True

    @property
    def reads_normed_output(self) -> bool:
        return self.cfg.write == "norm"

    def initial_state(self, batch: int) -> Tensor:
        if self.assoc is not None:
            return self.assoc.initial(batch, self.tokens.init)  # (B, D, K)
        return self.tokens.initial(batch)  # (B, M, D)

    def extend_prefix(self, parts: list[TokenSegment], state: Tensor,
                      encoder=None) -> list[TokenSegment]:
        if self.assoc is not None:  # the memory tokens read from the associative matrix
            state = self.tokens.initial(state.shape[0]) + self.assoc.read(state)  # (B, M, D)
        if self.cfg.memory_scale == "match":
            prefix = TokenSegment.cat(parts)
            state = match_scale(state, prefix.embs, prefix.pad)  # (B, M, D)
        return self.tokens.insert(parts, state)

    def update(self, state: Tensor, hidden: Tensor, cache=None, images=None) -> Tensor:
        written = bound_written(self.tokens.extract(hidden), self.cfg.write,
                                self.cfg.max_rms)  # (B, M, D)
        if self.gate is not None:
            written = self.gate(state, written)  # (B, M, D)
        if self.training and self.cfg.memory_noise > 0:
            written = memory_noise(written, self.cfg.memory_noise)
        if self.assoc is not None:
            return self.assoc.write(state, written)  # (B, D, K)
        return written

    def norm_bound(self, final_norm_weight: Tensor) -> float:
        """The largest L2 norm a written memory token can have: ``max_rms``·√D when
        clipped, max|w|·√D through the final RMSNorm of weight w."""
        if self.cfg.write == "clip":
            return self.cfg.max_rms * self.width ** 0.5
        return float(final_norm_weight.detach().abs().max()) * self.width ** 0.5

    def extra_repr(self) -> str:
        return f"write={self.cfg.write!r}, max_rms={self.cfg.max_rms}"
