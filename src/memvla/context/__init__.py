"""Temporal contexts: what a policy carries from one chunk to the next, one file per kind
behind one interface (:mod:`memvla.context.base`).

- ``none``: nothing (:class:`~memvla.context.base.TemporalContext`).
- ``memory_tokens``: recurrent memory tokens in the prefix
  (:mod:`memvla.context.memory_tokens`).
- ``frames``: frame history, as extra image tokens or through MEM's space-time encoder
  (:mod:`memvla.context.frames`).
- ``slow_fast``: StreamVLN's recent turns in the KV cache and pooled older frames
  (:mod:`memvla.context.slow_fast`).
- ``ssm_state``: a Mamba backbone's recurrent state (:mod:`memvla.context.ssm_state`).
- ``bank``: a bounded bank of past observations, retrieved by similarity
  (:mod:`memvla.context.bank`).
- ``experience``: items of an experience store across episodes, retrieved by the policy
  (:mod:`memvla.context.experience`).
"""

from __future__ import annotations

from ..configs import ContextConfig
from .bank import BankContext
from .base import (
    State,
    TemporalContext,
    detach_state,
    map_state,
    select_state,
    state_batch,
    state_leaves,
)
from .experience import ExperienceContext
from .frames import FramesContext
from .memory_tokens import MemoryTokensContext
from .slow_fast import SlowFastContext
from .ssm_state import SSMStateContext

CONTEXTS: dict[str, type[TemporalContext]] = {"none": TemporalContext,
                                              "memory_tokens": MemoryTokensContext,
                                              "frames": FramesContext,
                                              "slow_fast": SlowFastContext,
                                              "ssm_state": SSMStateContext,
                                              "bank": BankContext,
                                              "experience": ExperienceContext}


def make_context(cfg: ContextConfig, width: int, action_dim: int) -> TemporalContext:
    """The temporal context of ``cfg.kind`` for a backbone of width ``width`` and actions
    of ``action_dim`` (padded) dimensions."""
    if cfg.kind not in CONTEXTS:
        raise ValueError(f"context.kind must be one of {tuple(CONTEXTS)}, got {cfg.kind!r}")
    return CONTEXTS[cfg.kind].build(cfg, width, action_dim)


__all__ = ["CONTEXTS", "BankContext", "ExperienceContext", "FramesContext",
           "MemoryTokensContext", "SSMStateContext", "SlowFastContext", "State",
           "TemporalContext", "detach_state", "make_context", "map_state", "select_state",
           "state_batch", "state_leaves"]
