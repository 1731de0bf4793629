"""What a policy retrieves from an experience store for a batch of observations.

:class:`ExperienceSource` embeds the observations (the store's own embedder) and returns
each one's ``k`` nearest items, best first: their actions, outcomes and scores, with
``valid`` False where there is none. In training (``exclude_own``) an item of the sample's
own episode is never returned: the policy must learn from other episodes what its own
would have done.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .embedder import ObservationEmbedder
from .store import ExperienceStore


class ExperienceSource:
    def __init__(self, store: ExperienceStore, exclude_own: bool = False):
        self.store = store
        self.embedder = ObservationEmbedder.from_spec(store.embedder)
        self.exclude_own = exclude_own
        counts = torch.bincount(store.episode - store.episode.min()) if len(store) else None
        self._per_episode = int(counts.max()) if counts is not None else 0

    def embed(self, images: list[Tensor], tasks: list[str]) -> Tensor:
        """Images per camera (B, C, H, W) (uint8, or float in [0, 1]) -> (B, E)."""
        floats = [(img.float() / 255 if img.dtype == torch.uint8 else img.float()).cpu()
                  for img in images]  # (B, C, H, W)
        return self.embedder(floats, tasks)

    def retrieve(self, images: list[Tensor], tasks: list[str], k: int,
                 episodes: Tensor | None = None) -> dict[str, Tensor]:
        """-> ``actions`` (B, k, A, Da), ``success`` (B, k), ``score`` (B, k), ``valid``
        (B, k), on the CPU. ``episodes`` (B,): the samples' own episode ids (skipped when
        ``exclude_own``)."""
        b, store = len(tasks), self.store
        out = {"actions": torch.zeros(b, k, store.chunk, store.action_dim),
               "success": torch.zeros(b, k, dtype=torch.bool), "score": torch.zeros(b, k),
               "valid": torch.zeros(b, k, dtype=torch.bool)}
        if not len(store):
            return out
        own = episodes is not None and self.exclude_own
        want = min(len(store), k + (self._per_episode if own else 0))
        idx, score = store.search(self.embed(images, tasks), want)  # (B, want)
        keep = torch.ones_like(idx, dtype=torch.bool)
        if own:
            keep = store.episode[idx] != episodes.cpu().long()[:, None]  # (B, want)
        rank = keep.long().cumsum(1) - 1  # (B, want): the place of each kept hit
        keep &= rank < k
        rows, cols = keep.nonzero(as_tuple=True)
        slot = rank[rows, cols]
        hit = idx[rows, cols]
        out["actions"][rows, slot] = store.actions[hit]
        out["success"][rows, slot] = store.success[hit]
        out["score"][rows, slot] = score[rows, cols].float()
        out["valid"][rows, slot] = True
        return out
