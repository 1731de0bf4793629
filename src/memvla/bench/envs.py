"""``memvla bench envs``: environment speed per built-in task, and datagen speed.

For every task (default options, so 64x64 images unless a task says otherwise):

- env steps/s: ``env.step`` with random actions, rendering included (every observation
  carries its image), resets included; the median of ``--repeats`` runs of ``--steps``
  steps, in this single process. Target: 2,000 steps/s per task.
- datagen episodes/s: ``memvla datagen`` end to end (scripted expert, recording, PNG
  encoding, statistics, parquet writing) of ``--episodes`` episodes into a temporary
  directory, and the same as frames/s.

torch is not imported.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

HELP = "environment steps/s per task (with rendering) and datagen episodes/s"

TARGET_STEPS_PER_S = 2000


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed run (2000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per task (5)")
    parser.add_argument("--episodes", type=int, default=50,
                        help="episodes of the datagen measurement (50; 0 skips it)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names (default: every built-in task)")


def env_steps_per_second(name: str, steps: int, repeats: int, seed: int = 0) -> dict:
    """Median steps/s of ``env.step`` with random actions (resets included)."""
    from memvla import envs

    env = envs.make(name)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    image_shapes = {k: list(v.shape) for k, v in obs.items() if k.startswith("observation.images")}
    rates = []
    for r in range(repeats):
        env.reset(seed=seed + r)
        start = time.perf_counter()
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
        rates.append(steps / (time.perf_counter() - start))
    env.close()
    return {"steps_per_s": statistics.median(rates), "runs": rates, "image_shapes": image_shapes}


def datagen_speed(name: str, episodes: int, seed: int = 0) -> dict:
    """Episodes/s and frames/s of ``memvla datagen`` (every attempt kept) into a temp dir."""
    from memvla.data.record import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        s = generate_dataset(name, episodes, Path(tmp) / "ds", seed=seed, keep="all",
                             progress=False)
    return {
        "episodes_per_s": s["episodes"] / s["seconds"],
        "frames_per_s": s["frames"] / s["seconds"],
        "frames": s["frames"],
        "expert_success_rate": s["successes"] / s["attempts"],
        "bytes_per_episode": s["bytes"] / s["episodes"],
    }


def run(args) -> int:
    from memvla import envs

    names = args.tasks.split(",") if args.tasks else list(envs.task_names())
    results = {}
    header = (f"{'task':<26} {'image':>10} {'steps/s':>9} {'target':>7} {'met':>4} "
              f"{'datagen ep/s':>13} {'frames/s':>9} {'expert':>7}")
    print(header)
    print("-" * len(header))
    for name in names:
        r = env_steps_per_second(name, args.steps, args.repeats)
        r["target_steps_per_s"] = TARGET_STEPS_PER_S
        r["met"] = r["steps_per_s"] >= TARGET_STEPS_PER_S
        if args.episodes > 0:
            r["datagen"] = datagen_speed(name, args.episodes)
        results[name] = r
        shape = next(iter(r["image_shapes"].values()), [])
        image = "x".join(str(n) for n in shape[:2]) or "-"
        d = r.get("datagen")
        dg = (f"{d['episodes_per_s']:>13.1f} {d['frames_per_s']:>9.0f} "
              f"{d['expert_success_rate']:>7.0%}" if d else f"{'-':>13} {'-':>9} {'-':>7}")
        print(f"{name:<26} {image:>10} {r['steps_per_s']:>9.0f} {TARGET_STEPS_PER_S:>7} "
              f"{'yes' if r['met'] else 'NO':>4} {dg}")
    if args.json:
        figures = {
            "bench": "envs",
            "steps": args.steps,
            "repeats": args.repeats,
            "datagen_episodes": args.episodes,
            "tasks": results,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
