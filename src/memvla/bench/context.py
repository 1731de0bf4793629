"""``memvla bench context``: what each temporal-context kind costs over a long episode.

For every kind (``--kinds``; at the same widths: the ``--preset``, ``tiny`` by default,
with ``--set`` overrides), an untrained policy runs one episode of ``--steps``
``select_action`` calls on a fixed random observation (batch 1, on ``--device``); a chunk
is predicted every ``n_action_steps`` steps. Recorded at the chunk calls:

- latency (ms, CUDA work waited for): the median over the 5 chunk calls nearest to each
  of the steps 10, 100, 1,000 and 10,000 (those the episode reaches), and the ratio of
  the last to the first;
- prefix tokens: the new tokens the backbone runs over, and the keys they attend (new +
  cached ones: the slow-fast cache of earlier turns);
- carried-state bytes: the tensors the policy holds between steps.

The full-history baseline (slow-fast with the whole episode in the cache) grows; its
episode stops early when its carried state passes ``--max-state-mb`` (the step is
reported). Latencies are as recorded along the episode, so a drift of the machine over a
run enters their ratio. Training runs (success rates per kind) are not part of this bench:
``memvla demo --variants ...`` trains and evaluates the kinds on the same data and seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

HELP = "cost of each temporal-context kind over a long episode (latency, tokens, state)"

KINDS = {
    "none": [],
    "memory_tokens": ["context.kind=memory_tokens"],
    "frames": ["context.kind=frames"],
    "frames-pooled": ["context.kind=frames", "context.frames_mode=pooled"],
    "frames-mem": ["context.kind=frames", "context.frames_mode=mem"],
    "slow_fast": ["context.kind=slow_fast"],
    "full-history": ["context.kind=slow_fast", "context.num_turns=0", "context.num_history=0"],
}
AT = (10, 100, 1000, 10000)


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=10000, help="episode steps (10000)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated subset of: {', '.join(KINDS)}")
    parser.add_argument("--preset", default="tiny", help="the policy preset (tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of every kind, e.g. --set model.num_steps=5")
    parser.add_argument("--max-state-mb", type=float, default=1024.0,
                        help="stop a kind's episode once its carried state exceeds this (1024)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: CUDA when available, else cpu)")


def _check(args) -> list[str]:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"--kinds: expected names among {', '.join(KINDS)}, got "
                         f"{args.kinds!r}")
    return kinds


def _observation(cfg, device) -> dict:
    import torch

    c, h, w = cfg.image_shape
    g = torch.Generator().manual_seed(0)
    obs = {k: torch.randint(0, 256, (1, h, w, c), dtype=torch.uint8, generator=g)
           for k in cfg.image_keys}  # (1, H, W, C)
    obs["observation.state"] = torch.randn(1, cfg.state_dim, generator=g)  # (1, Ds)
    obs["task"] = ["remember the color and touch it later"]
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in obs.items()}


def state_bytes(policy) -> int:
    """Bytes of the tensors the policy carries between steps."""
    from ..context import state_leaves

    return sum(t.numel() * t.element_size() for t in state_leaves(policy.context_state))


def episode_cost(kind: str, steps: int, preset: str = "tiny", overrides: list[str] = (),
                 device=None, max_state_mb: float = 1024.0) -> dict:
    """One episode of ``steps`` select_action calls of an untrained ``kind`` policy."""
    import torch

    from ..policies import make_policy, policy_device
    from ..presets import get_preset
    from .timing import cuda_sync

    device = policy_device(device)
    torch.manual_seed(0)
    policy = make_policy(get_preset(preset, [*overrides, *KINDS[kind]])).to(device).eval()
    obs = _observation(policy.config, device)
    seen: list[tuple[int, int]] = []  # (new prefix tokens, attended keys) per backbone call

    def record(module, args):
        x, _, mask = args[:3]
        seen.append((x.shape[1], mask.shape[-1]))

    backbone = (policy.model.vlm_with_expert.text_model if policy.config.family == "flow"
                else policy.model.decoder)
    hook = backbone.register_forward_pre_hook(record)
    chunks: list[tuple[int, float, int, int, int]] = []  # step, ms, tokens, keys, bytes
    stopped = None
    try:
        with torch.inference_mode():
            for step in range(1, steps + 1):
                predicts = policy.queued_actions == 0
                cuda_sync()
                t0 = time.perf_counter()
                policy.select_action(obs)
                cuda_sync()
                ms = 1e3 * (time.perf_counter() - t0)
                if predicts:
                    tokens, keys = seen[-1]
                    chunks.append((step, ms, tokens, keys, state_bytes(policy)))
                    if chunks[-1][4] > max_state_mb * 2 ** 20:
                        stopped = step
                        break
    finally:
        hook.remove()
    return {"kind": kind, "overrides": list(KINDS[kind]), "steps": chunks[-1][0],
            "stopped_at": stopped, "chunk_every": policy.config.n_action_steps,
            "at": _around(chunks), "device": str(device)}


def _around(chunks: list[tuple[int, float, int, int, int]], k: int = 5) -> dict:
    """Per target step the episode reached: median latency of the k nearest chunk calls,
    and the tokens, keys and state bytes of the nearest one."""
    import statistics

    out = {}
    last = chunks[-1][0]
    for target in AT:
        if target > last:
            break
        near = sorted(chunks, key=lambda c: abs(c[0] - target))[:k]
        out[str(target)] = {"chunk_ms": statistics.median(c[1] for c in near),
                            "prefix_tokens": near[0][2], "attended_keys": near[0][3],
                            "state_bytes": near[0][4]}
    return out


def run(args) -> int:
    from ..utils import atomic_write_json
    from .timing import format_table, torch_info

    kinds = _check(args)  # before any timing
    results = {}
    for kind in kinds:
        results[kind] = episode_cost(kind, args.steps, args.preset, args.set, args.device,
                                     args.max_state_mb)
    rows = []
    for kind, r in results.items():
        at = r["at"]
        first, last = at[min(at, key=int)], at[max(at, key=int)]
        ratio = last["chunk_ms"] / first["chunk_ms"]
        r["latency_ratio_last_first"] = ratio
        rows.append([kind, *[f"{at[s]['chunk_ms']:.2f}" if s in at else "-" for s in
                             map(str, AT)], f"{ratio:.2f}", first["prefix_tokens"],
                     last["attended_keys"], f"{last['state_bytes'] / 1024:.1f}",
                     r["stopped_at"] or ""])
    print(format_table(["kind", *[f"ms@{s}" for s in AT], "last/first", "prefix tok",
                        "keys (last)", "state KiB (last)", "stopped at"], rows))
    if args.json:
        out = {"kinds": results, "preset": args.preset, "overrides": args.set,
               "torch": torch_info()}
        atomic_write_json(Path(args.json), json.loads(json.dumps(out)))
        print(f"wrote {args.json}")
    return 0
