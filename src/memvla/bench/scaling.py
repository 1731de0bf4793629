"""``memvla bench scaling``: how every temporal-context kind scales with the episode.

For each kind (``--kinds``: full history in the KV cache, frames, slow-fast, memory tokens,
the Mamba state, and none as the floor; all at the widths of ``--preset``) one untrained
policy runs an episode of ``--steps`` steps as :mod:`memvla.bench.context` runs it
(:func:`memvla.bench.context.episode_cost`: the median chunk latency near steps 10, 100,
1,000 and 10,000, the carried-state bytes, the paired late / early ratio that removes the
machine's drift), with the process's peak resident memory along the episode. Then the
parallel selective scan against its sequential reference (:func:`memvla.bench.ssm_speed.
scan_speed`) at ``--scan-lengths``. A log-log plot of latency against the episode step,
one line per kind, is saved beside the JSON (``--plot``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import context
from .timing import format_table

HELP = "every temporal-context kind against the episode length (latency, state, memory)"
KINDS = "none,full-history,frames,slow_fast,memory_tokens,mamba"


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=10000, help="episode steps (10000)")
    parser.add_argument("--kinds", default=KINDS, help=f"comma-separated, of: "
                        f"{', '.join(context.KINDS)} (default {KINDS})")
    parser.add_argument("--preset", default="tiny", help="the widths of every kind (tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override of every kind (repeatable)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="paired chunks from each of the early and late state (10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-state-mb", type=float, default=1024.0,
                        help="stop a kind's episode once its carried state exceeds this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--scan-lengths", default="256,1024,4096",
                        help="sequence lengths of the scan throughput ('' to skip)")
    parser.add_argument("--scan-repeats", type=int, default=5)
    parser.add_argument("--plot", help="the latency plot (PNG; default: beside --json, or "
                        "outputs/bench_scaling.png)")


def plot(results: dict[str, dict], path: Path) -> None:
    """Latency against the episode step, log-log, one line per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, r in results.items():
        steps = sorted(int(t) for t in r["at"])
        ax.plot(steps, [r["at"][str(t)]["chunk_ms"] for t in steps], marker="o", label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("episode step")
    ax.set_ylabel("chunk latency (ms, median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: dict[str, dict], steps: int) -> str:
    cols = context.targets(steps)
    rows = []
    for kind, r in results.items():
        at = r["at"]

        def cell(t, key, scale, fmt, at=at):
            return fmt.format(at[str(t)][key] / scale) if str(t) in at else "-"

        rows.append([kind, *[cell(t, "chunk_ms", 1, "{:.2f}") for t in cols],
                     f"{r['paired']['ratio']:.3f}",
                     *[cell(t, "state_bytes", 1024, "{:.1f}") for t in cols],
                     *[cell(t, "peak_rss_bytes", 2 ** 20, "{:.0f}") for t in cols],
                     r["stopped_at"] or ""])
    return format_table(["kind", *[f"ms@{t}" for t in cols], "paired late/early",
                         *[f"state KiB@{t}" for t in cols], *[f"RSS MiB@{t}" for t in cols],
                         "stopped at"], rows)


def run(args) -> int:
    from ..policies import policy_device
    from ..utils import atomic_write_json
    from .ssm_speed import format_rows, scan_speed
    from .timing import torch_info

    lengths = [int(x) for x in args.scan_lengths.split(",") if x.strip()]
    check = argparse.Namespace(**{**vars(args), "success": False})
    kinds = context.check_arguments(check)  # every bad argument fails before any timing
    device = policy_device(args.device)
    results = {}
    for kind in kinds:
        print(f"{kind}: {args.steps} steps ...", flush=True)
        results[kind] = context.episode_cost(kind, args.steps, args.preset, args.set, device,
                                             args.repeats, args.warmup, args.max_state_mb,
                                             args.seed)
    print()
    print(render(results, args.steps))
    scan = []
    if lengths:
        scan = scan_speed(lengths, repeats=args.scan_repeats, device=str(device))
        print()
        print(format_rows(scan))
    out_plot = Path(args.plot) if args.plot else (
        Path(args.json).with_suffix(".png") if args.json else Path("outputs/bench_scaling.png"))
    plot(results, out_plot)
    print(f"\n{args.preset} widths, batch 1, {device}, load avg {os.getloadavg()[0]:.1f}; "
          f"plot: {out_plot}")
    if args.json:
        atomic_write_json(Path(args.json), {"bench": "scaling", "preset": args.preset,
                                            "steps": args.steps, "kinds": results,
                                            "scan": scan, "plot": str(out_plot),
                                            "torch": torch_info()})
        print(f"wrote {args.json}")
    return 0
