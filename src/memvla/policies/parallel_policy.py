"""The parallel-decoding VLA (OpenVLA-OFT family) behind the LeRobot-style policy API.

``forward(batch) -> (loss, info)`` is the L1 loss of the regressed chunk over the real
(not padded) action steps and the real action dimensions; ``predict_action_chunk`` decodes
the whole chunk in one pass (deterministic: no noise). The queue, ``reset``, inputs,
checkpoints and the temporal context (memory tokens trained through episodes, frame
history) are shared with the other family (:mod:`.base`, :mod:`.episodes`). With
``model.pruner.enabled`` the info holds the pruner's statistics and
``set_training_progress(frac)`` drives its noise schedule. With ``model.action_head=text``
the actions are discrete (one-hot vectors) and predicted as text tokens: the loss is the
tokens' cross-entropy and the chunk is the decoded tokens' one-hot actions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..configs import PolicyConfig
from ..layers.token_pruner import stats_to_floats
from ..models.parallel_vla import ParallelVLA
from .base import VLAPolicy
from .inputs import check_actions


def drop_bos(ids: Tensor, pad: Tensor, bos_id: int | None) -> tuple[Tensor, Tensor]:
    """ids/pad (B, Nl) -> (B, Nl - 1) without a leading BOS when every prompt has one;
    unchanged when none has (or the tokenizer has no BOS)."""
    if bos_id is None:
        return ids, pad
    first = (ids[:, 0] == bos_id) & pad[:, 0]  # (B,)
    if bool(first.all()):
        return ids[:, 1:], pad[:, 1:]
    if bool(first.any()):
        raise ValueError(f"task: the tokenizer put BOS (id {bos_id}) before "
                         f"{int(first.sum())} of {len(first)} prompts; expected all or none")
    return ids, pad


class ParallelVLAPolicy(VLAPolicy):
    policy_type = "parallel_vla"
    family = "parallel"

    @classmethod
    def build_model(cls, config: PolicyConfig) -> ParallelVLA:
        return ParallelVLA(config.model, num_cameras=len(config.cameras),
                           context=config.context)

    def tokenize(self, tasks: list[str]) -> tuple[Tensor, Tensor]:
        """The prompt without the tokenizer's BOS (the model puts its own first)."""
        ids, pad = self.tokenizer(tasks)  # (B, Nl)
        return drop_bos(ids, pad, getattr(self.tokenizer, "bos_id", None))

    def _stats(self, info: dict) -> dict:
        stats = stats_to_floats(self.model.last_prune_stat_tensors)
        return {**super()._stats(info), **{f"pruner_{k}": v for k, v in stats.items()}}

    def forward(self, batch, bptt_depth: int = -1,
                max_segments: int | None = None) -> tuple[Tensor, dict]:
        """L1 loss of independent samples (a frame batch), or given a ``SegmentBatch``
        (whole episodes, a recurrent context) :meth:`forward_episode`."""
        if not isinstance(batch, dict):
            return self.forward_episode(batch, bptt_depth, max_segments)
        losses, valid, _ = self._segment_losses(batch, self._history_from_batch(batch))
        loss = self._reduce(losses, valid)
        return loss, self._stats({"loss": loss.item(), "valid_steps": int(valid.sum().item())})

    def _segment_losses(self, batch: dict, context_state, prev=None):
        """-> (losses (B, A, Da), valid (B, A) float, next context state). A state of None
        starts an episode."""
        images, ids, pad, state = self.encode_observation(batch)
        padded, real = self._chunk_targets(batch)  # (B, A, Da'), (B, A)
        context_state = self._segment_state(batch, context_state, state.shape[0])
        losses, new_state = self.model(images, ids, pad, state, padded,
                                       context_state=context_state)  # (B, A, Da')
        return losses[..., : self.config.action_dim], real.float(), new_state

    def _chunk_targets(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The chunk the model learns (B, A, Da') and its real steps (B, A): normalised
        and padded, or for the text head the one-hot discrete actions as they are
        (normalising each dimension apart would move their largest entry)."""
        if not self.model.text_actions:
            return self._normalized_chunk(batch)
        b = batch["observation.state"].shape[0]
        actions, is_pad = check_actions(batch, self.config, b)  # (B, A, n)
        return actions.to(self.device, self.dtype), ~is_pad.to(self.device)

    @torch.no_grad()
    def predict_action_chunk(self, obs: dict, noise: Tensor | None = None) -> Tensor:
        """-> unnormalised actions (B, chunk_size, action_dim). ``noise`` is accepted for
        the common API and ignored (the chunk is regressed, not sampled). A recurrent
        policy reads its context's state and writes the next one."""
        raw, (images, ids, pad, state) = self._encode(obs)
        fast = None
        if self.model.context.retrieves:  # items of the store, or the fast path's chunk
            (model_state, fast), seen = self._switch(obs, raw, (images, ids, pad, state)), None
        else:
            model_state, seen = self._context_input(raw, state.shape[0], obs)
        x = new_state = None
        if fast is None or model_state is not None:
            x, new_state = self.model.predict(images, ids, pad, state,
                                              context_state=model_state)  # (B, A, Da')
        x = self._switched(x, fast)  # (B, A, Da')
        self._context_output(seen, new_state)
        x = x[..., : self.config.action_dim]  # (B, A, Da)
        if self.model.text_actions:  # decoded tokens: one-hot discrete actions
            return x
        return self.normalizer.unnormalize("action", x)
