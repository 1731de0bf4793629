"""The temporal-context interface: what a policy carries from one chunk to the next.

A kind (one file of :mod:`memvla.context`) is a :class:`TemporalContext` module. Seen from
the model, it

- gives the state of a fresh episode (:meth:`~TemporalContext.initial_state`): ``None``
  (nothing carried) or any nested structure (dicts, lists, tuples) of tensors whose
  leading axis is the batch B;
- adds its tokens to the prefix (:meth:`~TemporalContext.extend_prefix`), given the
  prefix parts the model built and the current state;
- writes the next state from the backbone's hidden states over that prefix
  (:meth:`~TemporalContext.update`);
- says which of the backbone's outputs it reads, so that the model knows which
  parameters the loss reaches (:attr:`~TemporalContext.reads_prefix_output`,
  :attr:`~TemporalContext.reads_normed_output`).

What every kind shares is done on the state as a tree, here: :func:`detach_state` (the
truncation of back-propagation through time), :func:`select_state` (padded episodes of a
batch keep their state past their end), :func:`state_batch` (the batch a state is for).
The policy holds the state between calls and forgets it on ``reset()``; the episode
trainer carries it through an episode's segments.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..configs import ContextConfig
from ..layers.tokens import TokenSegment

State = Any  # None, or a nested structure (dict, list, tuple) of tensors with leading axis B


def map_state(fn, *states: State) -> State:
    """``fn`` applied leaf by leaf to one or more states of the same structure; where the
    structures differ (a part that appears, a list that grows) and for leaves that are not
    tensors (counters, None), the last state's value is taken."""
    last = states[-1]
    if all(isinstance(s, Tensor) for s in states):
        return fn(*states) if all(s.shape == last.shape for s in states) else last
    if isinstance(last, dict) and all(isinstance(s, dict) and s.keys() == last.keys()
                                      for s in states):
        return {k: map_state(fn, *(s[k] for s in states)) for k in last}
    if isinstance(last, list | tuple) and all(isinstance(s, list | tuple) and
                                              len(s) == len(last) for s in states):
        return type(last)(map_state(fn, *parts) for parts in zip(*states, strict=True))
    return last


def state_leaves(state: State) -> list[Tensor]:
    """The tensors of a state, in a fixed order."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in state for t in state_leaves(state[k])]
    if isinstance(state, list | tuple):
        return [t for part in state for t in state_leaves(part)]
    return []


def detach_state(state: State) -> State:
    """The state cut from the autograd graph (every tensor leaf detached)."""
    return map_state(lambda x: x.detach(), state)


def select_state(keep: Tensor, old: State, new: State) -> State:
    """Per sample: ``old`` where ``keep`` (B,) is True, else ``new`` (an ``old`` of None,
    a fresh episode, takes ``new``; so do parts whose shape changed, e.g. a growing cache:
    what an ended episode keeps there is never read)."""
    if old is None:
        return new

    def pick(o: Tensor, n: Tensor) -> Tensor:
        k = keep.to(n.device).view(-1, *([1] * (n.dim() - 1)))  # (B, 1, ...)
        return torch.where(k, o, n)

    return map_state(pick, old, new)


def state_batch(state: State) -> int | None:
    """The batch size B of a state (None for a state without tensors)."""
    leaves = state_leaves(state)
    return leaves[0].shape[0] if leaves else None


class TemporalContext(nn.Module):
    """The default kind, and the base of every kind: carries nothing."""

    kind: str = "none"

    @classmethod
    def build(cls, cfg: ContextConfig, width: int, action_dim: int) -> TemporalContext:
        """The context for ``cfg``, a backbone of width ``width`` and actions of
        ``action_dim`` (padded) dimensions; a kind takes what it needs (the default kind:
        nothing; most kinds: ``cfg`` and ``width``)."""
        return cls() if cls is TemporalContext else cls(cfg, width)

    @property
    def recurrent(self) -> bool:
        """True when the kind is trained through whole episodes (its state is written by
        the model at every chunk, and back-propagation runs through it)."""
        return False

    @property
    def stateful(self) -> bool:
        """True when the policy carries something from step to step at inference."""
        return self.recurrent

    @property
    def retrieves(self) -> bool:
        """True when the prefix takes items the policy retrieves for each chunk from an
        experience store (:mod:`memvla.context.experience`)."""
        return False

    @property
    def keeps_cache(self) -> bool:
        """True when the model's sequence is appended to a key/value cache of earlier turns
        that the state carries (:meth:`prefix_cache`, written back by :meth:`update`)."""
        return False

    @property
    def reads_prefix_output(self) -> bool:
        """True when :meth:`update` reads the backbone's last hidden states of the prefix
        (then its last layer's query/output/MLP weights get a gradient)."""
        return False

    @property
    def reads_normed_output(self) -> bool:
        """True when :meth:`update` reads them after the backbone's final norm."""
        return False

    def initial_state(self, batch: int) -> State:
        """The model's input state at the start of an episode, for ``batch`` episodes."""
        return None

    # -- inference: what the policy carries ------------------------------------------------
    def observe(self, state: State, images: list[Tensor], written: State = None,
                geometry: dict | None = None) -> State:
        """The carried state after an environment step: ``images`` are this step's
        frames per camera (B, C, H, W) as given; ``written`` is the state the model wrote
        if the step predicted a chunk (else None); ``geometry`` this frame's memory-token
        points for voxel pruning (``points`` (B, T', 3), ``valid`` (B, T')) or None."""
        return written if written is not None else state

    def read(self, state: State, images: list[Tensor], geometry: dict | None = None) -> State:
        """The model's input state for a chunk predicted now, from the carried state
        (None at an episode's start)."""
        return state

    # -- the model's side --------------------------------------------------------------------
    def encode_images(self, encoder, images: Tensor, camera: int, state: State) -> Tensor:
        """One camera's images (B, C, S, S) -> prefix tokens (B, Ti, D) with ``encoder``
        (the model's vision tower + connector); a kind may encode them with their past."""
        return encoder(images)

    def extend_prefix(self, parts: list[TokenSegment], state: State,
                      encoder=None) -> list[TokenSegment]:
        """The prefix parts with this kind's tokens added (``parts`` is not changed);
        ``encoder`` encodes images as the model's own."""
        return parts

    def prefix_cache(self, state: State):
        """A key/value cache of earlier turns the prefix is appended to and attends to
        (:class:`memvla.layers.kv_cache.KVCache`), or None (a fresh one)."""
        return None

    def update(self, state: State, hidden: Tensor, cache=None, images=None) -> State:
        """The next state, from the backbone's hidden states over the extended prefix
        (B, Np, D) (after the final norm iff :attr:`reads_normed_output`), the filled
        ``cache`` and this step's prepared ``images`` per camera (B, C, S, S)."""
        return None

    def check_state(self, state: State, batch: int) -> None:
        """A clear error when ``state`` is not for ``batch`` episodes."""
        have = state_batch(state)
        if have is not None and have != batch:
            raise ValueError(f"observation batch size {batch} differs from the {have} episodes "
                             f"whose {self.kind} state this policy holds; call reset() first")
