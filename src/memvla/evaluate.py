"""Closed-loop evaluation: ``memvla eval``.

Episodes run in waves of ``batch`` gymnasium environments stepped in lockstep, with one
batched policy call per action chunk (:class:`PolicyRunner`, through ``select_action``);
episode i is reset with seed ``seed + i`` and draws its policy noise from its own
generator seeded with ``seed + i``, so an episode's outcome does not depend on ``batch``
nor on the episodes that share its wave, and two evaluations of the same checkpoint
agree. The global random number
generators are neither read nor changed. Environments that finish early keep feeding their
last observation (their actions are ignored) so that the wave stays in lockstep.

Latency, as reported: ``chunk_latency_ms`` is one policy call that predicts an action
chunk for the whole wave (inputs to the device, the chunk back on the host);
``step_latency_ms`` is the policy time per environment step, averaged over the evaluation
(the chunk calls and the queue pops between them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .utils import atomic_write_json

IMAGE_KEY = "observation.images.top"  # the camera the recordings show
# how an episode ended: the task succeeded, the task failed (terminated without success: e.g.
# the wrong object touched) or the step limit came first (truncated: a failure too)
OUTCOMES = ("success", "failed", "timeout")


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": ..., ...}`` with linear interpolation (NaN without values)."""
    return {f"p{q}": float(np.percentile(values, q)) if values else float("nan") for q in qs}


def stack_observations(observations: list[dict], device: torch.device | str | None = None
                       ) -> dict:
    """Environment observations -> one policy batch on ``device``: every array stacked
    along a new batch axis B, ``task`` a list of B strings."""
    batch = {k: torch.from_numpy(np.stack([o[k] for o in observations])).to(device)
             for k in observations[0] if k != "task"}  # (B, ...) each
    batch["task"] = [o["task"] for o in observations]
    return batch


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


# -- who acts: the scripted experts or a policy --------------------------------------------------
class ExpertPolicy:
    """The tasks' scripted experts behind the actor interface (one per environment)."""

    def __init__(self, envs):
        from .envs import make_expert

        self.experts = [make_expert(e) for e in envs]
        for e in self.experts:
            e.reset()

    @property
    def predicts(self) -> bool:
        """Every call computes its actions (the expert has no chunk)."""
        return True

    def act(self, observations: list[dict], running: list[bool]) -> np.ndarray:
        return np.stack([e.act(o) for e, o in zip(self.experts, observations, strict=True)])


class PolicyRunner:
    """A policy acting in a wave of environments through ``select_action``: every
    ``n_action_steps`` steps it predicts the next actions of every episode in one batched
    call, and the steps in between pop them (a temporal context sees every frame, e.g. a
    frame history records it). Each episode's noise (B, chunk_size, max_action_dim) comes
    from its own generator on the policy's device, seeded with the episode's seed, one draw
    per chunk, so the noise an episode sees does not depend on the others (the parallel
    family ignores it: its chunks are regressed). ``kept`` collects the visual tokens a
    token pruner kept, per running episode and chunk."""

    def __init__(self, policy, seeds: list[int]):
        self.policy = policy
        self.generators = [torch.Generator(device=policy.device).manual_seed(s) for s in seeds]
        self.kept: list[int] = []
        self.memory: list[tuple[int, int, int]] = []  # (chunk index, tokens, kept)
        self.retrieved: list[bool] = []  # per running episode and chunk: it retrieved
        self.chunks = 0
        self.last_action: torch.Tensor | None = None  # (B, Da) of the last call
        policy.reset()

    @property
    def predicts(self) -> bool:
        """True when the next :meth:`act` predicts a chunk."""
        return self.policy.queued_actions == 0

    def noise(self) -> torch.Tensor:
        m, dev = self.policy.config.model, self.policy.device
        draws = [torch.randn(1, m.chunk_size, m.max_action_dim, generator=g, device=dev)
                 for g in self.generators]  # B × (1, A, Da')
        return torch.cat(draws).to(self.policy.dtype)  # (B, A, Da')

    def act(self, observations: list[dict], running: list[bool]) -> np.ndarray:
        predicts = self.predicts
        # to the device only when the policy reads the frame (a queue pop only checks it)
        reads = predicts or self.policy.model.context.stateful
        obs = stack_observations(observations, self.policy.device if reads else None)
        action = self.policy.select_action(obs, noise=self.noise() if predicts else None)
        if predicts:
            self.kept += pruner_kept(self.policy, running)
            self.memory += [(self.chunks, *m) for m in memory_kept(self.policy, running)]
            self.retrieved += chunk_retrieved(self.policy, running)
            self.chunks += 1
        self.last_action = action
        return action.float().cpu().numpy()  # (B, Da)

    def predicted_chunk(self) -> np.ndarray:
        """The chunk the last call predicted (B, n_action_steps, Da): its action and the
        queue (read right after that call)."""
        queued = [self.last_action, *self.policy._queue]
        return torch.stack(queued, 1).float().cpu().numpy()  # (B, n, Da)


def pruner_kept(policy, running: list[bool]) -> list[int]:
    """Visual tokens the policy's token pruner kept in its last call, for the episodes
    still running (none without a pruner)."""
    pruner = getattr(getattr(policy, "model", None), "pruner", None)
    last = getattr(pruner, "last_kept", None)
    if last is None:
        return []
    return [int(k) for k, r in zip(last.tolist(), running, strict=True) if r]


def chunk_retrieved(policy, running: list[bool]) -> list[bool]:
    """Whether each still-running episode's last chunk retrieved from an experience store
    ([] for a policy without one)."""
    last = getattr(policy, "last_retrieval", None)
    if last is None:
        return []
    return [bool(u) for u, r in zip(last["retrieved"].tolist(), running, strict=True) if r]


def memory_kept(policy, running: list[bool]) -> list[tuple[int, int]]:
    """(memory tokens, kept after voxel pruning) of the policy's temporal context in its
    last call, for the episodes still running ([] for a context without such tokens)."""
    last = getattr(getattr(getattr(policy, "model", None), "context", None), "last_memory",
                   None)
    if last is None:
        return []
    if not last:  # no memory tokens in this prefix (e.g. the episode's first window)
        return [(0, 0)] * sum(running)
    pairs = zip(last["tokens"].tolist(), last["kept"].tolist(), running, strict=True)
    return [(int(t), int(k)) for t, k, r in pairs if r]


# -- one wave of episodes ------------------------------------------------------------------------
@dataclass
class Wave:
    """What a wave of lockstep episodes gave: per-episode results (seed, success, length),
    the recordings of the first few, the policy's timed calls and the lockstep steps."""

    episodes: list[dict]
    recordings: list[dict] = field(default_factory=list)
    chunk_ms: list[float] = field(default_factory=list)  # the calls that predicted actions
    policy_ms: float = 0.0  # every call, queue pops included
    steps: int = 0
    kept: list[int] = field(default_factory=list)
    memory: list[tuple[int, int, int]] = field(default_factory=list)
    retrieved: list[bool] = field(default_factory=list)

    @classmethod
    def start(cls, obs: list[dict], seeds: list[int], record: int) -> Wave:
        """A wave whose episodes start from ``obs`` (one per seed), recording the first
        ``record``."""
        wave = cls([{"seed": s, "success": False, "outcome": "running", "length": 0}
                    for s in seeds])
        wave.recordings = [{"frames": [o[IMAGE_KEY]], "actions": [], "task": o["task"],
                            "seed": s, "success": False}
                           for o, s in zip(obs[:record], seeds, strict=False)]
        return wave


def run_wave(task: str, options: dict, seeds: list[int], policy=None, record: int = 0,
             on_done=None, recorder=None) -> Wave:
    """Run one episode per seed in lockstep (``policy=None``: the scripted experts);
    record the frames and actions of the first ``record`` episodes. An episode succeeds
    only when it terminates with ``info["is_success"]``: running out of steps (truncation)
    is a failure. ``recorder`` (:class:`memvla.retrieval.RolloutRecorder`, with a policy)
    gets every predicted chunk of every episode and its outcome."""
    from .envs import make

    envs = [make(task, **options) for _ in seeds]
    try:
        actor = ExpertPolicy(envs) if policy is None else PolicyRunner(policy, seeds)
        obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds, strict=True)]
        wave = Wave.start(obs, seeds, record)
        running = [True] * len(envs)
        while any(running):
            predicts = actor.predicts
            t0 = time.perf_counter()
            actions = actor.act(obs, running)  # (B, Da)
            ms = (time.perf_counter() - t0) * 1000
            wave.policy_ms += ms
            if predicts:
                wave.chunk_ms.append(ms)
                if recorder is not None:
                    live = [i for i, r in enumerate(running) if r]
                    chunk = actor.predicted_chunk()  # (B, n, Da)
                    recorder.chunks([seeds[i] for i in live], [obs[i] for i in live],
                                    chunk[live])
            wave.steps += 1
            for i, env in enumerate(envs):
                if running[i]:
                    running[i] = _step(env, actions[i], i, obs, wave, on_done)
                    if not running[i] and recorder is not None:
                        recorder.end(seeds[i], wave.episodes[i]["success"])
        wave.kept = getattr(actor, "kept", [])
        wave.memory = getattr(actor, "memory", [])
        wave.retrieved = getattr(actor, "retrieved", [])
        return wave
    finally:
        for env in envs:
            env.close()


def _step(env, action: np.ndarray, i: int, obs: list[dict], wave: Wave, on_done) -> bool:
    """Step episode i of the wave; returns whether it is still running."""
    o, _, terminated, truncated, info = env.step(action.astype(np.float32))
    obs[i] = o
    episode = wave.episodes[i]
    episode["length"] += 1
    if i < len(wave.recordings):
        wave.recordings[i]["frames"].append(o[IMAGE_KEY])
        wave.recordings[i]["actions"].append(np.array(action, dtype=np.float32))
    if not (terminated or truncated):
        return True
    episode["success"] = bool(terminated and info.get("is_success", False))
    episode["outcome"] = ("success" if episode["success"] else
                          "failed" if terminated else "timeout")
    if i < len(wave.recordings):
        wave.recordings[i]["success"] = episode["success"]
    if on_done is not None:
        on_done()
    return False


# -- the evaluation ------------------------------------------------------------------------------
def evaluate(task: str, episodes: int, policy=None, batch: int = 8, seed: int = 0,
             task_options: dict | None = None, record: int = 0,
             progress: bool = True, recorder=None) -> tuple[dict, list[dict]]:
    """Roll out ``episodes`` episodes, ``batch`` at a time; ``policy=None`` runs the
    scripted expert. Returns (results, recordings): the results as :func:`summarize` gives
    them; a recording holds the frames, actions, instruction, seed and success of one of
    the first ``record`` episodes. ``recorder``: see :func:`run_wave`."""
    from .envs import make

    if episodes <= 0 or batch <= 0:
        raise ValueError(f"episodes and batch must be > 0, got {episodes} and {batch}")
    task_options = dict(task_options or {})
    probe = make(task, **task_options)  # bad task names and options fail here
    chance = getattr(probe.unwrapped, "chance_level", None)
    if policy is not None:
        check_compatible(policy, probe)
    probe.close()
    waves = run_waves(episodes, batch, seed, record, f"eval {task}", progress,
                      lambda seeds, rec, done: run_wave(task, task_options, seeds, policy, rec,
                                                        on_done=done, recorder=recorder))
    results = summarize(waves, task=task, task_options=task_options, seed=seed, batch=batch,
                        chance_level=chance)
    if any(w.kept for w in waves):
        results["pruner_kept"] = kept_summary(policy, [k for w in waves for k in w.kept])
    if any(w.memory for w in waves):
        results["memory_tokens"] = memory_summary([m for w in waves for m in w.memory])
    retrieved = [r for w in waves for r in w.retrieved]
    if retrieved:  # switching by confidence: the share of chunks that retrieved
        results["retrieval"] = {"chunks": len(retrieved),
                                "retrieved_share": float(np.mean(retrieved))}
    return results, [r for w in waves for r in w.recordings]


def run_waves(episodes: int, batch: int, seed: int, record: int, desc: str, progress: bool,
              wave) -> list[Wave]:
    """Episodes ``seed`` … ``seed + episodes − 1`` in waves of ``batch``: ``wave(seeds,
    record, on_done)`` runs one (recording its first ``record`` episodes, calling
    ``on_done`` as each ends), under one progress bar."""
    from tqdm.auto import tqdm

    waves = []
    with tqdm(total=episodes, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for first in range(0, episodes, batch):
            seeds = list(range(seed + first, seed + min(first + batch, episodes)))
            waves.append(wave(seeds, max(0, record - first), lambda: bar.update(1)))
    return waves


def summarize(waves: list[Wave], **meta) -> dict:
    """Success rate with its 95% Wilson interval, the count of each outcome (success, failed,
    timeout), mean episode length, latency and the per-episode results (seed, success,
    outcome, length) of the waves, with ``meta`` (task, ...)."""
    per_episode = [e for w in waves for e in w.episodes]
    n = len(per_episode)
    k = sum(e["success"] for e in per_episode)
    steps = sum(w.steps for w in waves)
    outcomes = {o: sum(e["outcome"] == o for e in per_episode) for o in OUTCOMES}
    return {**meta, "episodes": n, "successes": k, "success_rate": k / n if n else float("nan"),
            "ci95": list(wilson_interval(k, n)), "outcomes": outcomes,
            "mean_episode_length": float(np.mean([e["length"] for e in per_episode])),
            "chunk_latency_ms": percentiles([ms for w in waves for ms in w.chunk_ms]),
            "step_latency_ms": sum(w.policy_ms for w in waves) / steps if steps else float("nan"),
            "per_episode": per_episode}


def kept_summary(policy, kept: list[int]) -> dict:
    """The distribution of the visual tokens a token pruner kept over every chunk."""
    return {"visual_tokens": policy.model.pruner.last_num_patches,
            "mean": float(np.mean(kept)), "min": int(min(kept)), "max": int(max(kept)),
            **percentiles(kept, (10, 50, 90)), "histogram": np.bincount(kept).tolist()}


def memory_summary(records: list[tuple[int, int, int]]) -> dict:
    """The temporal context's memory tokens over every chunk: the means before and after
    voxel pruning, the share pruned, and both by chunk index of the episode."""
    tokens = sum(t for _, t, _ in records)
    kept = sum(k for _, _, k in records)
    by_chunk: dict[int, list[tuple[int, int]]] = {}
    for i, t, k in records:
        by_chunk.setdefault(i, []).append((t, k))
    return {"mean_tokens": tokens / len(records), "mean_kept": kept / len(records),
            "pruned_share": 1 - kept / tokens if tokens else 0.0,
            "by_chunk": [{"chunk": i, "tokens": float(np.mean([t for t, _ in v])),
                          "kept": float(np.mean([k for _, k in v]))}
                         for i, v in sorted(by_chunk.items())]}


# -- output ---------------------------------------------------------------------------------------
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
    chunk = r["chunk_latency_ms"]
    text = (f"{r['task']}: success {r['success_rate']:.1%} ({r['successes']}/{r['episodes']}, "
            f"95% CI {lo:.1%}-{hi:.1%})")
    if "outcomes" in r:  # results of older versions have none
        text += f" (failed {r['outcomes']['failed']}, timed out {r['outcomes']['timeout']})"
    if r.get("chance_level") is not None:
        text += f", chance {r['chance_level']:.1%}"
    wave = min(r["batch"], r["episodes"])
    text += (f"; mean length {r['mean_episode_length']:.1f}; latency per chunk (one policy "
             f"call for up to {wave} environments) p50 {chunk['p50']:.2f} / p90 "
             f"{chunk['p90']:.2f} / p99 {chunk['p99']:.2f} ms, per step (average) "
             f"{r['step_latency_ms']:.2f} ms")
    if "pruner_kept" in r:
        k = r["pruner_kept"]
        text += (f"; pruner kept {k['mean']:.1f} of {k['visual_tokens']} visual tokens "
                 f"(p10 {k['p10']:.0f}, p50 {k['p50']:.0f}, p90 {k['p90']:.0f})")
    if "memory_tokens" in r:
        m = r["memory_tokens"]
        text += (f"; memory tokens {m['mean_kept']:.1f} of {m['mean_tokens']:.1f} per chunk "
                 f"kept ({m['pruned_share']:.1%} pruned by voxel)")
    if "retrieval" in r:
        text += (f"; retrieved on {r['retrieval']['retrieved_share']:.1%} of "
                 f"{r['retrieval']['chunks']} chunks")
    return text
