"""Closed-loop evaluation: ``memvla eval``.

Episodes run in waves of ``batch`` gymnasium environments stepped in lockstep, with one
batched policy call per step; episode i is reset with seed ``seed + i``, and the policy's
noise comes from a generator seeded with ``seed``, so two evaluations of the same
checkpoint agree. Environments that finish early keep feeding their last observation
(their actions are ignored) so that the batch stays aligned with the policy's action queue.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from .utils import atomic_write_json


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentiles(values: list[float]) -> dict[str, float]:
    from .bench.timing import percentile

    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a training run (its last checkpoint)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "run.json").is_file():
        from .training.state import last_checkpoint

        return last_checkpoint(p)
    raise FileNotFoundError(f"{p}: neither a checkpoint (no config.json) nor a training run "
                            "(no run.json)")


class ExpertPolicy:
    """The tasks' scripted experts behind the policy interface (one per environment)."""

    def __init__(self, envs):
        from .envs import make_expert

        self.experts = [make_expert(e) for e in envs]

    def reset(self) -> None:
        for e in self.experts:
            e.reset()

    def act(self, observations: list[dict]) -> np.ndarray:
        return np.stack([e.act(o) for e, o in zip(self.experts, observations, strict=True)])


def check_compatible(policy, env) -> None:
    """The checkpoint's cameras and state/action dims must match the task's."""
    cfg = policy.config
    space = env.observation_space
    state_dim = space["observation.state"].shape[0]
    action_dim = env.action_space.shape[0]
    problems = []
    if state_dim != cfg.state_dim:
        problems.append(f"state dim: task {state_dim}, checkpoint {cfg.state_dim}")
    if action_dim != cfg.action_dim:
        problems.append(f"action dim: task {action_dim}, checkpoint {cfg.action_dim}")
    for key in cfg.image_keys:
        if key not in space.spaces:
            problems.append(f"camera {key!r} missing from the task's observations")
        else:
            h, w, c = space[key].shape
            if (c, h, w) != tuple(cfg.image_shape):
                problems.append(f"{key}: task images {(h, w, c)}, checkpoint expects "
                                f"{tuple(cfg.image_shape)} (C, H, W)")
    if problems:
        raise ValueError("the checkpoint does not fit the task: " + "; ".join(problems))


def _stack(observations: list[dict]) -> dict:
    batch = {k: torch.from_numpy(np.stack([o[k] for o in observations]))
             for k in observations[0] if k != "task"}
    batch["task"] = [o["task"] for o in observations]
    return batch


def evaluate(task: str, episodes: int, policy=None, batch: int = 8, seed: int = 0,
             task_options: dict | None = None, record: int = 0,
             progress: bool = True) -> tuple[dict, list[dict]]:
    """Roll out ``episodes`` episodes; ``policy=None`` runs the scripted expert.
    Returns (results, recordings) where a recording holds frames, instruction, success."""
    from tqdm.auto import tqdm

    from .envs import make

    task_options = dict(task_options or {})
    results_success, lengths, step_ms, chunk_ms = [], [], [], []
    kept: list[int] = []  # visual tokens a token pruner kept, per episode and chunk
    recordings: list[dict] = []
    bar = tqdm(total=episodes, desc=f"eval {task}", disable=not progress, dynamic_ncols=True)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    chance = None
    try:
        for first in range(0, episodes, batch):
            n = min(batch, episodes - first)
            envs = [make(task, **task_options) for _ in range(n)]
            chance = getattr(envs[0].unwrapped, "chance_level", None)
            if policy is not None:
                check_compatible(policy, envs[0])
                policy.reset()
                actor = None
            else:
                actor = ExpertPolicy(envs)
                actor.reset()
            obs = [e.reset(seed=seed + first + i)[0] for i, e in enumerate(envs)]
            done = [False] * n
            success = [False] * n
            length = [0] * n
            frames = [[o["observation.images.top"]] for o in obs[: max(0, record - first)]]
            while not all(done):
                t0 = time.perf_counter()
                if policy is None:
                    actions = actor.act(obs)
                else:
                    queued = policy.queued_actions > 0
                    actions = policy.select_action(_stack(obs)).cpu().numpy()
                ms = (time.perf_counter() - t0) * 1000
                step_ms.append(ms)
                if policy is not None and not queued:
                    chunk_ms.append(ms)
                    kept += _pruner_kept(policy, done)
                for i, env in enumerate(envs):
                    if done[i]:
                        continue
                    o, _, term, trunc, info = env.step(actions[i].astype(np.float32))
                    obs[i] = o
                    length[i] += 1
                    if i < len(frames):
                        frames[i].append(o["observation.images.top"])
                    if term or trunc:
                        done[i] = True
                        success[i] = bool(info.get("is_success", False))
                        bar.update(1)
            for i in range(n):
                results_success.append(success[i])
                lengths.append(length[i])
                if i < len(frames):
                    recordings.append({"frames": frames[i], "task": obs[i]["task"],
                                       "success": success[i], "seed": seed + first + i})
            for e in envs:
                e.close()
    finally:
        torch.set_rng_state(gen_state)
        bar.close()
    k, n = int(sum(results_success)), len(results_success)
    lo, hi = wilson_interval(k, n)
    results = {
        "task": task, "task_options": task_options, "episodes": n, "successes": k,
        "success_rate": k / n if n else float("nan"), "ci95": [lo, hi],
        "chance_level": chance, "mean_episode_length": float(np.mean(lengths)),
        "latency_ms": percentiles(step_ms), "chunk_latency_ms": percentiles(chunk_ms),
        "seed": seed, "batch": batch,
    }
    if kept:
        from .bench.timing import percentile

        pruner = policy.model.pruner
        results["pruner_kept"] = {"visual_tokens": pruner.last_num_patches,
                                  "mean": float(np.mean(kept)), "min": int(min(kept)),
                                  "max": int(max(kept)),
                                  **{f"p{q}": percentile(kept, q) for q in (10, 50, 90)},
                                  "histogram": np.bincount(kept).tolist()}
    return results, recordings


def _pruner_kept(policy, done: list[bool]) -> list[int]:
    """Visual tokens the policy's token pruner kept in its last call, for the episodes
    still running (none without a pruner)."""
    pruner = getattr(getattr(policy, "model", None), "pruner", None)
    last = getattr(pruner, "last_kept", None)
    if last is None:
        return []
    return [int(k) for k, d in zip(last.tolist(), done, strict=True) if not d]


def save_recordings(recordings: list[dict], out: Path, scale: int = 4) -> list[str]:
    """Write each recording as an animated GIF with its instruction written under it."""
    from PIL import Image, ImageDraw

    paths = []
    for i, rec in enumerate(recordings):
        images = []
        for frame in rec["frames"]:
            h, w, _ = frame.shape
            big = Image.fromarray(frame).resize((w * scale, h * scale), Image.NEAREST)
            canvas = Image.new("RGB", (w * scale, h * scale + 28), (255, 255, 255))
            canvas.paste(big, (0, 0))
            draw = ImageDraw.Draw(canvas)
            verdict = "success" if rec["success"] else "failure"
            draw.text((3, h * scale + 2), rec["task"][:48], fill=(0, 0, 0))
            draw.text((3, h * scale + 14), f"seed {rec['seed']}: {verdict}", fill=(90, 90, 90))
            images.append(canvas)
        path = out / f"rollout_{i:02d}.gif"
        images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
        paths.append(path.name)
    return paths


def write_results(out: Path, results: dict, recordings: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    results["videos"] = save_recordings(recordings, out) if recordings else []
    atomic_write_json(out / "eval.json", results)


def format_results(r: dict) -> str:
    lo, hi = r["ci95"]
    lat = r["latency_ms"]
    text = (f"{r['task']}: success {r['success_rate']:.1%} ({r['successes']}/{r['episodes']}, "
            f"95% CI {lo:.1%}-{hi:.1%})")
    if r.get("chance_level") is not None:
        text += f", chance {r['chance_level']:.1%}"
    text += (f"; mean length {r['mean_episode_length']:.1f}; policy latency per step "
             f"p50 {lat['p50']:.2f} / p90 {lat['p90']:.2f} / p99 {lat['p99']:.2f} ms")
    if "pruner_kept" in r:
        k = r["pruner_kept"]
        text += (f"; pruner kept {k['mean']:.1f} of {k['visual_tokens']} visual tokens "
                 f"(p10 {k['p10']:.0f}, p50 {k['p50']:.0f}, p90 {k['p90']:.0f})")
    return text
