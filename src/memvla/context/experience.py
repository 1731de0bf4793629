"""Experience across episodes in the prefix: the items an experience store retrieved for
this observation (:mod:`memvla.retrieval`), one token each.

An item is what was done from a similar observation with a similar instruction in another
episode: its first ``context.store_chunk`` actions (normalised as the policy's own) and
whether that episode succeeded. Its token is an MLP of the flattened actions, the outcome
(success, failure) and the retrieval score; the ``context.store_topk`` tokens enter the
prefix before the model's own tokens, best first. The retrieval itself (embedding, search,
never the sample's own episode in training, switching by confidence) is the policy's
(:mod:`memvla.policies.experience`); this module is what the model makes of the items.

The state the model reads (built fresh for every chunk, nothing is carried):
``actions`` (B, k, A_s, Da'), ``success`` (B, k), ``score`` (B, k) and ``valid`` (B, k)
(False: no item there, e.g. a chunk that did not retrieve; its token is masked, which is
the same as no token). A state of None (no store attached, or no chunk of the batch
retrieved) adds no tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..configs import ContextConfig
from ..layers.tokens import TokenSegment
from .base import TemporalContext


def item_features(actions: Tensor, success: Tensor, score: Tensor) -> Tensor:
    """Items (B, k, A_s, Da'), outcomes (B, k), scores (B, k) -> features (B, k, A_s·Da' + 3):
    the flattened actions, success and failure one-hot, the score."""
    ok = success.to(actions.dtype)  # (B, k)
    outcome = torch.stack([ok, 1 - ok, score.to(actions.dtype)], -1)  # (B, k, 3)
    return torch.cat([actions.flatten(2), outcome], -1)  # (B, k, A_s·Da' + 3)


class ExperienceContext(TemporalContext):
    kind = "experience"

    @classmethod
    def build(cls, cfg: ContextConfig, width: int, action_dim: int) -> ExperienceContext:
        return cls(cfg, width, action_dim)  # the retrieved items' actions are encoded

    def __init__(self, cfg: ContextConfig, width: int, action_dim: int):
        super().__init__()
        self.cfg, self.width, self.action_dim = cfg, width, action_dim
        self.encode = nn.Sequential(nn.Linear(cfg.store_chunk * action_dim + 3, width),
                                    nn.GELU(), nn.Linear(width, width))

    @property
    def retrieves(self) -> bool:
        return True

    def item_shape(self) -> tuple[int, int]:
        """(A_s, Da'): the actions of one item the model reads."""
        return self.cfg.store_chunk, self.action_dim

    def check_items(self, state: dict, batch: int) -> None:
        k, (a, d) = self.cfg.store_topk, self.item_shape()
        want = {"actions": (batch, k, a, d), "success": (batch, k), "score": (batch, k),
                "valid": (batch, k)}
        for key, shape in want.items():
            got = tuple(state[key].shape) if key in state else None
            if got != shape:
                raise ValueError(f"context.kind='experience': state {key!r} must be {shape}, "
                                 f"got {got}")

    def extend_prefix(self, parts: list[TokenSegment], state: dict | None,
                      encoder=None) -> list[TokenSegment]:
        if state is None:
            return parts
        b = parts[0].embs.shape[0]
        self.check_items(state, b)
        dtype = parts[0].embs.dtype
        feats = item_features(state["actions"].to(dtype), state["success"],
                              state["score"])  # (B, k, A_s·Da' + 3)
        tokens = self.encode(feats)  # (B, k, D)
        valid = state["valid"].to(torch.bool)  # (B, k)
        tokens = tokens * valid[..., None].to(dtype)  # (B, k, D)
        return [TokenSegment(tokens, valid, torch.zeros_like(valid, dtype=torch.long)), *parts]

    def extra_repr(self) -> str:
        c = self.cfg
        return f"store_topk={c.store_topk}, store_chunk={c.store_chunk}"
