"""``memvla bench core``: latency of the flow-matching VLA's inference path.

For the ``tiny`` preset (as it is) and ``smolvla-450m`` at reduced depth (``--depth`` text
and expert layers, ``--vision-depth`` SigLIP layers; the widths, the 512 px image and the
token counts are the real ones), batch 1, one camera, on ``--device`` (default: CUDA when
available, else the CPU; queued device work is waited for before each clock read) under
``torch.inference_mode()``, the median latency of

- prefix: ``FlowMatchingVLA.prefill`` (vision tower, connector, backbone into the KV cache);
- step: one denoising step, ``FlowMatchingVLA.velocity`` against the filled cache;
- chunk: ``policy.predict_action_chunk(obs)`` end to end (uint8 image and a task string in,
  preprocessing, tokenising, prefix once, ``num_steps`` steps, unnormalising);
- sample: ``FlowMatchingVLA.sample_actions`` on prepared inputs (the cached sampler alone);
- uncached: ``FlowMatchingVLA.sample_actions_uncached`` (the prefix recomputed every step).

Ratios: chunk / (prefix + N·step), N = num_steps (close to 1 when the cache is reused and
preprocessing is cheap), and uncached / sample (the saving of the cache, ideally about
N + 1 when the prefix dominates). Every call is warmed up, then the calls are timed in
rounds (one run of each per round) so that a change of machine load affects them alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .timing import format_table, time_interleaved, torch_info

HELP = "latency of prefix, denoising step and whole action chunk (cached vs uncached)"

PRESETS = ("tiny", "smolvla-450m")
REDUCED = "smolvla-450m"  # the preset benchmarked at reduced depth
TASK = "pick up the red cube and put it in the box"


def _vision_depth(text: str) -> int | None:
    if text == "full":
        return None
    value = int(text)
    if value <= 0:
        raise ValueError(f"--vision-depth must be > 0 or 'full', got {text}")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed repeats of prefix, step, chunk and sample (10)")
    parser.add_argument("--uncached-repeats", type=int, default=3,
                        help="timed repeats of the (slow) uncached sampler (3)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed calls before the repeats (2; 1 for the uncached sampler)")
    parser.add_argument("--depth", type=int, default=2,
                        help=f"text and action-expert layers of {REDUCED} (2; the preset has 16)")
    parser.add_argument("--vision-depth", type=_vision_depth, default=2, metavar="V",
                        help=f"vision layers of {REDUCED}: a number or 'full' (2; the preset "
                             "has 12)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help=f"comma-separated presets ({','.join(PRESETS)})")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs (0)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when "
                        "available, else cpu)")


def preset_overrides(name: str, depth: int, vision_depth: int | None) -> list[str]:
    if name != REDUCED:
        return []
    overrides = [f"model.text.depth={depth}", f"model.expert.depth={depth}"]
    if vision_depth is not None:
        overrides.append(f"model.vision.depth={vision_depth}")
    return overrides


def make_observation(cfg, seed: int, device="cpu") -> dict:
    """One observation (batch 1) on ``device``: uint8 HWC images per camera, a state and a
    task."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    c, h, w = cfg.image_shape
    obs = {key: torch.randint(0, 256, (1, h, w, c), dtype=torch.uint8, generator=gen,
                              device=device)
           for key in cfg.image_keys}  # (1, H, W, C) per camera
    obs["observation.state"] = torch.randn(1, cfg.state_dim, generator=gen,
                                           device=device)  # (1, Ds)
    obs["task"] = [TASK]
    return obs


def bench_preset(name: str, args, device) -> dict:
    import torch

    from ..policies import make_policy
    from ..presets import get_preset
    from .timing import cuda_sync

    overrides = preset_overrides(name, args.depth, args.vision_depth)
    cfg = get_preset(name, overrides)
    torch.manual_seed(args.seed)
    policy = make_policy(cfg).to(device).eval()
    model = policy.model
    m = cfg.model
    steps = m.num_steps
    obs = make_observation(cfg, args.seed, device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    noise = torch.randn(1, m.chunk_size, m.max_action_dim, generator=gen,
                        device=device)  # (1, A, Da')
    w, r, ru = args.warmup, args.repeats, args.uncached_repeats

    with torch.inference_mode():
        images, ids, pad, state = policy.encode_observation(obs)
        cache, _ = model.prefill(images, ids, pad, state)
        t1 = torch.ones(1, device=device)  # (1,) the first (noisiest) time

        calls = {
            "prefix": lambda: model.prefill(images, ids, pad, state),
            "step": lambda: model.velocity(cache, state, noise, t1),
            "chunk": lambda: policy.predict_action_chunk(obs),
            "sample": lambda: model.sample_actions(images, ids, pad, state, noise),
            "uncached": lambda: model.sample_actions_uncached(images, ids, pad, state, noise),
        }
        # rounds of one run each, so that load changes hit every figure alike
        timings = time_interleaved(calls, {**dict.fromkeys(calls, r), "uncached": ru},
                                   {**dict.fromkeys(calls, w), "uncached": min(w, 1)},
                                   sync=cuda_sync if device.type == "cuda" else None)
        cached_actions, _ = model.sample_actions(images, ids, pad, state, noise)  # (1, A, Da')
        uncached_actions, _ = model.sample_actions_uncached(images, ids, pad, state, noise)
    med = {k: t.median_ms for k, t in timings.items()}
    expected = med["prefix"] + steps * med["step"]
    return {
        "preset": name,
        "overrides": overrides,
        "depths": {"text": m.text.depth, "expert": m.expert.depth, "vision": m.vision.depth},
        "vision_reduced": name == REDUCED and args.vision_depth is not None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_steps": steps,
        "image_size": m.vision.image_size,
        "cameras": len(cfg.cameras),
        "prefix_tokens": len(cache),
        "prefix_real_tokens": int(cache.key_pad.sum()),
        "chunk_size": m.chunk_size,
        "timings": {k: t.to_dict() for k, t in timings.items()},
        "ratios": {
            "chunk_over_prefix_plus_n_steps": med["chunk"] / expected,
            "sample_over_prefix_plus_n_steps": med["sample"] / expected,
            "uncached_over_cached": med["uncached"] / med["sample"],
            "uncached_over_chunk": med["uncached"] / med["chunk"],
        },
        "cached_vs_uncached_max_abs_diff": (cached_actions - uncached_actions).abs().max().item(),
    }


def _depths(r: dict) -> str:
    d = r["depths"]
    return f"{d['text']}/{d['expert']}/{d['vision']}"


def render(results: list[dict]) -> str:
    headers = ["preset", "layers t/e/v", "params", "prefix tok", "N", "prefix ms", "step ms",
               "chunk ms", "sample ms", "uncached ms", "chunk/(pre+N*step)", "uncached/cached"]
    rows = []
    for r in results:
        t, q = r["timings"], r["ratios"]
        rows.append([
            r["preset"], _depths(r), f"{r['parameters'] / 1e6:.1f}M",
            f"{r['prefix_real_tokens']}/{r['prefix_tokens']}", r["num_steps"],
            f"{t['prefix']['median_ms']:.1f}", f"{t['step']['median_ms']:.2f}",
            f"{t['chunk']['median_ms']:.1f}", f"{t['sample']['median_ms']:.1f}",
            f"{t['uncached']['median_ms']:.1f}",
            f"{q['chunk_over_prefix_plus_n_steps']:.2f}", f"{q['uncached_over_cached']:.2f}",
        ])
    return format_table(headers, rows)


def run(args) -> int:
    import torch

    from ..policies import policy_device

    device = policy_device(args.device)
    for flag in ("repeats", "uncached_repeats"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.warmup < 0 or args.depth <= 0:
        raise ValueError("--warmup must be >= 0 and --depth > 0")
    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be > 0, got {args.threads}")
        torch.set_num_threads(args.threads)
    names = [n for n in args.presets.split(",") if n]
    info = torch_info()
    load_before = os.getloadavg()
    results = []
    for name in names:
        print(f"benchmarking {name} ...", flush=True)
        results.append(bench_preset(name, args, device))
    load_after = os.getloadavg()

    print()
    print(render(results))
    vd = "full" if args.vision_depth is None else args.vision_depth
    print(f"\nmedian of {args.repeats} runs ({args.uncached_repeats} uncached) after "
          f"{args.warmup} warmup; batch 1, {device}, torch {info['torch']}, "
          f"{info['threads']} threads, load avg {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{REDUCED}: {args.depth} text + {args.depth} expert layers (of 16), vision depth "
          f"{vd} (of 12){' [reduced]' if args.vision_depth is not None else ''}; tiny at its "
          "preset depths. layers t/e/v = text/expert/vision.")
    print("chunk = policy.predict_action_chunk (preprocessing included); sample = "
          "model.sample_actions; uncached/cached = uncached / sample.")
    cores = os.cpu_count() or 1
    if max(load_before[0], load_after[0]) > cores:
        hint = " (try --threads 1)" if info["threads"] > 1 else ""
        print(f"warning: the 1-minute load average exceeded the {cores} CPU cores: other "
              f"processes competed for the CPU and the figures are noisy{hint}")
    for r in results:
        diff = r["cached_vs_uncached_max_abs_diff"]
        print(f"{r['preset']}: max |cached - uncached actions| = {diff:.2e}")

    if args.json:
        figures = {
            "bench": "core",
            "device": str(device),
            "batch": 1,
            "repeats": args.repeats,
            "uncached_repeats": args.uncached_repeats,
            "warmup": args.warmup,
            "depth": args.depth,
            "vision_depth": vd,
            "seed": args.seed,
            "load_avg_before": list(load_before),
            "load_avg_after": list(load_after),
            "cpu_count": cores,
            **info,
            "presets": {r["preset"]: r for r in results},
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
