"""The flow-matching VLA behind the LeRobot-style policy API.

``forward(batch) -> (loss, info)``, ``predict_action_chunk(obs) -> (B, A, action_dim)``,
``select_action(obs) -> (B, action_dim)`` popping from a queue of ``n_action_steps``,
``reset()``. Inputs use LeRobot keys (``observation.images.<camera>``,
``observation.state``, ``task``, ``action``, ``action_is_pad``) and are validated;
normalisation happens in the processor, outside the model, and is saved with the policy.
What all policies share (queue, reset, checkpoints, inputs) is in :mod:`.base`.

With the token pruner on, ``forward``'s info holds its collapse statistics of the batch
(``pruner_kept``, ``pruner_keep_ratio``, ``pruner_query_std``, ``pruner_top_vote_share``).
For ``pruner.action_context = "prev_chunk"`` the policy keeps the previously executed chunk
(the first ``n_action_steps`` actions of its last prediction, normalised) between calls and
forgets it in ``reset()``; in training it reads the first ``n_action_steps`` actions of
the previous segment of an episode (recurrent policies), or the ``prev_action``
(B, A', action_dim) entry (with ``prev_action_is_pad``) of a frame batch, which
``memvla train`` fills with the dataset's actions before each frame
(:mod:`memvla.policies.frames`); without one the pruner has no such key, as at the start
of an episode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..configs import PolicyConfig
from ..models.flow_vla import FlowMatchingVLA
from .base import VLAPolicy, pad_last
from .frames import PREV_ACTION_KEY, reads_prev_chunk

__all__ = ["FlowVLAPolicy", "pad_last"]


class FlowVLAPolicy(VLAPolicy):
    policy_type = "flow_vla"
    family = "flow"
    episode_attrs = ("_context_state", "_prev_chunk")  # a pruner may read the last chunk

    def __init__(self, config: PolicyConfig, stats: dict[str, dict[str, Tensor]] | None = None):
        super().__init__(config, stats)
        self._prev_chunk: tuple[Tensor, Tensor] | None = None  # (B, n, Da'), (B, n) executed

    @classmethod
    def build_model(cls, config: PolicyConfig) -> FlowMatchingVLA:
        return FlowMatchingVLA(config.model, config.context, num_cameras=len(config.cameras))

    def _stats(self, info: dict) -> dict:
        info = super()._stats(info)
        if self.model.pruner is not None:
            info.update({f"pruner_{k}": v for k, v in self.model.last_prune_stats.items()})
        return info

    def _prev_from_batch(self, batch: dict, device) -> tuple[Tensor, Tensor] | None:
        """The previous chunk of a frame batch (normalised, padded) and its real steps."""
        if not self._reads_prev_chunk or PREV_ACTION_KEY not in batch:
            return None
        prev = batch[PREV_ACTION_KEY]
        if not isinstance(prev, Tensor) or prev.dim() != 3 or prev.shape[2] != (
                self.config.action_dim):
            raise ValueError(f"{PREV_ACTION_KEY}: expected a (B, A', {self.config.action_dim}) "
                             f"tensor, got {getattr(prev, 'shape', type(prev).__name__)}")
        prev = self.normalizer.normalize("action", prev.to(device))  # (B, A', Da)
        is_pad = batch.get(f"{PREV_ACTION_KEY}_is_pad")
        if is_pad is not None and (not isinstance(is_pad, Tensor) or is_pad.dtype != torch.bool
                                   or tuple(is_pad.shape) != tuple(prev.shape[:2])):
            raise ValueError(f"{PREV_ACTION_KEY}_is_pad: expected bool of shape "
                             f"{tuple(prev.shape[:2])}, got {getattr(is_pad, 'dtype', None)} "
                             f"{tuple(getattr(is_pad, 'shape', ()))}")
        valid = (torch.ones(prev.shape[:2], dtype=torch.bool, device=device) if is_pad is None
                 else ~is_pad.to(device))  # (B, A')
        return pad_last(prev, self.config.model.max_action_dim).to(self.dtype), valid

    # -- training -------------------------------------------------------------------------
    def forward(self, batch, noise: Tensor | None = None, time: Tensor | None = None,
                bptt_depth: int = -1, max_segments: int | None = None) -> tuple[Tensor, dict]:
        """Flow-matching loss of independent samples: mean squared error over the real (not
        padded) action steps and the real action dimensions. A recurrent policy starts from
        its context's initial state here. Given a ``SegmentBatch`` (whole episodes), this is
        :meth:`forward_episode` (so that DDP wrappers see one forward call)."""
        if not isinstance(batch, dict):
            return self.forward_episode(batch, bptt_depth, max_segments)
        prev = self._prev_from_batch(batch, self.device)
        history = self._history_from_batch(batch)
        losses, valid, _ = self._segment_losses(batch, history, noise, time, prev)
        loss = self._reduce(losses, valid)
        return loss, self._stats({"loss": loss.item(),
                                              "valid_steps": int(valid.sum().item())})

    def _segment_losses(self, batch: dict, context_state, noise: Tensor | None = None,
                        time: Tensor | None = None, prev: tuple[Tensor, Tensor] | None = None):
        """-> (losses (B, A, Da), valid (B, A) float, next context state). A state of None
        starts an episode. ``prev``: the previous chunk (normalised, padded (B, A', Da'))
        and its real steps (B, A')."""
        images, ids, pad, state = self.encode_observation(batch)
        padded, real = self._normalized_chunk(batch)  # (B, A, Da'), (B, A)
        context_state = self._segment_state(batch, context_state, state.shape[0])
        prev_actions, prev_valid = prev if prev is not None else (None, None)
        losses, new_state = self.model(images, ids, pad, state, padded, noise, time,
                                       context_state=context_state, prev_actions=prev_actions,
                                       prev_valid=prev_valid)  # (B, A, Da')
        return losses[..., : self.config.action_dim], real.float(), new_state

    def _executed_chunk(self):
        return self._prev_chunk

    @property
    def _reads_prev_chunk(self) -> bool:
        return reads_prev_chunk(self.config)

    def _previous_chunk(self, segment: dict):
        """The actions executed before the next segment (its first n_action_steps), when
        the pruner reads the previous chunk."""
        if not self._reads_prev_chunk:
            return None
        actions, real = self._normalized_chunk(segment)  # (B, A, Da'), (B, A)
        n = self.config.n_action_steps
        return actions[:, :n], real[:, :n]

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, obs: dict, noise: Tensor | None = None) -> Tensor:
        """-> unnormalised actions (B, chunk_size, action_dim). A recurrent policy reads its
        context's state and writes the next one (one update per predicted chunk)."""
        raw, (images, ids, pad, state) = self._encode(obs)
        b = state.shape[0]
        fast = None
        if self.model.context.retrieves:  # items of the store, or the fast path's chunk
            (model_state, fast), seen = self._switch(obs, raw, (images, ids, pad, state),
                                                     noise), None
        else:
            model_state, seen = self._context_input(raw, b, obs)
        prev_actions, prev_valid = self._prev_chunk or (None, None)
        if prev_actions is not None and prev_actions.shape[0] != b:
            raise ValueError(f"observation batch size {b} differs from the "
                             f"{prev_actions.shape[0]} episodes whose previous action chunk "
                             "this policy keeps; call reset() first")
        x = new_state = None
        if fast is None or model_state is not None:
            x, new_state = self.model.sample_actions(images, ids, pad, state, noise,
                                                     context_state=model_state,
                                                     prev_actions=prev_actions,
                                                     prev_valid=prev_valid)  # (B, A, Da')
        x = self._switched(x, fast)  # (B, A, Da')
        self._context_output(seen, new_state)
        if self._reads_prev_chunk:
            executed = x[:, : self.config.n_action_steps].clone()  # (B, n, Da')
            executed[..., self.config.action_dim:] = 0  # the padded dims, as in training
            self._prev_chunk = executed, torch.ones(executed.shape[:2], dtype=torch.bool,
                                                    device=x.device)
        x = x[..., : self.config.action_dim]  # (B, A, Da)
        return self.normalizer.unnormalize("action", x)

    def reset(self) -> None:
        """Forget the episode: the action queue, the context's state and the previous
        chunk."""
        super().reset()
        self._prev_chunk = None
