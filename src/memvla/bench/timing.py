"""Timing helpers shared by the benchmarks: warmup + timed repeats with
``time.perf_counter``, summary statistics, an aligned plain-text table and a description of
the torch runtime. torch is imported only by :func:`torch_info` and :func:`cuda_sync`."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation between order
    statistics (numpy's default method)."""
    if not values:
        raise ValueError("percentile: no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


@dataclass
class Timing:
    """Wall-clock times of the timed runs of one call, in seconds."""

    name: str
    runs_s: list[float]
    warmup: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.runs_s)

    @property
    def p90_ms(self) -> float:
        return 1e3 * percentile(self.runs_s, 90.0)

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.runs_s)

    @property
    def mean_ms(self) -> float:
        return 1e3 * statistics.fmean(self.runs_s)

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "min_ms": self.min_ms,
                "mean_ms": self.mean_ms, "repeats": len(self.runs_s), "warmup": self.warmup,
                "runs_ms": [1e3 * t for t in self.runs_s], **self.extra}


def timed_call(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Seconds of one call of ``fn`` by ``time.perf_counter``; ``sync`` (e.g.
    :func:`cuda_sync`) runs before each clock read so that queued device work counts."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 2, name: str = "",
              sync: Callable[[], None] | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times, each timed alone with
    ``time.perf_counter``. ``sync`` (e.g. :func:`cuda_sync`) runs before each clock read so
    that asynchronous device work is counted."""
    if repeats <= 0:
        raise ValueError(f"time_call: repeats must be > 0, got {repeats}")
    if warmup < 0:
        raise ValueError(f"time_call: warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    return Timing(name, [timed_call(fn, sync) for _ in range(repeats)], warmup)


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int | dict[str, int],
                     warmup: int | dict[str, int] = 2,
                     sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time several calls in rounds (one run of each per round, in order) rather than one
    after the other, so that a change in machine load over time affects all of them alike
    and ratios between them stay meaningful. ``repeats`` / ``warmup`` may differ per call
    (a dict by name): a call takes part in the first ``repeats[name]`` rounds only."""
    names = list(calls)
    reps = {n: repeats[n] if isinstance(repeats, dict) else repeats for n in names}
    warm = {n: warmup[n] if isinstance(warmup, dict) else warmup for n in names}
    for n in names:
        if reps[n] <= 0 or warm[n] < 0:
            raise ValueError(f"time_interleaved: {n!r} needs repeats > 0 and warmup >= 0, got "
                             f"{reps[n]} and {warm[n]}")
    for i in range(max(warm.values())):
        for n in names:
            if i < warm[n]:
                calls[n]()
    runs: dict[str, list[float]] = {n: [] for n in names}
    for i in range(max(reps.values())):
        for n in names:
            if i < reps[n]:
                runs[n].append(timed_call(calls[n], sync))
    return {n: Timing(n, runs[n], warm[n]) for n in names}


def cuda_sync() -> None:
    """Wait for queued CUDA work (a no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_info() -> dict[str, Any]:
    """torch version and thread settings, for the JSON figures of a benchmark."""
    import platform

    import torch

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 align: str | None = None) -> str:
    """An aligned plain-text table. ``align`` has one letter per column, ``l`` or ``r``
    (default: the first column left, the others right). Cells are ``str()``-ed."""
    n = len(headers)
    align = align or "l" + "r" * (n - 1)
    if len(align) != n or set(align) - {"l", "r"}:
        raise ValueError(f"format_table: align must be {n} letters of 'l'/'r', got {align!r}")
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != n:
            raise ValueError(f"format_table: a row has {len(row)} cells, expected {n}")
    widths = [max(len(row[i]) for row in cells) for i in range(n)]

    def line(row: list[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w)
                 for c, w, a in zip(row, widths, align, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
