"""Recurrent memory tokens (RMT / "SmolVLA Memory") as a temporal context.

The state is the memory (B, M, D). :meth:`~MemoryTokensContext.extend_prefix` puts it in
the prefix in the configured layout (:mod:`memvla.layers.memory_tokens`: ``smolvla`` read
= write at the start, ``rmt`` read at the start and write at the end);
:meth:`~MemoryTokensContext.update` takes the backbone's hidden states at the write
positions as the next memory, bounded by ``context.write``: ``clip`` (the residual stream,
each token's RMS clipped to ``context.max_rms``) or ``norm`` (the output of the backbone's
final RMSNorm). ``context.memory_update="gated"`` interpolates between the old and the
written memory with a learned gate (:func:`~memvla.layers.memory_tokens.gated_write`);
``context.memory_noise`` perturbs the carried memory in training.
"""

from __future__ import annotations

from torch import Tensor

from ..configs import ContextConfig
from ..layers.memory_tokens import MemoryGate, MemoryTokens, bound_written, memory_noise
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
        return self.tokens.initial(batch)  # (B, M, D)

    def extend_prefix(self, parts: list[TokenSegment], state: Tensor,
                      encoder=None) -> list[TokenSegment]:
        return self.tokens.insert(parts, state)

    def update(self, state: Tensor, hidden: Tensor, cache=None, images=None) -> Tensor:
        written = bound_written(self.tokens.extract(hidden), self.cfg.write,
                                self.cfg.max_rms)  # (B, M, D)
        if self.gate is not None:
            written = self.gate(state, written)  # (B, M, D)
        if self.training and self.cfg.memory_noise > 0:
            written = memory_noise(written, self.cfg.memory_noise)
        return written

    def norm_bound(self, final_norm_weight: Tensor) -> float:
        """The largest L2 norm a written memory token can have: ``max_rms``·√D when
        clipped, max|w|·√D through the final RMSNorm of weight w."""
        if self.cfg.write == "clip":
            return self.cfg.max_rms * self.width ** 0.5
        return float(final_norm_weight.detach().abs().max()) * self.width ** 0.5

    def extra_repr(self) -> str:
        return f"write={self.cfg.write!r}, max_rms={self.cfg.max_rms}"
