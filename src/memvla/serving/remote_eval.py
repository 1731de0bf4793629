"""``memvla eval --server HOST:PORT``: local evaluation's loop with the policy remote.

The same episodes as :func:`memvla.evaluate.evaluate` (episode i reset with seed
``seed + i``, in waves of ``batch``), each driven by its own :class:`PolicyClient`
connection, i.e. its own session on the server, reset with the episode's seed so that the
server draws the episode's noise as local evaluation does. Every step sends every running
episode's observation (concurrently, so the server batches them) and executes
``actions[0]`` (the server runs in ``step`` mode: ``select_action``'s logic per session).
An episode's actions are then those of local evaluation up to the float rounding of
batched kernels, and so is the success rate. The latency figures are the round trips as
the robot sees them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..evaluate import Wave, _step, run_waves, summarize  # the same episode bookkeeping


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``ws://HOST:PORT``) -> (host, port)."""
    host, sep, port = text.removeprefix("ws://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--server: expected HOST:PORT, e.g. 127.0.0.1:8000, got {text!r}")
    return host, int(port)


def check_served(meta: dict, env) -> None:
    """The served policy must read the task's cameras and state and act in its space."""
    space = env.observation_space
    problems = []
    if meta.get("mode") != "step":
        problems.append(f"the server runs in mode {meta.get('mode')!r}; evaluation needs "
                        "'step' (memvla serve --mode step)")
    if meta.get("state_dim") != space["observation.state"].shape[0]:
        problems.append(f"state dim: task {space['observation.state'].shape[0]}, server "
                        f"{meta.get('state_dim')}")
    if meta.get("action_dim") != env.action_space.shape[0]:
        problems.append(f"action dim: task {env.action_space.shape[0]}, server "
                        f"{meta.get('action_dim')}")
    for key in meta.get("cameras", []):
        if key not in space.spaces:
            problems.append(f"camera {key!r} missing from the task's observations")
    if problems:
        raise ValueError("the served policy does not fit the task: " + "; ".join(problems))


def _remote_wave(task: str, options: dict, seeds: list[int], host: str, port: int,
                 api_key: str | None, record: int, on_done) -> Wave:
    from ..client import PolicyClient
    from ..envs import make

    envs = [make(task, **options) for _ in seeds]
    clients: list[PolicyClient] = []
    try:
        clients = [PolicyClient(host, port, api_key) for _ in seeds]
        for c, s in zip(clients, seeds, strict=True):
            c.reset(seed=s)
        obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds, strict=True)]
        wave = Wave.start(obs, seeds, record)
        running = [True] * len(envs)
        with ThreadPoolExecutor(len(seeds)) as pool:
            while any(running):
                live = [i for i, r in enumerate(running) if r]
                t0 = time.perf_counter()
                replies = list(pool.map(lambda i: clients[i].infer(obs[i]), live))
                ms = 1e3 * (time.perf_counter() - t0)
                wave.policy_ms += ms
                if any(r["predicted"] for r in replies):
                    wave.chunk_ms.append(ms)
                wave.steps += 1
                for i, reply in zip(live, replies, strict=True):
                    action = np.asarray(reply["actions"][0], dtype=np.float32)  # (Da,)
                    running[i] = _step(envs[i], action, i, obs, wave, on_done)
        return wave
    finally:
        for c in clients:
            c.close()
        for env in envs:
            env.close()


def remote_evaluate(task: str, episodes: int, server: str, api_key: str | None = None,
                    batch: int = 8, seed: int = 0, task_options: dict | None = None,
                    record: int = 0, progress: bool = True) -> tuple[dict, list[dict]]:
    """:func:`memvla.evaluate.evaluate` with the policy served at ``server`` (HOST:PORT)."""
    from ..client import PolicyClient
    from ..envs import make

    if episodes <= 0 or batch <= 0:
        raise ValueError(f"episodes and batch must be > 0, got {episodes} and {batch}")
    host, port = parse_address(server)
    task_options = dict(task_options or {})
    probe = make(task, **task_options)
    chance = getattr(probe.unwrapped, "chance_level", None)
    try:
        with PolicyClient(host, port, api_key) as c:
            meta = c.get_server_metadata()
        check_served(meta, probe)
    finally:
        probe.close()
    waves = run_waves(episodes, batch, seed, record, f"eval {task} @ {server}", progress,
                      lambda seeds, rec, done: _remote_wave(task, task_options, seeds, host,
                                                            port, api_key, rec, done))
    results = summarize(waves, task=task, task_options=task_options, seed=seed, batch=batch,
                        chance_level=chance)
    results["server"] = server
    results["served_policy"] = {k: meta.get(k) for k in ("policy_type", "context", "mode")}
    return results, [r for w in waves for r in w.recordings]
