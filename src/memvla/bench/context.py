"""``memvla bench context``: what each temporal-context kind costs over a long episode.

For every kind (``--kinds``; all at the widths of ``--preset``, ``tiny`` by default, with
the ``--set`` overrides), an untrained policy (``torch.manual_seed(--seed)``) runs one
episode of ``--steps`` ``select_action`` calls on a fixed random observation (batch 1,
uint8 image, state, task, on ``--device``) after ``--warmup`` untimed chunks; a chunk is
predicted every ``n_action_steps`` steps. Recorded at the calls that predict a chunk:

- latency: ``time.perf_counter`` around the ``select_action`` call (queued CUDA work
  waited for on a GPU); per target step (10, 100, 1,000, 10,000 and the episode's last),
  the median over the ``WINDOW`` chunk calls nearest to it (their steps are in the JSON),
  and the ratio of the last target's to the first's. These are as recorded along the
  episode, so a drift of the machine over the run enters that ratio;
- the paired ratio, which removes the drift: after the episode, the model predicts a
  chunk (``sample_actions``, or ``predict`` in the parallel family) alternately from the
  model state the chunk call nearest to step 10 read and from the one the last chunk call
  read (``--repeats`` times each, on the same encoded observation), late median / early;
- prefix tokens: a forward pre-hook on the backbone records the length of the sequence it
  runs over (the new prefix tokens) and the keys these attend to (the new ones and the
  KV cache of earlier turns, which only the slow-fast kinds carry);
- carried-state bytes: ``numel · element_size`` summed over
  :func:`memvla.context.state_leaves` of ``policy.context_state`` after the chunk call
  (what is allocated: a buffer's spare capacity counts).

- resident memory: the process's RSS after each chunk call; per target step the largest
  so far (``peak_rss_bytes``), beside the RSS when the kind's episode began.

``mamba`` is the flow family with a Mamba backbone carrying its recurrent state
(``model.backbone=mamba``, ``context.kind=ssm_state``): its prefix tokens attend no keys.

The full-history baseline is the slow-fast kind with the whole episode in its KV cache
(``context.num_turns=0``) and no slow memory: its cost grows with the episode, which stops
early once its carried state passes ``--max-state-mb`` (the step is reported).

``--success`` also trains and evaluates the demo's variants of the kinds (``--variants``)
with :func:`memvla.demo.run_sweep`, on the task settings of ``memvla bench memory
--success`` (tens of minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from .timing import format_table, timed_call

HELP = "cost of each temporal-context kind over a long episode (latency, tokens, state)"

# kind name -> the dotted overrides (of the policy config) that make it
KINDS = {
    "none": [],
    "memory_tokens": ["context.kind=memory_tokens"],
    "frames": ["context.kind=frames"],
    "frames-pooled": ["context.kind=frames", "context.frames_mode=pooled"],
    "frames-mem": ["context.kind=frames", "context.frames_mode=mem"],
    "slow_fast": ["context.kind=slow_fast"],
    "full-history": ["context.kind=slow_fast", "context.num_turns=0", "context.num_history=0"],
    "mamba": ["model.backbone=mamba", "context.kind=ssm_state"],
}
AT = (10, 100, 1000, 10000)  # target steps of the figures
WINDOW = 5  # chunk calls per latency figure: the nearest to the target step
TASK = "remember the color and touch it later"
SUCCESS_VARIANTS = "plain,memory-bptt,frames,frames-mem,slow-fast,plain-twin"


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=10000, help="episode steps (10000)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated subset of: {', '.join(KINDS)}")
    parser.add_argument("--preset", default="tiny", help="the policy preset (tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override of every kind (repeatable), e.g. "
                        "--set model.num_steps=5")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed chunks from each of the early and the late state (20)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed chunks before the episode (3)")
    parser.add_argument("--max-state-mb", type=float, default=1024.0,
                        help="stop a kind's episode once its carried state exceeds this (1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs (0)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available, "
                        "else cpu)")
    parser.add_argument("--success", action="store_true",
                        help="also train and evaluate the variants (long: tens of minutes)")
    parser.add_argument("--tasks", default="remember-color",
                        help="--success: comma-separated tasks (remember-color; or shell-game)")
    parser.add_argument("--variants", default=SUCCESS_VARIANTS,
                        help=f"--success: the demo's variants ({SUCCESS_VARIANTS})")
    parser.add_argument("--episodes", type=int, default=4000,
                        help="--success: expert episodes per task (4000)")
    parser.add_argument("--train-steps", type=int, default=10000,
                        help="--success: training steps per variant (10000)")
    parser.add_argument("--eval-episodes", type=int, default=100,
                        help="--success: evaluation episodes per variant (100)")
    parser.add_argument("--out", default="outputs/bench_context",
                        help="--success: sweep directory (outputs/bench_context)")
    parser.add_argument("--no-progress", action="store_true")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def kind_config(kind: str, preset: str = "tiny", overrides=()):
    """The policy config of ``kind`` on ``preset`` with ``overrides``."""
    from ..presets import get_preset

    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    return get_preset(preset, [*overrides, *KINDS[kind]])


def check_arguments(args) -> list[str]:
    """The kinds to run; every bad argument (and every kind's config) fails here, before any
    timing."""
    from ..policies import policy_device

    for flag, value, low in (("--steps", args.steps, 1), ("--repeats", args.repeats, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.max_state_mb <= 0:
        raise ValueError(f"--max-state-mb must be > 0, got {args.max_state_mb}")
    kinds = _names(args.kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"--kinds: expected names among {', '.join(KINDS)}, got "
                         f"{args.kinds!r}" + (f" (unknown: {', '.join(unknown)})" if unknown
                                              else ""))
    policy_device(args.device)
    for kind in kinds:
        kind_config(kind, args.preset, args.set)
    if args.success:
        from ..demo import VARIANTS

        known = [v.name for v in VARIANTS]
        bad = [v for v in _names(args.variants) if v not in known]
        if bad or not _names(args.variants):
            raise ValueError(f"--variants: expected names among {', '.join(known)}, got "
                             f"{args.variants!r}")
        from ..envs.registry import TASKS

        tasks = [t for t in _names(args.tasks) if t not in TASKS]
        if tasks or not _names(args.tasks):
            raise ValueError(f"--tasks: expected names among {', '.join(TASKS)}, got "
                             f"{args.tasks!r}")
        for flag in ("episodes", "train_steps", "eval_episodes"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(args, flag)}")
    return kinds


def observation(cfg, device, seed: int = 0) -> dict:
    """One fixed random observation (batch 1) on ``device``."""
    import torch

    c, h, w = cfg.image_shape
    g = torch.Generator().manual_seed(seed)
    obs = {k: torch.randint(0, 256, (1, h, w, c), dtype=torch.uint8, generator=g).to(device)
           for k in cfg.image_keys}  # (1, H, W, C) per camera
    obs["observation.state"] = torch.randn(1, cfg.state_dim, generator=g).to(device)  # (1, Ds)
    obs["task"] = [TASK]
    return obs


def state_bytes(state) -> int:
    """Bytes of the tensors of a context state (0 for None)."""
    from ..context import state_leaves

    return sum(t.numel() * t.element_size() for t in state_leaves(state))


@dataclass
class ChunkCall:
    step: int
    ms: float
    tokens: int  # new prefix tokens the backbone ran over
    keys: int  # keys they attended: new + cached
    state_bytes: int  # carried after the call
    rss_bytes: int = 0  # the process's resident memory after the call


def resident_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm; else its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def targets(done: int) -> list[int]:
    """The steps figures are given at: those of ``AT`` the episode reached, and its last."""
    return sorted({t for t in AT if t <= done} | {done})


def around(chunks: list[ChunkCall], target: int, k: int = WINDOW) -> dict:
    """Median latency of the ``k`` chunk calls nearest to step ``target``; tokens, keys
    and state bytes of the nearest one."""
    near = sorted(chunks, key=lambda c: abs(c.step - target))[:k]
    return {"window_steps": sorted(c.step for c in near),
            "chunk_ms": statistics.median(c.ms for c in near),
            "step": near[0].step, "prefix_tokens": near[0].tokens,
            "attended_keys": near[0].keys, "state_bytes": near[0].state_bytes,
            "peak_rss_bytes": max((c.rss_bytes for c in chunks if c.step <= target),
                                  default=0)}


def episode_cost(kind: str, steps: int, preset: str = "tiny", overrides=(), device=None,
                 repeats: int = 20, warmup: int = 3, max_state_mb: float = 1024.0,
                 seed: int = 0) -> dict:
    """One episode of ``steps`` select_action calls of an untrained ``kind`` policy and the
    paired early / late chunk timing after it (see the module's doc)."""
    import torch

    from ..policies import make_policy, policy_device
    from .timing import cuda_sync, time_interleaved

    device = policy_device(device)
    sync = cuda_sync if device.type == "cuda" else None
    torch.manual_seed(seed)
    policy = make_policy(kind_config(kind, preset, overrides)).to(device).eval()
    cfg, model = policy.config, policy.model
    obs = observation(cfg, device, seed)
    n = cfg.n_action_steps
    flow = cfg.family == "flow"
    backbone = model.vlm_with_expert.text_model if flow else model.decoder
    seen: list[tuple[int, int]] = []  # (new tokens, attended keys) per backbone call
    if flow and model.cfg.backbone == "mamba":  # args: x (B, N, D), states: no keys
        hook = backbone.backbone.register_forward_pre_hook(
            lambda _module, args: seen.append((args[0].shape[1], args[0].shape[1])))
    else:  # args: x (B, N, D), positions, mask (B, N, L)
        hook = backbone.register_forward_pre_hook(
            lambda _module, args: seen.append((args[0].shape[1], args[2].shape[-1])))
    rss_start = resident_bytes()
    last_chunk = 1 + n * ((steps - 1) // n)
    early_step = min(1 + n * round((AT[0] - 1) / n), last_chunk)  # the chunk nearest step 10
    chunks: list[ChunkCall] = []
    early = late = stopped = early_at = None
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                policy.predict_action_chunk(obs)
            policy.reset()
            for step in range(1, steps + 1):
                predicts = policy.queued_actions == 0
                if predicts:  # the model state this chunk reads, as the policy builds it
                    seen_now = policy.observed_images(obs)
                    late = policy._context_input(seen_now, 1, obs)[0]  # (untimed)
                    if early_at is None or step == early_step:  # (an episode may stop sooner)
                        early, early_at = late, step
                ms = 1e3 * timed_call(lambda: policy.select_action(obs), sync)
                if predicts:
                    nbytes = state_bytes(policy.context_state)
                    chunks.append(ChunkCall(step, ms, *seen[-1], nbytes, resident_bytes()))
                    if nbytes > max_state_mb * 2 ** 20:
                        stopped = step
                        break
            inputs = policy.encode_observation(obs)  # images, ids, pad, state
            predict = model.sample_actions if flow else model.predict
            paired = time_interleaved(
                {"early": lambda: predict(*inputs, context_state=early),
                 "late": lambda: predict(*inputs, context_state=late)},
                repeats, warmup=1, sync=sync)
    finally:
        hook.remove()
    done = stopped or steps
    at = {str(t): around(chunks, t) for t in targets(done)}
    first, last = at[str(min(map(int, at)))], at[str(done)]
    e, lt = paired["early"], paired["late"]
    return {"kind": kind, "overrides": list(KINDS[kind]), "steps": done, "stopped_at": stopped,
            "chunk_every": n, "chunk_calls": len(chunks),
            "tokens_per_image": cfg.model.tokens_per_image, "cameras": len(cfg.cameras),
            "at": at, "latency_ratio": last["chunk_ms"] / first["chunk_ms"],
            "rss_start_bytes": rss_start,
            "paired": {"early_step": early_at, "late_step": chunks[-1].step,
                       "early": e.to_dict(), "late": lt.to_dict(),
                       "ratio": lt.median_ms / e.median_ms},
            "device": str(device)}


def success_sweeps(args) -> list[dict]:
    """:func:`memvla.demo.run_sweep` of ``--variants`` per task, with the task settings of
    ``memvla bench memory --success`` (its defaults; ``--episodes``, ``--train-steps``,
    ``--eval-episodes`` and ``--device`` from here)."""
    from ..demo import run_sweep
    from . import memory

    parser = argparse.ArgumentParser()
    memory.add_arguments(parser)
    settings = parser.parse_args([])
    settings.variants, settings.episodes = args.variants, args.episodes
    settings.steps, settings.eval_episodes = args.train_steps, args.eval_episodes
    settings.device = args.device
    return [run_sweep(Path(args.out) / task, memory.sweep_settings(settings, task),
                      progress=not args.no_progress, overwrite=True, report=False)
            for task in _names(args.tasks)]


def _tokens(f: dict) -> str:
    cached = f["attended_keys"] - f["prefix_tokens"]
    return f"{f['prefix_tokens']}+{cached}" if cached else str(f["prefix_tokens"])


def render(results: dict[str, dict], steps: int) -> str:
    cols = targets(steps)
    lat, size = [], []
    for kind, r in results.items():
        at = r["at"]
        lat.append([kind, *[f"{at[str(t)]['chunk_ms']:.2f}" if str(t) in at else "-"
                            for t in cols],
                    f"{r['latency_ratio']:.3f}", f"{r['paired']['ratio']:.3f}",
                    r["stopped_at"] or ""])
        size.append([kind, *[_tokens(at[str(t)]) if str(t) in at else "-" for t in cols],
                     *[f"{at[str(t)]['state_bytes'] / 1024:.1f}" if str(t) in at else "-"
                       for t in cols]])
    first, last = cols[0], cols[-1]
    return "\n\n".join([
        format_table(["kind", *[f"ms@{t}" for t in cols], f"ms {last}/{first}",
                      "paired late/early", "stopped at"], lat),
        format_table(["kind", *[f"tokens@{t}" for t in cols],
                      *[f"state KiB@{t}" for t in cols]], size)])


def _success_table(sweeps: list[dict]) -> str:
    rows = []
    for sw in sweeps:
        for r in sw["variants"]:
            e, lg = r["eval"], r.get("eval_longer") or {}
            rows.append([sw["task"], r["variant"], f"{e['success_rate']:.1%}",
                         f"{e['ci95'][0]:.0%}-{e['ci95'][1]:.0%}",
                         f"{lg.get('success_rate', float('nan')):.1%}",
                         f"{sw['chance_level']:.1%}", f"{e['chunk_latency_ms']['p50']:.2f}"])
    return format_table(["task", "variant", "success", "95% CI", "3x longer", "chance",
                         "chunk ms"], rows, align="llrrrrr")


def run(args) -> int:
    from ..policies import policy_device
    from ..utils import atomic_write_json
    from .timing import torch_info

    kinds = check_arguments(args)  # before any timing
    device = policy_device(args.device)
    info = torch_info()
    load_before = os.getloadavg()
    results = {}
    for kind in kinds:
        print(f"{kind}: {args.steps} steps ...", flush=True)
        results[kind] = episode_cost(kind, args.steps, args.preset, args.set, device,
                                     args.repeats, args.warmup, args.max_state_mb, args.seed)
    load_after = os.getloadavg()
    r0 = next(iter(results.values()))
    print()
    print(render(results, args.steps))
    print(f"\n{args.preset}, batch 1, {device}, torch {info['torch']}, {info['threads']} "
          f"threads, load avg {load_before[0]:.1f} -> {load_after[0]:.1f}; a chunk every "
          f"{r0['chunk_every']} steps, {r0['tokens_per_image']} tokens per image")
    print(f"ms@t: median select_action latency of the {WINDOW} chunk calls nearest to step t "
          "(as recorded along the episode); paired: a chunk from the last chunk call's model "
          f"state over one from step {r0['paired']['early_step']}'s, timed alternately after "
          f"the episode ({args.repeats} each)")
    print("tokens@t: new prefix tokens the backbone runs over (+ cached keys of earlier "
          "turns they attend to); state KiB@t: the carried context state")
    out = {"bench": "context", "preset": args.preset, "overrides": list(args.set),
           "device": str(device), "batch": 1, "steps": args.steps, "repeats": args.repeats,
           "warmup": args.warmup, "window": WINDOW, "seed": args.seed,
           "max_state_mb": args.max_state_mb, "load_avg_before": list(load_before),
           "load_avg_after": list(load_after), "kinds": results, "torch": info}
    if args.success:
        sweeps = success_sweeps(args)
        print()
        print(_success_table(sweeps))
        out["success"] = sweeps
    if args.json:
        atomic_write_json(Path(args.json), json.loads(json.dumps(out, default=str)))
        print(f"wrote {args.json}")
    return 0
