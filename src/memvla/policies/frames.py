"""What a policy trained on frames reads of the dataset around each frame.

A plain policy learns from frames with their action chunk (``action`` (B, A, Da) and
``action_is_pad``). A flow-matching policy whose token pruner reads the previously
executed chunk (``pruner.action_context = "prev_chunk"``) also needs, for every frame, the
``n_action_steps`` actions executed before it — what it keeps between calls at inference —
as ``prev_action`` (B, n, Da) with ``prev_action_is_pad`` (B, n) True before the episode's
first frame. A frame-history policy (``context.kind = "frames"``) needs every camera's past
frames, ``history.<camera key>`` (B, K, ...) with ``history.<camera key>_is_pad`` (B, K)
(with voxel pruning also ``history.observation.depth`` / ``pose`` / ``intrinsics``).
:func:`frame_delta_indices` asks the dataset for them in one stack with what follows, and
:class:`FrameCollate` splits them. Recurrent policies train on whole episodes instead
(:mod:`memvla.data.segments`), where the previous chunk is the previous segment's.
"""

from __future__ import annotations

from torch.utils.data import default_collate

from ..configs import PolicyConfig

PREV_ACTION_KEY = "prev_action"
HISTORY_PREFIX = "history."  # history.observation.images.<camera>: the frames before


def reads_prev_chunk(cfg: PolicyConfig) -> bool:
    """True when the policy's token pruner reads the previously executed action chunk."""
    pruner = getattr(cfg.model, "pruner", None)
    return bool(pruner is not None and pruner.enabled and pruner.action_context == "prev_chunk")


def prev_steps(cfg: PolicyConfig) -> int:
    """Actions before each training frame the policy reads (0 or ``n_action_steps``)."""
    return cfg.n_action_steps if reads_prev_chunk(cfg) else 0


def frame_delta_indices(cfg: PolicyConfig) -> dict[str, list[int]] | None:
    """The dataset's ``delta_indices`` for frame training (None: the policy trains on whole
    episodes): the previous actions, if read, then the action chunk; with frame history,
    every camera's past frames (``context.history_offsets``) then the current one."""
    if cfg.context.recurrent:
        return None
    deltas = {"action": list(range(-prev_steps(cfg), cfg.model.chunk_size))}
    history = cfg.context.history_offsets
    if history:
        deltas.update({key: [*history, 0] for key in history_keys(cfg)})
    return deltas


def history_keys(cfg: PolicyConfig) -> list[str]:
    """The features a frame-history policy reads with their past: every camera, and with
    voxel pruning the camera's depth, pose and intrinsics."""
    from .inputs import DEPTH_KEY, INTRINSICS_KEY, POSE_KEY

    geometry = [DEPTH_KEY, POSE_KEY, INTRINSICS_KEY] if cfg.context.voxel_size else []
    return [*cfg.image_keys, *geometry]


class FrameCollate:
    """Collate dataset items made with :func:`frame_delta_indices` into a training batch:
    ``action`` / ``action_is_pad`` hold the chunk, ``prev_action`` / ``prev_action_is_pad``
    the actions before it (when the policy reads them). Picklable, for loader workers."""

    def __init__(self, cfg: PolicyConfig):
        self.n = prev_steps(cfg)
        self.chunk = cfg.model.chunk_size
        self.history = len(cfg.context.history_offsets)
        self.image_keys = history_keys(cfg) if self.history else []

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        for key in self.image_keys:  # (B, K + 1, ...): the past frames, then the current
            frames, pad = batch.pop(key), batch.pop(f"{key}_is_pad")
            if frames.shape[1] != self.history + 1:
                raise ValueError(f"{key}: expected {self.history} past frames and the "
                                 f"current one per sample, got {frames.shape[1]}; build the "
                                 "dataset with frame_delta_indices(config)")
            batch[key] = frames[:, -1]  # (B, ...)
            batch[f"{HISTORY_PREFIX}{key}"] = frames[:, :-1]  # (B, K, ...)
            batch[f"{HISTORY_PREFIX}{key}_is_pad"] = pad[:, :-1]  # (B, K)
        if self.n == 0:
            return batch
        steps = batch["action"].shape[1]
        if steps != self.n + self.chunk:
            raise ValueError(f"action: expected {self.n} previous actions and a chunk of "
                             f"{self.chunk} ({self.n + self.chunk} steps) per frame, got "
                             f"{steps}; build the dataset with frame_delta_indices(config)")
        for key in ("action", "action_is_pad"):
            value = batch[key]
            batch[key.replace("action", PREV_ACTION_KEY)] = value[:, : self.n]  # (B, n, ...)
            batch[key] = value[:, self.n:]  # (B, A, ...)
        return batch
