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
from ..context import detach_state, select_state
from ..layers.memory_tokens import truncates_before
from ..models.flow_vla import FlowMatchingVLA
from .base import VLAPolicy, pad_last
from .frames import HISTORY_PREFIX, PREV_ACTION_KEY, reads_prev_chunk
from .inputs import check_actions, check_history

__all__ = ["FlowVLAPolicy", "pad_last"]


class FlowVLAPolicy(VLAPolicy):
    policy_type = "flow_vla"
    family = "flow"

    def __init__(self, config: PolicyConfig, stats: dict[str, dict[str, Tensor]] | None = None):
        super().__init__(config, stats)
        self._prev_chunk: tuple[Tensor, Tensor] | None = None  # (B, n, Da'), (B, n) executed

    @classmethod
    def build_model(cls, config: PolicyConfig) -> FlowMatchingVLA:
        return FlowMatchingVLA(config.model, config.context, num_cameras=len(config.cameras))

    def _with_pruner_stats(self, info: dict) -> dict:
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
        return loss, self._with_pruner_stats({"loss": loss.item(),
                                              "valid_steps": int(valid.sum().item())})

    def _history_from_batch(self, batch: dict):
        """A frame-history policy's model state from a frame batch: the frames before each
        one, ``history.<camera key>`` (B, K, ...) and ``history.<camera key>_is_pad``
        (B, K) (:class:`memvla.policies.frames.FrameCollate` makes them); None for the
        other kinds."""
        offsets = self.config.context.history_offsets
        if not offsets:
            return None
        images, valid = [], None
        for key in self.config.image_keys:
            hkey = f"{HISTORY_PREFIX}{key}"
            if hkey not in batch or f"{hkey}_is_pad" not in batch:
                raise ValueError(f"missing key {hkey!r}: context.kind=frames trains on frames "
                                 f"with their {len(offsets)} past frames; build the dataset "
                                 "with memvla.policies.frames.frame_delta_indices(config) and "
                                 "collate it with FrameCollate(config)")
            frames = check_history(hkey, batch[hkey], len(offsets), self.config)
            images.append(frames.to(self.device, non_blocking=True))  # (B, K, C, H, W)
            valid = ~batch[f"{hkey}_is_pad"].to(self.device)  # (B, K)
        return self.model_state({"images": images, "valid": valid})

    def model_state(self, view):
        """A context's input state with its raw history images prepared like the current
        ones (the ``images`` entry of a dict state; other states as they are)."""
        if isinstance(view, dict) and "images" in view:
            return {**view, "images": self.prepare_images(view["images"])}
        return view

    def _segment_losses(self, batch: dict, context_state, noise: Tensor | None = None,
                        time: Tensor | None = None, prev: tuple[Tensor, Tensor] | None = None):
        """-> (losses (B, A, Da), valid (B, A) float, next context state). A state of None
        starts an episode. ``prev``: the previous chunk (normalised, padded (B, A', Da'))
        and its real steps (B, A')."""
        images, ids, pad, state = self.encode_observation(batch)
        padded, real = self._normalized_chunk(batch)  # (B, A, Da'), (B, A)
        if context_state is None:
            context_state = self.model.initial_state(state.shape[0])
        prev_actions, prev_valid = prev if prev is not None else (None, None)
        losses, new_state = self.model(images, ids, pad, state, padded, noise, time,
                                       context_state=context_state, prev_actions=prev_actions,
                                       prev_valid=prev_valid)  # (B, A, Da')
        return losses[..., : self.config.action_dim], real.float(), new_state

    @property
    def _reads_prev_chunk(self) -> bool:
        return reads_prev_chunk(self.config)

    def _normalized_chunk(self, batch: dict) -> tuple[Tensor, Tensor]:
        """A batch's action chunk, normalised and padded (B, A, Da'), and its real steps."""
        b = batch["observation.state"].shape[0]
        actions, is_pad = check_actions(batch, self.config, b)
        actions = self.normalizer.normalize("action", actions.to(self.device))  # (B, A, Da)
        padded = pad_last(actions, self.config.model.max_action_dim).to(self.dtype)  # (B,A,Da')
        return padded, ~is_pad.to(self.device)

    def forward_episode(self, episodes, bptt_depth: int = -1,
                        max_segments: int | None = None) -> tuple[Tensor, dict]:
        """Loss over whole episodes cut into segments (a
        :class:`memvla.data.segments.SegmentBatch` with a stride of ``n_action_steps``),
        carrying the temporal context's state (e.g. the memory tokens) from segment to
        segment in lockstep across the batch: one update per segment, as at inference one
        per predicted chunk.

        Truncated back-propagation through time of depth k = ``bptt_depth``
        (:func:`memvla.layers.memory_tokens.truncates_before`): the loss of a segment
        back-propagates through at most k state updates; k = 0 detaches every segment
        (independent samples), k = -1, or any k of at least the batch's segments, keeps
        the whole episode. ``max_segments`` (a curriculum) uses the first segments only.
        """
        s_total = episodes.num_segments if max_segments is None else min(
            max_segments, episodes.num_segments)
        self._check_segments(episodes)
        carried = prev = None  # the temporal context's state, the previous chunk
        total, count = 0.0, 0.0
        for s in range(s_total):
            if truncates_before(s, bptt_depth):
                carried = detach_state(carried)
            seg = episodes.segment(s)
            losses, valid, new_state = self._segment_losses(seg, carried, prev=prev)
            if self._reads_prev_chunk:  # the actions executed before the next segment
                actions, real = self._normalized_chunk(seg)  # (B, A, Da'), (B, A)
                n = self.config.n_action_steps
                prev = actions[:, :n], real[:, :n]
            total = total + (losses * valid[..., None]).sum()
            count = count + valid.sum() * self.config.action_dim
            # an episode past its end keeps its state (its padded segments change nothing)
            carried = select_state(seg["segment_is_pad"], carried, new_state)
        if count == 0:
            raise ValueError("action_is_pad: every action step of the episodes is padding")
        loss = total / count
        return loss, self._with_pruner_stats({
            "loss": loss.item(), "valid_steps": int(count / self.config.action_dim),
            "segments": s_total})

    def _check_segments(self, episodes) -> None:
        """Segments must hold chunks of chunk_size actions, one every n_action_steps
        frames from the episode's first frame (what the policy does at inference)."""
        a, r = self.config.model.chunk_size, self.config.n_action_steps
        if episodes.action.shape[2] != a:
            raise ValueError(f"segments hold chunks of {episodes.action.shape[2]} actions, the "
                             f"policy's chunk_size is {a}; build them with "
                             f"EpisodeSegmentLoader(chunk_size={a}, stride={r})")
        frames = episodes.frame_index
        starts = torch.arange(episodes.num_segments, device=frames.device) * r  # (S,)
        misaligned = ~episodes.segment_is_pad.to(frames.device) & (frames != starts[None])
        if misaligned.any():
            b, s = misaligned.nonzero()[0].tolist()
            raise ValueError(
                f"segment {s} of episode {int(episodes.episode_index[b])} starts at frame "
                f"{int(frames[b, s])}, not at {s * r}: the policy predicts a chunk every "
                f"n_action_steps={r} frames, so its episodes must be cut every {r} frames "
                f"from their first one (use EpisodeSegmentLoader(chunk_size={a}, stride={r}))")

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, obs: dict, noise: Tensor | None = None) -> Tensor:
        """-> unnormalised actions (B, chunk_size, action_dim). A recurrent policy reads its
        context's state and writes the next one (one update per predicted chunk)."""
        images, ids, pad, state = self.encode_observation(obs)
        b = state.shape[0]
        ctx, carried = self.model.context, self._context_state
        ctx.check_state(carried, b)
        seen = self.observed_images(obs) if ctx.stateful and not ctx.recurrent else None
        if ctx.recurrent:  # the memory the model wrote last (or the initial one)
            model_state = carried if carried is not None else self.model.initial_state(b)
        else:  # e.g. the frame history seen so far
            model_state = self.model_state(ctx.read(carried, seen)) if ctx.stateful else None
        prev_actions, prev_valid = self._prev_chunk or (None, None)
        if prev_actions is not None and prev_actions.shape[0] != b:
            raise ValueError(f"observation batch size {b} differs from the "
                             f"{prev_actions.shape[0]} episodes whose previous action chunk "
                             "this policy keeps; call reset() first")
        x, new_state = self.model.sample_actions(images, ids, pad, state, noise,
                                                 context_state=model_state,
                                                 prev_actions=prev_actions,
                                                 prev_valid=prev_valid)  # (B, A, Da')
        if ctx.stateful:
            self._context_state = ctx.observe(carried, seen, detach_state(new_state))
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
