"""Record scripted-expert episodes of a built-in task as a LeRobot v3.0 dataset (what
``memvla datagen`` runs; images as PNG image columns, see :mod:`.lerobot_v3_write`).

Attempt i runs the task with seed ``seed + i``. With ``keep="success"`` (the default) only
the episodes that the expert finished successfully (``info["is_success"]`` at the last
step) are kept, and attempts go on until ``episodes`` are kept or ``max_attempts`` is
reached; ``keep="all"`` keeps every attempt. Every frame stores ``observation.*`` (images,
state), ``action``, the task, and ``next.reward``, ``next.done``, ``next.success``; the
episodes parquet gets a ``seed`` column, and ``info.json`` a ``memvla`` entry with the task,
its options and the seeds. No torch needed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memvla import envs
from memvla.data.lerobot_v3_write import LeRobotV3Writer

KEEP = ("success", "all")
ROBOT_TYPE = "memvla-sim"
_MAX_STEPS = 100_000  # a safety net against an episode that never ends


def record_episode(env, expert, seed: int, action_noise: float = 0.0,
                   options: dict | None = None):
    """Run the expert for one episode (reset with ``seed`` and ``options``); return
    (frames, task, success).

    ``frames`` maps every ``observation.*`` key, ``action``, ``next.reward``,
    ``next.done`` and ``next.success`` to an array with a leading time axis T.

    ``action_noise`` > 0 perturbs the demonstrations (DART, Laskey et al. 2017): the
    environment executes the expert's action plus Gaussian noise of that standard deviation
    on the motion axes (the gripper command is kept), while the dataset records the expert's
    own action. The recorded states then leave the expert's narrow path and the labels show
    how to come back to it, which a cloned policy needs once its own errors take it there.
    The noise is drawn from a generator seeded with ``seed``.
    """
    obs, _ = env.reset(seed=seed, options=options)
    expert.reset()
    rng = np.random.default_rng(seed)
    task = str(obs.get("task", ""))
    keys = [k for k in obs if k.startswith("observation.")]
    steps: dict[str, list] = {k: [] for k in [*keys, "action", "next.reward", "next.done",
                                              "next.success"]}
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
    frames = {k: np.stack(steps[k]) for k in keys}
    frames["action"] = np.stack(steps["action"])  # (T, Da)
    frames["next.reward"] = np.asarray(steps["next.reward"], dtype=np.float32)  # (T,)
    frames["next.done"] = np.asarray(steps["next.done"])  # (T,) bool
    frames["next.success"] = np.asarray(steps["next.success"])  # (T,) bool
    return frames, task, steps["next.success"][-1]


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
    video: bool = False,
) -> dict[str, Any]:
    """Record ``episodes`` expert episodes of ``task`` into a v3.0 dataset at ``out``.
    ``video``: cameras as MP4 videos (AV1, else H.264) instead of PNG columns (exact
    pixels; what the demo and the benchmarks train on).

    With ``workers`` > 1 the episodes are run in that many processes (attempt i still uses
    seed ``seed + i`` and the dataset is the same); this process writes them.
    ``action_noise``: perturbed demonstrations (see :func:`record_episode`).
    Returns a summary (see :func:`format_summary`): episodes, requested, frames, attempts,
    successes, keep, fps, bytes, path, seconds. Raises FileExistsError when ``out`` is not
    empty (unless ``overwrite``).
    """
    max_attempts = check_request(episodes, keep, max_attempts, action_noise, workers)
    options = dict(options or {})
    start = time.perf_counter()
    env = envs.make(task, **options)  # bad task names and options fail before any writing
    try:
        fps = int(env.metadata.get("render_fps", 10))
        writer = LeRobotV3Writer(out, fps=fps, robot_type=ROBOT_TYPE, overwrite=overwrite,
                                 video=video)
        try:
            seeds = range(seed, seed + max_attempts)
            with _attempts(env, task, options, seeds, workers, action_noise) as attempts:
                attempted, successes = _keep_episodes(writer, attempts, episodes, keep, seed,
                                                      f"datagen {task}", progress)
            if writer.num_episodes == 0:
                raise ValueError(f"the expert succeeded in none of {attempted} attempts on "
                                 f"{task!r}")
            info = writer.finalize(extra_info={"memvla": {
                "task": task, "task_version": getattr(env.unwrapped, "version", 1),
                "options": options,
                "seeds": [seed, seed + attempted - 1], "keep": keep, "attempts": attempted,
                "expert_successes": successes, "action_noise": action_noise}})
        except BaseException:
            writer.abort()
            raise
    finally:
        env.close()
    root = Path(out)
    return {"task": task, "episodes": info["total_episodes"], "requested": episodes,
            "frames": info["total_frames"], "attempts": attempted, "successes": successes,
            "keep": keep, "fps": fps,
            "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
            "path": str(root.resolve()), "seconds": time.perf_counter() - start}


def check_request(episodes: int, keep: str, max_attempts: int | None, action_noise: float,
                  workers: int = 1) -> int:
    """Validate the arguments of :func:`generate_dataset`; returns the attempt budget."""
    if episodes < 1:
        raise ValueError(f"--episodes must be at least 1, got {episodes}")
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {list(KEEP)}, got {keep!r}")
    if not 0.0 <= action_noise <= 2.0:
        raise ValueError(f"action_noise must be in [0, 2] (a standard deviation in action "
                         f"units), got {action_noise}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if max_attempts is None:
        return episodes if keep == "all" else 2 * episodes + 10
    if max_attempts < 1:
        raise ValueError(f"--max-attempts must be at least 1, got {max_attempts}")
    return max_attempts


@contextlib.contextmanager
def _attempts(env, task: str, options: dict, seeds: Iterable[int], workers: int,
              action_noise: float) -> Iterator[Iterator]:
    """The recorded attempts (frames, task, success) in seed order: in this process, or in
    ``workers`` processes (stopped on leaving the block, even early)."""
    if workers <= 1:
        expert = envs.make_expert(env)
        yield (record_episode(env, expert, s, action_noise) for s in seeds)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = context.Pool(workers, _init_worker, (task, options, action_noise))
    try:
        yield pool.imap(_record_in_worker, seeds, chunksize=2)
    finally:
        pool.terminate()
        pool.join()


def _keep_episodes(writer: LeRobotV3Writer, attempts: Iterator, episodes: int, keep: str,
                   seed: int, desc: str, progress: bool) -> tuple[int, int]:
    """Write the attempts worth keeping until ``episodes`` are written or the attempts run
    out; returns (attempts made, expert successes)."""
    from tqdm import tqdm

    attempted = successes = 0
    with tqdm(total=episodes, desc=desc, unit="ep", disable=not progress) as bar:
        for frames, task_text, success in attempts:
            attempted += 1
            successes += int(success)
            if success or keep == "all":
                writer.add_episode(frames, task=task_text, extra={"seed": seed + attempted - 1})
                bar.update(1)
            bar.set_postfix(success=f"{successes / attempted:.0%}")
            if writer.num_episodes >= episodes:
                break
    return attempted, successes


def format_summary(s: dict[str, Any]) -> str:
    """The lines ``memvla datagen`` prints for a :func:`generate_dataset` summary."""
    rate = s["successes"] / s["attempts"]
    kept = "kept successful episodes only" if s["keep"] == "success" else "kept every episode"
    return "\n".join([
        f"recorded {s['episodes']} episodes ({s['frames']:,} frames) of {s['task']!r}",
        f"  expert success rate {rate:.1%} ({s['successes']}/{s['attempts']} attempts, {kept})",
        f"  fps {s['fps']}, {s['bytes'] / 2**20:.1f} MiB on disk, {s['path']}",
        f"  {s['seconds']:.1f} s ({s['episodes'] / s['seconds']:.1f} episodes/s, "
        f"{s['frames'] / s['seconds']:,.0f} frames/s)"])


_worker: dict[str, Any] = {}  # the environment and expert of a worker process


def _init_worker(task: str, options: dict[str, Any], action_noise: float) -> None:
    _worker["env"] = envs.make(task, **options)
    _worker["expert"] = envs.make_expert(_worker["env"])
    _worker["action_noise"] = action_noise


def _record_in_worker(seed: int):
    return record_episode(_worker["env"], _worker["expert"], seed, _worker["action_noise"])
