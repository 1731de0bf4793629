"""Which past frames StreamVLN's slow memory holds.

Before the frame at time t0, the memory samples the earlier frames 0..t0-1 with a uniform
step: ``range(0, t0, max(t0 // num_history, 1))``.

The source facts, from StreamVLN's code: its training data
(``streamvln/dataset/vln_action_dataset.py``) takes ``np.arange(0, t0, max(t0 //
num_history, 1))`` for a window starting at t0 and no history frame at t0 = 0; its
evaluation (``streamvln/streamvln_eval.py``) slices the frames with ``slice(0, t0, t0 //
num_history)`` at each positive multiple t0 of ``num_frames`` (32). Neither caps the count
at ``num_history``: it is ceil(t0 / step), exactly ``num_history`` when ``num_history``
divides t0 (always so in StreamVLN: t0 a multiple of 32, ``num_history`` = 8), t0 itself
when t0 < ``num_history``, and at most 2·``num_history`` − 1 otherwise (t0 = 15,
``num_history`` = 8: step 1, 15 frames). memvla matches that: no cap, none at t0 = 0.

Shape letters: B as in :mod:`memvla.glossary`; K the history slots of the batched form.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(num_history: int) -> None:
    if num_history < 1:
        raise ValueError(f"history: num_history must be >= 1, got {num_history}")


def history_step(t0: int, num_history: int) -> int:
    """The sampling step before frame t0: max(t0 // num_history, 1)."""
    return max(t0 // num_history, 1)


def max_history(num_history: int) -> int:
    """The most frames :func:`history_indices` returns for any t0: 2·num_history − 1."""
    _check(num_history)
    return 2 * num_history - 1


def history_indices(t0: int, num_history: int) -> list[int]:
    """The frames the slow memory holds before frame ``t0``: 0, step, 2·step, ... < t0."""
    _check(num_history)
    if t0 < 0:
        raise ValueError(f"history: t0 must be >= 0, got {t0}")
    return list(range(0, t0, history_step(t0, num_history)))


def history_index_tensor(t0: Tensor, num_history: int,
                         max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Batched :func:`history_indices` for episodes at different times.

    t0 (B,) integer -> (indices (B, K) long, valid (B, K) bool), K = ``max_len`` (default
    :func:`max_history`, enough for any t0). Row b holds ``history_indices(t0[b])`` in its
    first slots, marked valid; the slots after them hold index 0 (safe to gather with) and
    are not valid. A ``max_len`` too small for some row is an error.
    """
    _check(num_history)
    if t0.ndim != 1 or t0.dtype.is_floating_point or t0.dtype == torch.bool:
        raise ValueError(f"history: t0 must be a (B,) integer tensor, got shape "
                         f"{tuple(t0.shape)} and dtype {t0.dtype}")
    if bool((t0 < 0).any()):
        raise ValueError(f"history: t0 must be >= 0, got {t0.tolist()}")
    k = max_history(num_history) if max_len is None else max_len
    t0 = t0.long()
    step = (t0 // num_history).clamp(min=1)  # (B,)
    count = (t0 + step - 1) // step  # (B,)
    if max_len is not None and bool((count > max_len).any()):
        raise ValueError(f"history: max_len must be >= {int(count.max())} (the most "
                         f"history frames of this batch), got {max_len}")
    slot = torch.arange(k, device=t0.device)  # (K,)
    valid = slot < count[:, None]  # (B, K)
    indices = torch.where(valid, slot * step[:, None], 0)  # (B, K)
    return indices, valid
