"""What a policy trained on frames reads of the dataset around each frame.

A plain policy learns from frames with their action chunk (``action`` (B, A, Da) and
``action_is_pad``). A flow-matching policy whose token pruner reads the previously
executed chunk (``pruner.action_context = "prev_chunk"``) also needs, for every frame, the
``n_action_steps`` actions executed before it — what it keeps between calls at inference —
as ``prev_action`` (B, n, Da) with ``prev_action_is_pad`` (B, n) True before the episode's
first frame. :func:`frame_delta_indices` asks the dataset for both in one stack and
:class:`FrameCollate` splits them. Recurrent policies train on whole episodes instead
(:mod:`memvla.data.segments`), where the previous chunk is the previous segment's.
"""

from __future__ import annotations

from torch.utils.data import default_collate

from ..configs import PolicyConfig

PREV_ACTION_KEY = "prev_action"


def reads_prev_chunk(cfg: PolicyConfig) -> bool:
    """True when the policy's token pruner reads the previously executed action chunk."""
    pruner = getattr(cfg.model, "pruner", None)
    return bool(pruner is not None and pruner.enabled and pruner.action_context == "prev_chunk")


def prev_steps(cfg: PolicyConfig) -> int:
    """Actions before each training frame the policy reads (0 or ``n_action_steps``)."""
    return cfg.n_action_steps if reads_prev_chunk(cfg) else 0


def frame_delta_indices(cfg: PolicyConfig) -> dict[str, list[int]] | None:
    """The dataset's ``delta_indices`` for frame training (None: the policy trains on whole
    episodes): the previous actions, if read, then the action chunk."""
    if cfg.context.recurrent:
        return None
    return {"action": list(range(-prev_steps(cfg), cfg.model.chunk_size))}


class FrameCollate:
    """Collate dataset items made with :func:`frame_delta_indices` into a training batch:
    ``action`` / ``action_is_pad`` hold the chunk, ``prev_action`` / ``prev_action_is_pad``
    the actions before it (when the policy reads them). Picklable, for loader workers."""

    def __init__(self, cfg: PolicyConfig):
        self.n = prev_steps(cfg)
        self.chunk = cfg.model.chunk_size

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
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
