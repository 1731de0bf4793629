"""``memvla datagen``: record scripted-expert episodes of a built-in task as a LeRobot v3.0
dataset (images as PNG image columns; see ``memvla.data.lerobot_v3_write``).

Attempt i runs the task with seed SEED + i. By default only the episodes that the expert
finished successfully (``info["is_success"]`` at the last step) are kept, and attempts go
on until N episodes are kept or MAX_ATTEMPTS is reached; ``--keep all`` keeps every
attempt. Every frame stores ``observation.*`` (images, state), ``action``, the task, and
``next.reward``, ``next.done``, ``next.success``; the episodes parquet gets a ``seed``
column, and ``info.json`` a ``memvla`` entry with the task, its options and the seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

HELP = "record expert episodes of a built-in task as a LeRobot v3.0 dataset"

_MAX_STEPS = 100_000  # a safety net against an episode that never ends


def add_arguments(parser) -> None:
    parser.epilog = (
        "Attempt i uses seed SEED + i. With --keep success (the default) only episodes the "
        "expert finished successfully are recorded, and attempts continue until N are kept "
        "(or --max-attempts); the success rate is reported. Frames hold observation.* "
        "(PNG images, state), action, next.reward/done/success and the task string."
    )
    parser.add_argument("--task", required=True, help="built-in task name (memvla.envs)")
    parser.add_argument("--episodes", type=int, required=True, metavar="N",
                        help="number of episodes to record")
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    parser.add_argument("--seed", type=int, default=0, help="attempt i uses seed SEED + i (0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it exists and is not empty")
    parser.add_argument(
        "--opt", action="append", default=[], metavar="KEY=VALUE",
        help="task option passed to the environment, repeatable, e.g. --opt delay=30 "
        "--opt n_colors=3; VALUE is read as JSON (numbers, true/false, lists) or else a string",
    )
    parser.add_argument(
        "--keep", choices=["success", "all"], default="success",
        help="keep only the expert's successful episodes (default) or every attempt",
    )
    parser.add_argument("--max-attempts", type=int, default=None, metavar="M",
                        help="with --keep success, stop after M attempts (default 2*N + 10)")
    parser.add_argument("--workers", type=int, default=1, metavar="W",
                        help="run the episodes in W processes (1); the dataset is the same")
    parser.add_argument("--action-noise", type=float, default=0.0, metavar="SIGMA",
                        help="perturbed demonstrations (DART): execute the expert's action plus "
                        "N(0, SIGMA²) noise on the motion axes, record the expert's own (0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["delay=30", "n-colors=3", "name=abc"]`` -> ``{"delay": 30, "n_colors": 3, ...}``."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"task options are KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = {"True": True, "False": False, "None": None}.get(text, text)
        options[key.strip().replace("-", "_")] = value
    return options


def record_episode(env, expert, seed: int, action_noise: float = 0.0):
    """Run the expert for one episode; return (frames, task, success).

    ``frames`` maps every ``observation.*`` key, ``action``, ``next.reward``,
    ``next.done`` and ``next.success`` to an array with a leading time axis T.

    ``action_noise`` > 0 perturbs the demonstrations (DART, Laskey et al. 2017): the
    environment executes the expert's action plus Gaussian noise of that standard deviation
    on the motion axes (the gripper command is kept), while the dataset records the expert's
    own action. The recorded states then leave the expert's narrow path and the labels show
    how to come back to it, which a cloned policy needs once its own errors take it there.
    The noise is drawn from a generator seeded with ``seed``.
    """
    import numpy as np

    obs, _ = env.reset(seed=seed)
    expert.reset()
    rng = np.random.default_rng(seed)
    task = str(obs.get("task", ""))
    keys = [k for k in obs if k.startswith("observation.")]
    steps: dict[str, list] = {k: [] for k in [*keys, "action", "next.reward", "next.done"]}
    steps["next.success"] = []
    for _ in range(_MAX_STEPS):
        action = np.asarray(expert.act(obs), dtype=np.float32)  # (Da,)
        for k in keys:
            steps[k].append(obs[k])
        steps["action"].append(action)
        executed = action
        if action_noise > 0:
            executed = action.copy()
            executed[:2] += rng.normal(0.0, action_noise, size=2).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(np.clip(executed, -1.0, 1.0))
        steps["next.reward"].append(float(reward))
        steps["next.done"].append(bool(terminated or truncated))
        steps["next.success"].append(bool(info.get("is_success", False)))
        if terminated or truncated:
            break
    else:
        raise RuntimeError(f"an episode of seed {seed} did not end within {_MAX_STEPS} steps")
    frames = {k: np.stack(v) for k, v in steps.items() if k.startswith("observation.")}
    frames["action"] = np.stack(steps["action"])  # (T, Da)
    frames["next.reward"] = np.asarray(steps["next.reward"], dtype=np.float32)  # (T,)
    frames["next.done"] = np.asarray(steps["next.done"])  # (T,) bool
    frames["next.success"] = np.asarray(steps["next.success"])  # (T,) bool
    return frames, task, steps["next.success"][-1]


_worker: dict[str, Any] = {}  # the environment and expert of a worker process


def _init_worker(task: str, options: dict[str, Any], action_noise: float) -> None:
    from memvla import envs

    _worker["env"] = envs.make(task, **options)
    _worker["expert"] = envs.make_expert(_worker["env"])
    _worker["action_noise"] = action_noise


def _record_in_worker(seed: int):
    return record_episode(_worker["env"], _worker["expert"], seed, _worker["action_noise"])


def generate_dataset(
    task: str,
    episodes: int,
    out: str | Path,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    keep: str = "success",
    max_attempts: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
    action_noise: float = 0.0,
) -> dict[str, Any]:
    """Record ``episodes`` expert episodes of ``task`` into a v3.0 dataset at ``out``.

    With ``workers`` > 1 the episodes are run in that many processes (attempt i still uses
    seed ``seed + i`` and the dataset is the same); this process writes them.
    ``action_noise``: perturbed demonstrations (see :func:`record_episode`).
    Returns a summary: episodes, frames, attempts, successes, fps, bytes, path, seconds.
    Raises FileExistsError when ``out`` is not empty (unless ``overwrite``).
    """
    import multiprocessing

    from tqdm import tqdm

    from memvla import envs
    from memvla.data.lerobot_v3_write import LeRobotV3Writer

    if episodes < 1:
        raise ValueError(f"--episodes must be at least 1, got {episodes}")
    if not 0.0 <= action_noise <= 2.0:
        raise ValueError(f"action_noise must be in [0, 2] (a standard deviation in action "
                         f"units), got {action_noise}")
    if keep not in ("success", "all"):
        raise ValueError(f"keep must be 'success' or 'all', got {keep!r}")
    if max_attempts is None:
        max_attempts = episodes if keep == "all" else 2 * episodes + 10
    options = dict(options or {})
    start = time.perf_counter()
    env = envs.make(task, **options)
    writer = bar = pool = None
    try:
        fps = int(env.metadata.get("render_fps", 10))
        writer = LeRobotV3Writer(out, fps=fps, robot_type="memvla-sim", overwrite=overwrite)
        seeds = range(seed, seed + max_attempts)
        if workers > 1:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = context.Pool(workers, _init_worker, (task, options, action_noise))
            results = pool.imap(_record_in_worker, seeds, chunksize=2)
        else:
            expert = envs.make_expert(env)
            results = (record_episode(env, expert, s, action_noise) for s in seeds)
        attempts = successes = 0
        bar = tqdm(total=episodes, desc=f"datagen {task}", unit="ep", disable=not progress)
        for frames, task_text, success in results:
            attempts += 1
            successes += int(success)
            if success or keep == "all":
                writer.add_episode(frames, task=task_text, extra={"seed": seed + attempts - 1})
                bar.update(1)
            bar.set_postfix(success=f"{successes / attempts:.0%}")
            if writer.num_episodes >= episodes:
                break
        bar.close()
        if writer.num_episodes == 0:
            writer.abort()
            raise ValueError(f"the expert succeeded in none of {attempts} attempts on {task!r}")
        info = writer.finalize(
            extra_info={
                "memvla": {
                    "task": task,
                    "options": options,
                    "seeds": [seed, seed + attempts - 1],
                    "keep": keep,
                    "attempts": attempts,
                    "expert_successes": successes,
                    "action_noise": action_noise,
                }
            }
        )
    except BaseException:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        env.close()
    root = Path(out)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {
        "task": task,
        "episodes": info["total_episodes"],
        "frames": info["total_frames"],
        "attempts": attempts,
        "successes": successes,
        "fps": fps,
        "bytes": size,
        "path": str(root.resolve()),
        "seconds": time.perf_counter() - start,
    }


def run(args) -> int:
    import sys

    options = parse_options(args.opt)
    try:
        s = generate_dataset(
            args.task, args.episodes, args.out, seed=args.seed, options=options,
            keep=args.keep, max_attempts=args.max_attempts, overwrite=args.overwrite,
            progress=not args.no_progress, workers=args.workers,
            action_noise=args.action_noise,
        )
    except FileExistsError as e:
        print(f"memvla datagen: error: {e}", file=sys.stderr)
        return 2
    rate = s["successes"] / s["attempts"]
    kept = "kept successful episodes only" if args.keep == "success" else "kept every episode"
    print(f"recorded {s['episodes']} episodes ({s['frames']:,} frames) of {args.task!r}")
    print(f"  expert success rate {rate:.1%} ({s['successes']}/{s['attempts']} attempts, {kept})")
    print(f"  fps {s['fps']}, {s['bytes'] / 2**20:.1f} MiB on disk, {s['path']}")
    print(f"  {s['seconds']:.1f} s ({s['episodes'] / s['seconds']:.1f} episodes/s, "
          f"{s['frames'] / s['seconds']:,.0f} frames/s)")
    if s["episodes"] < args.episodes:
        print(f"memvla datagen: error: only {s['episodes']} of {args.episodes} episodes were "
              f"successful within {s['attempts']} attempts (see --max-attempts, --keep all)",
              file=sys.stderr)
        return 1
    return 0
