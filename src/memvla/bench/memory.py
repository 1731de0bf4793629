"""``memvla bench memory``: what recurrent memory tokens buy and cost.

Cost (no training): the median latency of ``predict_action_chunk`` with and without memory
tokens, measured alternately in one run (the ratio is the figure), for ``tiny`` and for
``smolvla-450m`` at reduced depth; and, over one long episode of a memory policy, the
latency and the memory's norm near step 10 and near step 10,000.

Success (``--success``): for each task, the sweep of :mod:`memvla.demo` at the demo's
model and learning rate (expert data; plain VLA, memory tokens with k = 0, memory tokens
with BPTT through the episode, and the plain VLA on the memoryless twin as the ceiling;
chance as the floor), each evaluated on the same seeds, and again with a ``--longer`` (3)
× longer delay (remember-color, fixed layout and colours by default) or that many times
more swaps (shell-game) than the longest training episode. The expert data varies the
delay (0..--delay) or the number of swaps (0..--swaps) per episode, so the memory learns
short holds first; evaluation is at --delay / --swaps. For the memory variants on
remember-color, :func:`cue_sensitivity` says whether the written memory depends on the
cue at all.

Drift (``--drift DELAYS --checkpoint RUN``, nothing else runs): :func:`memory_drift`, whether
a trained remember-color memory before the choice stays where it is at the trained delay.

Everything runs on ``--device`` (default: CUDA when available, else the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

from .timing import cuda_sync, timed_call

HELP = "memory tokens: latency cost, long-episode stability, success vs the baselines"


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per variant")
    parser.add_argument("--long-steps", type=int, default=10_000,
                        help="environment steps of the long episode")
    parser.add_argument("--checkpoint", help="a trained memory policy (checkpoint or run) for "
                        "the long episode (default: an untrained tiny memory policy)")
    parser.add_argument("--drift", metavar="DELAYS",
                        help="only this: how --checkpoint's remember-color memory before the "
                        "choice drifts at these delays (comma-separated, e.g. 90,300) from "
                        "where it is at --delay (the trained delay)")
    parser.add_argument("--drift-episodes", type=int, default=20,
                        help="episodes per cue for --drift")
    parser.add_argument("--success", action="store_true",
                        help="also train and evaluate the variants (long: tens of minutes)")
    parser.add_argument("--tasks", default="remember-color,shell-game")
    parser.add_argument("--episodes", type=int, default=4000, help="expert episodes per task")
    parser.add_argument("--steps", type=int, default=10000, help="training steps per variant")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--delay", type=int, default=30, help="remember-color delay")
    parser.add_argument("--min-delay", type=int, default=0,
                        help="remember-color: draw each training episode's delay from "
                        "[MIN_DELAY, --delay] (default 0; with --delay every episode has the "
                        "same); evaluation stays at --delay")
    parser.add_argument("--palette-size", type=int, default=3,
                        help="remember-color: colours drawn from the first N of the palette (3)")
    parser.add_argument("--layout", default="fixed", choices=["fixed", "random"],
                        help="remember-color: disc places, the same every episode (fixed, the "
                        "default: what is left to learn is the memory) or drawn per episode")
    parser.add_argument("--colors", default="fixed", choices=["fixed", "shuffled"],
                        help="remember-color: each place keeps its colour (fixed, the default) "
                        "or the colours swap places per episode (shuffled)")
    parser.add_argument("--swap-steps", type=int, default=8,
                        help="shell-game: frames per swap (8 = the chunk: the memory, written "
                        "once per chunk, sees every swap once)")
    parser.add_argument("--swaps", type=int, default=3, help="shell-game: swaps per episode")
    parser.add_argument("--longer", type=int, default=3, help="the second evaluation's "
                        "delay / swaps, as a multiple of the trained ones (3)")
    parser.add_argument("--min-swaps", type=int, default=0,
                        help="shell-game: draw each training episode's number of swaps from "
                        "[MIN_SWAPS, --swaps] (default 0; with --swaps every episode has the "
                        "same); evaluation stays at --swaps")
    parser.add_argument("--action-noise", type=float, default=0.0,
                        help="perturbed demonstrations (DART) of the expert data (0)")
    parser.add_argument("--variants", default="memory-bptt,plain-twin,memory-k0,plain",
                        help="comma-separated subset of the demo's variants")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="task option of every task, data and evaluation (repeatable), "
                        "e.g. --opt cue_steps=2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override of every variant (repeatable), e.g. "
                        "--set policy.context.write=norm")
    parser.add_argument("--out", default="outputs/bench_memory", help="sweep directory")
    parser.add_argument("--device", help="where the policies run: cpu, cuda or cuda:N "
                        "(default: CUDA when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true")


def _policies(preset: str, overrides: list[str], device=None):
    from ..policies import make_policy, policy_device
    from ..presets import get_preset

    device = policy_device(device)
    shared = [o for o in overrides if not o.startswith("context.")]  # options of the memory
    plain = make_policy(get_preset(preset, shared)).to(device).eval()
    mem_cfg = get_preset(preset, [*overrides, "context.kind=memory_tokens"])
    memory = make_policy(mem_cfg).to(device).eval()
    return plain, memory


def _observation(cfg, device, b: int = 1):
    """A random observation of ``b`` samples on ``device``."""
    import torch

    c, h, w = cfg.image_shape
    g = torch.Generator(device=device).manual_seed(0)
    obs = {k: torch.randint(0, 256, (b, h, w, c), dtype=torch.uint8, generator=g,
                            device=device) for k in cfg.image_keys}  # (B, H, W, C)
    obs["observation.state"] = torch.randn(b, cfg.state_dim, generator=g,
                                           device=device)  # (B, Ds)
    obs["task"] = ["remember the color and touch it later"] * b
    return obs


def latency_cost(preset: str, overrides: list[str], repeats: int, device=None) -> dict:
    """Median predict_action_chunk latency with / without memory, timed alternately."""
    import statistics

    import torch

    plain, memory = _policies(preset, overrides, device)
    memory.model.load_state_dict(plain.model.state_dict(), strict=False)
    obs = _observation(plain.config, plain.device)
    times = {"plain": [], "memory": []}
    with torch.inference_mode():
        for p in (plain, memory):  # warmup
            for _ in range(2):
                p.predict_action_chunk(obs)
        for _ in range(repeats):
            for name, p in (("plain", plain), ("memory", memory)):
                times[name].append(timed_call(lambda p=p: p.predict_action_chunk(obs), cuda_sync))
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    m = memory.config.context.num_tokens
    return {"preset": preset, "overrides": overrides, "memory_tokens": m,
            "plain_ms": med["plain"], "memory_ms": med["memory"],
            "ratio": med["memory"] / med["plain"], "repeats": repeats,
            "device": str(plain.device)}


def long_episode(steps: int, checkpoint: str | None = None, repeats: int = 30,
                 overrides: tuple[str, ...] = (), device=None) -> dict:
    """Latency and memory norm of a memory policy over one long episode (select_action).

    The latencies near step 10 and near the last step are as recorded along the episode,
    so machine drift over the run enters their ratio. ``paired_ratio`` removes it: after
    the episode, the model samples a chunk alternately from the memory carried to the last
    step and from the memory of step 10 (``repeats`` times each, on the same encoded
    observation), and the ratio of the two medians says what the long episode itself
    costs. ``norm_bound`` is the largest norm a
    memory token can have (:meth:`FlowMatchingVLA.memory_norm_bound`). Without a
    checkpoint: an untrained ``tiny`` memory policy with these config ``overrides``.
    """
    import statistics

    import torch

    if checkpoint:
        from ..policies import load_policy

        policy = load_policy(checkpoint, device=device).eval()
        if not policy.is_recurrent:
            raise ValueError(f"{checkpoint}: not a memory policy (context.kind is none)")
    else:
        _, policy = _policies("tiny", list(overrides), device)
    obs = _observation(policy.config, policy.device)
    n = policy.config.n_action_steps
    rec: dict[int, tuple[float, float]] = {}
    early_memory = None
    with torch.inference_mode():
        for _ in range(3):  # warmup
            policy.predict_action_chunk(obs)
        policy.reset()
        for step in range(1, steps + 1):
            ms = 1e3 * timed_call(lambda: policy.select_action(obs), cuda_sync)
            if (step - 1) % n == 0:  # a chunk was predicted at this step
                rec[step] = (ms, float(policy.memory.norm(dim=-1).max()))
                if early_memory is None and step >= min(10, steps - n + 1):
                    early_memory = policy.memory.clone()  # (1, M, D) of step 10 (or earlier
                    # in an episode too short to reach it)
        late_memory = policy.memory.clone()  # (1, M, D)
        inputs = policy.encode_observation(obs)  # images, ids, pad, state
        paired: dict[str, list[float]] = {"early": [], "late": []}
        for _ in range(repeats):
            for name, mem in (("early", early_memory), ("late", late_memory)):
                paired[name].append(timed_call(
                    lambda mem=mem: policy.model.sample_actions(*inputs, context_state=mem),
                    cuda_sync))
        policy.reset()
    chunk_steps = sorted(rec)

    def around(target: int, k: int = 5) -> dict:
        near = sorted(chunk_steps, key=lambda s: abs(s - target))[:k]
        lat = sorted(rec[s][0] for s in near)
        return {"steps": sorted(near), "latency_ms": lat[len(lat) // 2],
                "memory_norm": rec[min(near, key=lambda s: abs(s - target))][1]}

    early, late = around(10), around(steps)
    return {"steps": steps, "chunk_every": n, "early": early, "late": late,
            "latency_ratio": late["latency_ms"] / early["latency_ms"],
            "paired_ratio": statistics.median(paired["late"]) / statistics.median(
                paired["early"]),
            "norm_ratio": late["memory_norm"] / early["memory_norm"],
            "max_norm": max(v[1] for v in rec.values()),
            "norm_bound": policy.model.memory_norm_bound(), "device": str(policy.device)}


def _written_memories(policy, task_options: dict, seed: int, cue: int) -> list:
    """The memories a policy writes on one ``remember-color`` episode of a forced cue, up to
    and including the first chunk of the choice phase, the scripted expert acting (so the
    frames after the cue are identical across cues, see the task). Each is (M, D)."""
    import torch

    from ..envs import make
    from ..evaluate import stack_observations

    if not policy.is_recurrent:
        raise ValueError("this measure needs a memory policy (context.kind=memory_tokens)")
    n = policy.config.model.chunk_size
    env = make("remember-color", **task_options)
    obs, _ = env.reset(seed=seed, options={"cue": cue})
    u, expert = env.unwrapped, env.unwrapped.make_expert()
    policy.reset()
    written = []
    for t in range(u.choice_start + n):
        if t % n == 0:
            with torch.no_grad():
                policy.predict_action_chunk(stack_observations([obs], policy.device))
            written.append(policy.memory[0].clone())  # (M, D)
            if t >= u.choice_start:
                break
        obs, *_ = env.step(expert.act())
    return written


def _distance(a, b) -> float:
    return float((a - b).norm(dim=-1).mean())  # mean over the M memory tokens


def cue_sensitivity(policy, task_options: dict, episodes: int = 20, seed: int = 10_000) -> dict:
    """How much a memory policy's memory depends on the cue of ``remember-color``.

    Each episode is run once per forced cue (:func:`_written_memories`), the policy
    predicting a chunk every ``chunk_size`` steps. Reported: the mean distance between the
    memories written for different cues, after the first chunk and before the first chunk of
    the choice phase, relative to the memory's mean norm. A memory that learnt the cue keeps
    these apart; ~0 means the memory ignores the cue (it cannot help the choice).
    """
    import itertools

    import numpy as np

    first, last, norms = [], [], []
    for ep in range(episodes):
        mems = []
        for cue in range(task_options.get("n_colors", 3)):
            written = _written_memories(policy, task_options, seed + ep, cue)
            mems.append((written[0], written[-2]))  # after chunk 0; before the choice chunk
            norms.append(float(written[0].norm(dim=-1).mean()))
        for a, b in itertools.combinations(mems, 2):
            first.append(_distance(a[0], b[0]))
            last.append(_distance(a[1], b[1]))
    scale = float(np.mean(norms))
    return {"episodes": episodes, "memory_norm": scale,
            "after_cue": float(np.mean(first)) / scale,
            "before_choice": float(np.mean(last)) / scale}


def memory_drift(policy, task_options: dict, delays: list[int], episodes: int = 20,
                 seed: int = 10_000) -> list[dict]:
    """Whether a memory policy's memory before the choice stays where training left it as
    the ``remember-color`` delay grows.

    For each episode and cue the reference is the memory before the choice chunk at
    ``task_options["delay"]`` (the trained delay); at each of ``delays`` the same episode
    and cue give another. Reported per delay: ``decoded``, the share of (episode, cue)
    whose memory is nearest to its own cue's reference (1: the cue is still readable as
    trained; 1 / n_colors: lost or collapsed onto another cue's), and the mean distances to
    its own cue's and to the other cues' references, relative to the references' norm. A
    memory that keeps the cue but drifts shows ``own`` growing toward ``other``.
    """
    import numpy as np

    for d in delays:
        if not isinstance(d, int) or d < 0:
            raise ValueError(f"memory_drift: delays must be integers >= 0, got {d!r}")
    colors = task_options.get("n_colors", 3)
    refs = {(ep, c): _written_memories(policy, task_options, seed + ep, c)[-2]
            for ep in range(episodes) for c in range(colors)}
    scale = float(np.mean([float(r.norm(dim=-1).mean()) for r in refs.values()]))
    rows = []
    for delay in delays:
        hits, own, other = 0, [], []
        for ep in range(episodes):
            for c in range(colors):
                m = _written_memories(policy, {**task_options, "delay": delay}, seed + ep, c)[-2]
                dist = [_distance(m, refs[ep, k]) for k in range(colors)]  # (n_colors,)
                hits += int(np.argmin(dist) == c)
                own.append(dist[c])
                other.extend(dist[k] for k in range(colors) if k != c)
        rows.append({"delay": delay, "decoded": hits / (episodes * colors),
                     "own": float(np.mean(own)) / scale, "other": float(np.mean(other)) / scale,
                     "episodes": episodes})
    return rows


def _check_ranges(args) -> None:
    for name, lo, hi, flag in [("--min-delay", args.min_delay, args.delay, "--delay"),
                               ("--min-swaps", args.min_swaps, args.swaps, "--swaps")]:
        if not 0 <= lo <= hi:
            raise ValueError(f"{name} must be in [0, {flag}={hi}], got {lo}")


def sweep_settings(args, task: str):
    """The :class:`memvla.demo.DemoSettings` of one task's sweep, from the CLI arguments."""
    from ..demo import DemoSettings
    from ..envs import parse_options

    s = DemoSettings(task=task, episodes=args.episodes, steps=args.steps,
                     eval_episodes=args.eval_episodes, delay=args.delay, image_size=32,
                     episode_batch=8, action_noise=args.action_noise,
                     variants=[v.strip() for v in args.variants.split(",") if v.strip()],
                     overrides=list(args.set), device=args.device)
    if task == "remember-color":
        s.palette_size, s.layout, s.colors = args.palette_size, args.layout, args.colors
        s.longer = {"delay": args.longer * args.delay}
        s.data_options = {"delay": args.min_delay, "max_delay": args.delay}
    elif task == "shell-game":
        s.options = {"n_swaps": args.swaps, "swap_steps": args.swap_steps}
        s.longer = {"n_swaps": args.longer * args.swaps}
        s.data_options = {"n_swaps": args.min_swaps, "max_swaps": args.swaps}
    elif task == "memory-maze":  # the defaults: a 5×5 maze, 2 markers on the tour
        # the display shows the next move only: replan every 2 steps; slow-memory frames
        # of 2×2 tokens unpooled, so that voxel pruning has patches to place
        s.overrides = ["policy.n_action_steps=2", "policy.context.pool_stride=1",
                       "policy.tokenizer.max_length=32",
                       *s.overrides]
    s.options.update(parse_options(args.opt))
    return s


def success_sweeps(args) -> list[dict]:
    from ..demo import run_sweep

    results = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        s = sweep_settings(args, task)
        res = run_sweep(Path(args.out) / task, s, progress=not args.no_progress,
                        overwrite=True, report=False)
        if task == "remember-color":
            from ..policies import load_policy

            for r in res["variants"]:
                policy = load_policy(Path(args.out) / task / r["run"],
                                     device=args.device)
                if policy.config.context.kind == "memory_tokens":
                    r["cue_sensitivity"] = cue_sensitivity(policy.eval(), s.task_options(False))
        results.append(res)
    return results


def drift_report(args, device) -> int:
    """``--drift``: the table of :func:`memory_drift` for ``--checkpoint``."""
    from ..policies import load_policy
    from ..utils import atomic_write_json
    from .timing import format_table

    if not args.checkpoint:
        raise ValueError("--drift needs --checkpoint RUN: a trained remember-color memory "
                         "policy")
    try:
        delays = [int(d) for d in args.drift.split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"--drift must be comma-separated delays, e.g. 90,300; got "
                         f"{args.drift!r}") from None
    if not delays:
        raise ValueError(f"--drift must name at least one delay, got {args.drift!r}")
    opts = sweep_settings(args, "remember-color").task_options(False)
    policy = load_policy(args.checkpoint, device=device).eval()
    rows = memory_drift(policy, opts, delays, episodes=args.drift_episodes)
    print(format_table(["delay", "cue decoded", "to its own cue", "to the other cues"],
                       [[r["delay"], f"{r['decoded']:.0%}", f"{r['own']:.3f}",
                         f"{r['other']:.3f}"] for r in rows]))
    print(f"the memory before the choice against the same episode's at delay {args.delay}, "
          f"{args.drift_episodes} episodes per cue: decoded = nearest to its own cue's; "
          "distances relative to the memory's norm")
    if args.json:
        atomic_write_json(Path(args.json), {"checkpoint": str(args.checkpoint),
                                            "trained_delay": args.delay, "drift": rows})
        print(f"wrote {args.json}")
    return 0


def run(args) -> int:
    from ..policies import policy_device
    from ..utils import atomic_write_json
    from .timing import format_table, torch_info

    _check_ranges(args)  # before minutes of timing
    device = policy_device(args.device)
    if args.drift is not None:
        return drift_report(args, device)
    cost = [latency_cost("tiny", [], args.repeats, device),
            latency_cost("smolvla-450m", ["model.text.depth=2", "model.expert.depth=2",
                                          "model.vision.depth=2"], max(5, args.repeats // 5),
                         device)]
    print(format_table(["preset", "M", "plain ms", "memory ms", "memory / plain"],
                       [[c["preset"], c["memory_tokens"], f"{c['plain_ms']:.2f}",
                         f"{c['memory_ms']:.2f}", f"{c['ratio']:.3f}"] for c in cost]))
    long = long_episode(args.long_steps, args.checkpoint, args.repeats, device=device)
    print(f"\nlong episode ({long['steps']} steps, a chunk every {long['chunk_every']}): "
          f"latency {long['early']['latency_ms']:.2f} ms near step 10 vs "
          f"{long['late']['latency_ms']:.2f} ms near step {long['steps']} "
          f"(ratio {long['latency_ratio']:.3f} as recorded, {long['paired_ratio']:.3f} "
          f"paired: last-step vs step-10 memory timed alternately); memory norm "
          f"{long['early']['memory_norm']:.3f}"
          f" vs {long['late']['memory_norm']:.3f} (ratio {long['norm_ratio']:.3f}, max "
          f"{long['max_norm']:.3f}, bound {long['norm_bound']:.3f})")
    out = {"cost": cost, "long_episode": long, "torch": torch_info()}
    if args.success:
        sweeps = success_sweeps(args)
        rows = []
        for sw in sweeps:
            for r in sw["variants"]:
                e, lg = r["eval"], r.get("eval_longer") or {}
                cs = r.get("cue_sensitivity")
                rows.append([sw["task"], r["variant"], f"{e['success_rate']:.1%}",
                             f"{e['ci95'][0]:.0%}-{e['ci95'][1]:.0%}",
                             f"{lg.get('success_rate', float('nan')):.1%}",
                             f"{sw['chance_level']:.1%}", f"{r['final_loss']:.3f}",
                             f"{cs['after_cue']:.3f} / {cs['before_choice']:.3f}" if cs else "-"])
        print()
        print(format_table(["task", "variant", "success", "95% CI", f"{args.longer}x longer",
                            "chance",
                            "final loss", "cue sensitivity"], rows))
        print("cue sensitivity: distance between the memories written for different cues "
              "(after the cue / before the choice) relative to the memory's norm; ~0 = the "
              "memory ignores the cue")
        out["success"] = sweeps
    if args.json:
        atomic_write_json(Path(args.json), json.loads(json.dumps(out, default=str)))
        print(f"wrote {args.json}")
    return 0
