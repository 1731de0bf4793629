"""What every policy family shares about its temporal context (:mod:`memvla.context`):
the model state a chunk reads and what the policy carries after it, frame history from a
frame batch, and training through whole episodes with truncated back-propagation.

A family's policy implements ``_segment_losses(batch, context_state, prev=None) ->
(losses (B, A, Da), valid (B, A), next state)`` and may override :meth:`_stats` (its
model's statistics) and :meth:`_previous_chunk` (what a segment leaves for the next one,
e.g. the executed actions a token pruner reads).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..context import detach_state, select_state
from ..layers.memory_tokens import hold_penalty, truncates_before
from .frames import HISTORY_PREFIX
from .inputs import check_actions, check_history


def _as_float(x: Tensor) -> Tensor:
    """uint8 images in [0, 1], as the model reads them; anything else as it is."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def unchanged_observation(before: dict, after: dict, threshold: float) -> Tensor:
    """(B,) True where every ``observation.*`` feature of the segment ``after`` (images,
    state, depth, ...; uint8 images in [0, 1]) is within ``threshold`` of ``before``'s, element
    by element: the world stood still between the two writes."""
    keys = sorted(k for k, v in after.items() if k.startswith("observation.")
                  and torch.is_tensor(v))
    if not keys:
        raise ValueError("context.hold_weight compares observation.* features between "
                         "segments, but the segments have none")
    same = None
    for key in keys:
        a, b = (_as_float(x[key]) for x in (after, before))
        close = (a - b).abs().flatten(1).amax(1) <= threshold  # (B,)
        same = close if same is None else same & close
    return same


class ContextPolicyMixin:
    """Mixed into :class:`memvla.policies.base.VLAPolicy`."""

    # -- inference ------------------------------------------------------------------------
    def _context_input(self, seen: list[Tensor], batch: int, obs: dict):
        """-> (the model state a chunk predicted now reads, what the context records of
        this frame when it records frames (its checked images on the device and, for voxel
        pruning, its geometry), else None). Checks the carried state is for ``batch``;
        ``obs`` is the observation."""
        ctx, carried = self.model.context, self._context_state
        ctx.check_state(carried, batch)
        if ctx.recurrent:  # the state the model wrote last (or the initial one)
            return self._segment_state(obs, carried, batch), None
        if not ctx.stateful:
            return None, None
        # e.g. the frame history seen so far, and this one
        geometry = self.step_geometry(obs, batch)
        return self.model_state(ctx.read(carried, seen, geometry)), (seen, geometry)

    def writes_with(self, queued: int) -> bool:
        """True when the temporal context's state is written from the frame observed with
        ``queued`` actions of the chunk left (``context.observe_every``: every that many
        steps after the chunk was planned)."""
        every = self.config.context.observe_every
        return every is not None and (self.config.n_action_steps - queued) % every == 0

    @torch.no_grad()
    def write_observation(self, obs: dict) -> None:
        """Write the carried state from a frame observed while a chunk executes (a write
        pass of the model on it: no actions are predicted)."""
        from ..layers.token_pruner import pruning_for_inference

        raw, (images, ids, pad, state) = self._encode(obs)
        model_state, _ = self._context_input(raw, state.shape[0], obs)
        with pruning_for_inference(self.model.pruner):
            written = self.model.write_state(images, ids, pad, state, model_state,
                                             self._executed_chunk())
        self._context_output(None, written)

    def _executed_chunk(self):
        """The last executed chunk a pruner reads (the flow family's ``prev_chunk``)."""
        return None

    def step_geometry(self, batch: dict, b: int) -> dict | None:
        """This frame's camera geometry for voxel pruning (None without it): the world
        points (B, T', 3) of the memory-token patch centres and whether each exists
        (B, T'), from ``observation.depth`` / ``pose`` / ``intrinsics`` (checked)."""
        if self.config.context.voxel_size is None:
            return None
        from ..layers.voxel import backproject, patch_centres
        from .inputs import check_geometry

        depth, pose, k = check_geometry(batch, self.config, b)
        _, h, w = self.config.image_shape
        grid = self.model.context.memory_grid(self.config.model.tokens_per_image)
        uv, inside = patch_centres(grid, self.config.model.vision.image_size, h, w,
                                   self.config.image_pad)  # (T', 2), (T',)
        dev = self.device
        points, valid = backproject(depth.to(dev), pose.to(dev), k.to(dev), uv.to(dev))
        return {"points": points, "valid": valid & inside.to(dev)}  # (B, T', 3), (B, T')

    def _segment_state(self, batch: dict, context_state, b: int):
        """The state a recurrent context's model call reads: the carried one (the initial
        state at an episode's start), with this frame's ``geometry`` where the context
        prunes by voxel (:meth:`step_geometry`)."""
        if context_state is None:
            context_state = self.model.initial_state(b)
        geometry = self.step_geometry(batch, b)
        return context_state if geometry is None else {**context_state, "geometry": geometry}

    def _context_output(self, seen, written) -> None:
        """Carry the context's state past a predicted chunk (``written``: the model's;
        ``seen``: what :meth:`_context_input` said the context records of the frame)."""
        ctx = self.model.context
        if ctx.stateful:
            images, geometry = seen if seen is not None else (None, None)
            self._context_state = ctx.observe(self._context_state, images,
                                              detach_state(written), geometry)

    def model_state(self, view):
        """A context's input state with its raw history images prepared like the current
        ones (the ``images`` entry of a dict state; other states as they are)."""
        if isinstance(view, dict) and "images" in view:
            return {**view, "images": self.prepare_images(view["images"])}
        return view

    # -- training on frames ---------------------------------------------------------------
    def _history_from_batch(self, batch: dict):
        """A frame-history policy's model state from a frame batch: the frames before each
        one, ``history.<camera key>`` (B, K, ...) and ``history.<camera key>_is_pad``
        (B, K) (:class:`memvla.policies.frames.FrameCollate` makes them); for
        ``context.kind="experience"`` the items retrieved for each frame; None for the
        other kinds."""
        if self.model.context.retrieves:
            return self._experience_for_batch(batch)
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
        state = {"images": images, "valid": valid}
        if self.config.context.voxel_size is not None:
            state.update(self._history_geometry(batch, len(offsets)))
        return self.model_state(state)

    def _history_geometry(self, batch: dict, k: int) -> dict:
        """The past frames' memory-token points (B, K, T', 3) and validity (B, K, T'), from
        the ``history.`` depth, pose and intrinsics of a frame batch."""
        from .inputs import DEPTH_KEY, INTRINSICS_KEY, POSE_KEY

        flat = {}
        for key in (DEPTH_KEY, POSE_KEY, INTRINSICS_KEY):
            hkey = f"{HISTORY_PREFIX}{key}"
            if hkey not in batch:
                raise ValueError(f"missing key {hkey!r}: context.voxel_size prunes the past "
                                 f"frames by their {key}; build the dataset with "
                                 "frame_delta_indices(config) and collate it with "
                                 "FrameCollate(config)")
            x = batch[hkey]
            if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != k:
                raise ValueError(f"{hkey}: expected (B, {k}, ...) past values, got "
                                 f"{tuple(getattr(x, 'shape', ()))}")
            flat[key] = x.flatten(0, 1)  # (B·K, ...)
        b = batch[f"{HISTORY_PREFIX}{DEPTH_KEY}"].shape[0]
        geometry = self.step_geometry(flat, b * k)
        return {"points": geometry["points"].unflatten(0, (b, k)),  # (B, K, T', 3)
                "points_valid": geometry["valid"].unflatten(0, (b, k))}  # (B, K, T')

    def _normalized_chunk(self, batch: dict) -> tuple[Tensor, Tensor]:
        """A batch's action chunk, normalised and padded (B, A, Da'), and its real steps."""
        from .base import pad_last

        b = batch["observation.state"].shape[0]
        actions, is_pad = check_actions(batch, self.config, b)
        actions = self.normalizer.normalize("action", actions.to(self.device))  # (B, A, Da)
        padded = pad_last(actions, self.config.model.max_action_dim).to(self.dtype)  # (B,A,Da')
        return padded, ~is_pad.to(self.device)

    # -- training through episodes --------------------------------------------------------
    def _stats(self, info: dict) -> dict:
        """``info`` with the model's statistics of the last forward (e.g. a pruner's; the
        temporal context's memory tokens before and after voxel pruning: means over the
        batch of the last call)."""
        last = getattr(self.model.context, "last_memory", None)
        if last:
            tokens, kept = (float(last[k].float().mean()) for k in ("tokens", "kept"))
            info.update(memory_tokens=tokens, memory_kept=kept,
                        memory_pruned_share=1 - kept / tokens if tokens else 0.0)
        return info

    def _previous_chunk(self, segment: dict):
        """What a segment leaves for the next one's ``prev`` (None: nothing)."""
        return None

    def _segment_write(self, segment: dict, context_state, prev=None):
        """The next state from a write pass on a segment that predicts no chunk."""
        images, ids, pad, state = self.encode_observation(segment)
        context_state = self._segment_state(segment, context_state, state.shape[0])
        return self.model.write_state(images, ids, pad, state, context_state, prev)

    def forward_episode(self, episodes, bptt_depth: int = -1,
                        max_segments: int | None = None) -> tuple[Tensor, dict]:
        """Loss over whole episodes cut into segments (a
        :class:`memvla.data.segments.SegmentBatch` with a stride of ``n_action_steps``),
        carrying the temporal context's state (e.g. the memory tokens) from segment to
        segment in lockstep across the batch: one update per segment, as at inference one
        per predicted chunk. With ``context.observe_every`` the segments are that many
        frames apart and only every ``n_action_steps``-th frame predicts a chunk (and has
        a loss); the others are write passes (:meth:`_segment_write`).

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
        writes_per_chunk = self.config.n_action_steps // self.config.segment_stride
        hold_weight = self.config.context.hold_weight
        held, held_count, seg = 0.0, 0.0, None
        for s in range(s_total):
            if truncates_before(s, bptt_depth):
                carried = detach_state(carried)
            seg, before = episodes.segment(s), seg
            if s % writes_per_chunk:  # a frame observed while the chunk executes
                new_state = self._segment_write(seg, carried, prev)
            else:
                losses, valid, new_state = self._segment_losses(seg, carried, prev=prev)
                prev = self._previous_chunk(seg)
                total = total + (losses * valid[..., None]).sum()
                count = count + valid.sum() * self.config.action_dim
            if hold_weight and before is not None:  # context.hold_weight
                same = unchanged_observation(before, seg, self.config.context.hold_threshold)
                change, n = hold_penalty(carried, new_state, same & ~seg["segment_is_pad"])
                held, held_count = held + change, held_count + n
            # an episode past its end keeps its state (its padded segments change nothing)
            carried = select_state(seg["segment_is_pad"], carried, new_state)
        if count == 0:
            raise ValueError("action_is_pad: every action step of the episodes is padding")
        loss = total / count
        stats = {"loss": loss.item(), "valid_steps": int(count / self.config.action_dim),
                 "segments": s_total}
        if hold_weight:
            hold = held / max(float(held_count), 1.0)
            loss = loss + hold_weight * hold
            stats.update(hold=float(hold.detach()) if torch.is_tensor(hold) else hold,
                         held_writes=int(held_count))
        return loss, self._stats(stats)

    def _check_segments(self, episodes) -> None:
        """Segments must hold chunks of chunk_size actions, one every n_action_steps
        frames (or ``context.observe_every``) from the episode's first frame (what the
        policy does at inference)."""
        a, r = self.config.model.chunk_size, self.config.segment_stride
        n = self.config.n_action_steps
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
                f"n_action_steps={n} frames"
                + (f" and writes its state every context.observe_every={r}" if r != n else "")
                + f", so its episodes must be cut every {r} frames "
                f"from their first one (use EpisodeSegmentLoader(chunk_size={a}, stride={r}))")
