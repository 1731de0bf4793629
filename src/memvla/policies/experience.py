"""A policy's side of ``context.kind="experience"``: the attached store, what each chunk
retrieves from it, and switching by confidence.

- :meth:`ExperiencePolicyMixin.attach_experience` attaches an experience store
  (:mod:`memvla.retrieval`); in training (``memvla train`` does it) with
  ``exclude_own``: a sample never retrieves its own episode.
- Training on frames: every sample retrieves, except a ``context.store_dropout`` share
  given no items.
- Inference: a chunk retrieves when the policy's confidence without items (the fast
  path) is below ``context.retrieve_below`` (None: always, without measuring; 0: never);
  the others keep the fast path's chunk, computed while measuring. :attr:`last_retrieval`
  says which did, and their confidence.

The items enter the model as the context's state (:mod:`memvla.context.experience`): their
actions normalised as the policy's own and padded, ``store_chunk`` of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .inputs import check_observation


class ExperiencePolicyMixin:
    """Mixed into :class:`memvla.policies.base.VLAPolicy`."""

    experience = None  # the attached memvla.retrieval.ExperienceSource, or None
    last_retrieval: dict | None = None  # of the last chunk predicted

    def attach_experience(self, store, exclude_own: bool = False) -> None:
        """Read items of ``store`` (an :class:`~memvla.retrieval.ExperienceStore` or its
        directory) from now on; None detaches it."""
        from ..retrieval import ExperienceSource, ExperienceStore

        if store is None:
            self.experience = None
            return
        cfg = self.config
        if not self.model.context.retrieves:
            raise ValueError(f"an experience store feeds context.kind='experience'; this "
                             f"policy's context.kind is {cfg.context.kind!r}")
        if isinstance(store, str | Path):
            store = ExperienceStore.load(store)
        cams = store.embedder.get("cameras")
        if store.action_dim != cfg.action_dim or store.chunk < cfg.context.store_chunk or (
                cams != len(cfg.image_keys)):
            raise ValueError(f"experience store: items of {store.chunk} × {store.action_dim} "
                             f"actions embedded from {cams} camera(s); this policy reads "
                             f"{cfg.context.store_chunk} × {cfg.action_dim} "
                             f"(context.store_chunk × action_dim) from "
                             f"{len(cfg.image_keys)} camera(s)")
        self.experience = ExperienceSource(store, exclude_own)
        self._confidence_gen = None

    def _items(self, images: list[Tensor], tasks: list[str], use: Tensor,
               episodes: Tensor | None = None) -> dict[str, Tensor]:
        """The model's input state: the retrieved items of the samples where ``use`` (B,)."""
        from .base import pad_last

        c = self.config.context
        got = self.experience.retrieve(images, tasks, c.store_topk, episodes)
        dev = self.device
        actions = got["actions"][:, :, : c.store_chunk].to(dev)  # (B, k, A_s, Da)
        actions = self.normalizer.normalize("action", actions)
        actions = pad_last(actions, self.config.model.max_action_dim).to(self.dtype)
        return {"actions": actions,  # (B, k, A_s, Da')
                "success": got["success"].to(dev), "score": got["score"].to(dev),
                "valid": got["valid"].to(dev) & use.to(dev)[:, None]}  # (B, k)

    def _no_store_error(self) -> ValueError:
        return ValueError("context.kind='experience' reads items of an experience store, and "
                          "none is attached: call policy.attach_experience(store) (memvla "
                          "train builds one from the training set; memvla eval --store)")

    def _experience_for_batch(self, batch: dict) -> dict:
        """A frame batch's retrieved items (training: never the sample's own episode)."""
        if self.experience is None:
            raise self._no_store_error()
        images, _, tasks = check_observation(batch, self.config)
        b = len(tasks)
        episodes = batch.get("episode_index")
        if self.experience.exclude_own and not isinstance(episodes, Tensor):
            raise ValueError("missing key 'episode_index' (B,): training with an experience "
                             "store skips each sample's own episode")
        use = torch.ones(b, dtype=torch.bool)
        if self.training and self.config.context.store_dropout > 0:
            use = torch.rand(b) >= self.config.context.store_dropout
        return self._items(images, tasks, use,
                           episodes.view(-1) if isinstance(episodes, Tensor) else None)

    def _switch(self, obs: dict, images: list[Tensor], inputs: tuple,
                noise: Tensor | None = None) -> tuple[dict | None, Tensor | None]:
        """For a chunk predicted now -> (the items of the samples that retrieve, None when
        none does; the fast path's chunk (B, A, Da'), normalised, when it was computed to
        measure the confidence, else None). ``images``: the observation's checked images;
        ``inputs``: the model inputs the policy encoded from it; ``noise``: the chunk's (the
        fast path's first draw uses it, so that a sample that does not retrieve gets the
        chunk a policy without a store would give)."""
        if self.experience is None:
            self.last_retrieval = None
            return None, None
        _, _, tasks = check_observation(obs, self.config)
        b, threshold = len(tasks), self.config.context.retrieve_below
        fast = confidence = None
        if threshold is None:
            use = torch.ones(b, dtype=torch.bool)
        elif threshold <= 0:
            use = torch.zeros(b, dtype=torch.bool)
        else:
            fast, confidence = self._fast_path(obs, inputs, noise)  # (B, A, Da'), (B,)
            use = confidence.cpu() < threshold
        self.last_retrieval = {"retrieved": use, "confidence": confidence}
        return (self._items(images, tasks, use) if use.any() else None), fast

    def _switched(self, memory: Tensor | None, fast: Tensor | None) -> Tensor:
        """The chunk (B, A, Da') of each sample: the memory path's where it retrieved, the
        fast path's elsewhere."""
        if fast is None:
            return memory
        if memory is None:
            return fast
        use = self.last_retrieval["retrieved"].to(fast.device)[:, None, None]  # (B, 1, 1)
        return torch.where(use, memory, fast)

    @torch.no_grad()
    def _fast_path(self, obs: dict, inputs: tuple, noise: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
        """The chunk without items (B, A, Da') and how sure the policy is of it (B,) in
        [0, 1] (``context.confidence``; :mod:`memvla.policies.confidence`)."""
        from .confidence import confidence_of, sample_chunks, spread_of, vote_entropy

        c = self.config.context
        if c.confidence == "spread":
            if getattr(self, "_confidence_gen", None) is None:
                self._confidence_gen = torch.Generator(self.device).manual_seed(0)
            chunks = sample_chunks(self, obs, c.confidence_samples, self._confidence_gen,
                                   first=noise, inputs=inputs)  # (B, K, A, Da')
            spread = spread_of(chunks[..., : self.config.action_dim])  # (B,)
            return chunks[:, 0], confidence_of(spread, "spread", c.max_spread)
        pruner = getattr(self.model, "pruner", None)
        if pruner is None:
            raise ValueError("context.confidence='entropy' reads the token pruner's votes; "
                             "this policy has no pruner (model.pruner.enabled=false): use "
                             "'spread'")
        if self.config.family == "flow":
            x, _ = self.model.sample_actions(*inputs, noise)
        else:
            x, _ = self.model.predict(*inputs)
        return x, confidence_of(vote_entropy(pruner.last_votes), "entropy")
