"""Per-session episode state: what one robot's episode carries on the server.

A memvla policy keeps its episode on the instance: the temporal context's state
(``_context_state``: memory tokens, frame history, slow-fast cache, SSM state; a tree of
tensors with leading batch axis B, :mod:`memvla.context.base`) and, for a token pruner
that reads the executed actions, the previous chunk (``_prev_chunk``). One policy serves
every session, so each :class:`Session` holds its own copy of that state (B = 1) with its
own action queue, its own noise generator and its own step counter, and the server
swaps it into the policy around each call (:func:`load_episode` / :func:`read_episode`,
through ``VLAPolicy.episode_state`` / ``load_episode_state``):
no session ever sees another's state. The action queue is the session's own (the policy's
``_queue`` is not used by the server), so requests of sessions at different points of
their chunks can share one batched call.

A new episode starts with each connection and with a reset message (optionally seeded:
the seed makes the session's noise draws those of local evaluation's episode of that
seed, :class:`memvla.evaluate.PolicyRunner`); the server frees a session when its
connection closes or has been idle for longer than the idle timeout.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..context.base import State


@dataclass
class Episode:
    """The part of an episode that a policy call reads and writes (B = 1 for a session,
    B sessions while a batch is being served)."""

    context: State = None  # the temporal context's carried state
    prev_chunk: Any = None  # (actions (B, n, Da'), valid (B, n)) for a prev-chunk pruner

    def as_tree(self) -> dict:
        return {"context": self.context, "prev_chunk": self.prev_chunk}

    @classmethod
    def from_tree(cls, tree: dict) -> Episode:
        return cls(context=tree["context"], prev_chunk=tree["prev_chunk"])


def read_episode(policy) -> Episode:
    """The episode state the policy holds now (``VLAPolicy.episode_state``)."""
    held = policy.episode_state()
    return Episode(held.get("_context_state"), held.get("_prev_chunk"))


def load_episode(policy, episode: Episode) -> None:
    """Put ``episode`` into the policy (its own queue is cleared: the server keeps queues)."""
    tree = {"_context_state": episode.context, "_prev_chunk": episode.prev_chunk}
    policy.load_episode_state({k: tree[k] for k in policy.episode_attrs})


_session_ids = itertools.count(1)


@dataclass
class Session:
    """One robot's connection: its episode, action queue, noise generator and counters."""

    device: torch.device
    seed: int | None = None
    id: int = field(default_factory=lambda: next(_session_ids))
    episode: Episode = field(default_factory=Episode)
    queue: list[Tensor] = field(default_factory=list)  # pending actions, each (Da,)
    generator: torch.Generator | None = None
    episodes: int = 0  # episodes started on this connection
    step: int = 0  # requests answered in the current episode
    chunks: int = 0  # chunks predicted in the current episode
    last_seen: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.new_episode(self.seed)

    def new_episode(self, seed: int | None = None) -> int:
        """Forget the episode (state, queue, counters) and reseed the noise; -> the seed.
        Without a seed, a fresh random one is drawn (and reported back to the client)."""
        self.seed = int(seed) if seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.episode = Episode()
        self.queue = []
        self.episodes += 1
        self.step = 0
        self.chunks = 0
        return self.seed

    def draw_noise(self, chunk_size: int, max_action_dim: int) -> Tensor:
        """This session's sampling noise of its next chunk (1, A, Da'), from its own
        generator (one draw per chunk, as local evaluation draws it)."""
        return torch.randn(1, chunk_size, max_action_dim, generator=self.generator,
                           device=self.device)  # (1, A, Da')

    def touch(self) -> None:
        self.last_seen = time.monotonic()
