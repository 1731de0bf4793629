"""Learning-rate schedule: linear warmup, then cosine decay to ``decay_lr_ratio · lr``."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, steps: int, warmup: int, decay_ratio: float) -> float:
    """Learning rate of optimisation step ``step`` (0-based) of a ``steps``-step run."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(1, steps - warmup), 1.0)
    low = peak * decay_ratio
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
