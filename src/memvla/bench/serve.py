"""``memvla bench serve``: the policy server under load, batched and one at a time.

For each checkpoint (``tiny`` as it is; ``smolvla-450m`` at its real widths with 2 text /
2 expert / 1 vision layers, 128 px vision input, word tokenizer, fitted to the built-in
task's 64×64 camera and 3-d state and action; both with random weights, saved to a
temporary directory) and each serving variant — cross-session batching (``--batch-wait-ms``,
max batch 64) and one at a time (wait 0, max batch 1) — a ``memvla serve`` process is
started on a free loopback port in ``step`` mode (what ``memvla eval --server`` uses: a
request per environment step, a chunk predicted every ``n_action_steps``); both variants
are up at once and their runs alternate for each N, so that both see the same load of the
machine. For each N of ``--sessions``, N client threads of this process each open a
session and step their own ``--task`` environment (a new episode, reset with a new seed,
when one ends) for ``--seconds`` (after an untimed warm-up of ``--warmup`` seconds), at
most ``--requests`` requests each. Figures: requests/s over all sessions, round-trip
latency p50 / p99 as the client sees it, and per N the speedup of batching (its
requests/s over one-at-a-time's) and batching's p99 over the single-session p99.

Correctness is checked, not assumed: during the load, each session records its first
episode's observations and actions; afterwards a fresh session replays two of them with
the same seed, alone, and must get the same actions (to 1e-4), else the run fails.

Server and clients share the machine's cores (on a 2-core CPU the clients' Python time is
a sizeable part of a request): the figures are for this loopback setup, not a network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .timing import format_table, percentile, torch_info

HELP = "policy server under load: requests/s, latency, batching speedup (loopback)"

SMOLVLA = "smolvla-450m"


def add_arguments(parser) -> None:
    parser.add_argument("--sessions", default="1,4,16,64", help="concurrent sessions (1,4,16,64)")
    parser.add_argument("--checkpoints", default=f"tiny,{SMOLVLA}",
                        help=f"presets benchmarked (tiny,{SMOLVLA}: the latter at reduced depth)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per run (4)")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds first (1)")
    parser.add_argument("--requests", type=int, default=2000,
                        help="most timed requests per session and run (2000)")
    parser.add_argument("--task", default="remember-color", help="built-in task stepped")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="the batching variant's wait (5)")
    parser.add_argument("--smolvla-seconds", type=float, default=12.0,
                        help=f"timed seconds per run of {SMOLVLA} (12; --quick: 6)")
    parser.add_argument("--smolvla-sessions", default="1,4,16",
                        help=f"sessions for {SMOLVLA} (1,4,16: a chunk takes ~0.2 s on a CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="1, 4, 16 sessions, 1.5 s per run (about a minute)")


def _config(preset: str):
    from ..presets import WORD_VOCAB, get_preset

    if preset != SMOLVLA:
        return get_preset(preset)
    return get_preset(SMOLVLA, [
        "model.text.depth=2", "model.expert.depth=2", "model.vision.depth=1",
        "model.vision.image_size=128", f"model.text.vocab_size={WORD_VOCAB}",
        "image_shape=[3,64,64]", "state_dim=3", "action_dim=3", "n_action_steps=8"])


class _Server:
    """``memvla serve`` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, wait_ms: float, max_batch: int):
        cmd = [sys.executable, "-m", "memvla.cli", "serve", "--checkpoint", str(checkpoint),
               "--port", "0", "--batch-wait-ms", str(wait_ms), "--max-batch", str(max_batch),
               "--device", "cpu", "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("memvla serve: ws://"):
            self.proc.kill()
            raise RuntimeError(f"memvla serve did not start: {line!r}")
        self.port = int(line.split()[2].rsplit(":", 1)[1])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _session_loop(port: int, task: str, index: int, t_start: float, t_end: float,
                  max_requests: int, out: dict) -> None:
    """One robot: step the task through the server until ``t_end``."""
    from ..client import PolicyClient
    from ..envs import make

    env = make(task)
    latencies, record, episode = [], {"obs": [], "actions": [], "seed": None}, 0
    with PolicyClient("127.0.0.1", port) as client:
        while time.perf_counter() < t_end and len(latencies) < max_requests:
            seed = 100_000 * (index + 1) + episode
            client.reset(seed=seed)
            obs, _ = env.reset(seed=seed)
            first = record["seed"] is None
            if first:
                record["seed"] = seed
            done = False
            while not done and time.perf_counter() < t_end and len(latencies) < max_requests:
                t0 = time.perf_counter()
                reply = client.infer(obs)
                if t0 >= t_start:
                    latencies.append(time.perf_counter() - t0)
                action = np.asarray(reply["actions"][0], dtype=np.float32)
                if first:
                    record["obs"].append(obs)
                    record["actions"].append(reply["actions"])
                obs, _, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
            episode += 1
    env.close()
    out[index] = {"latencies": latencies, "record": record}


def _replay_check(port: int, records: list[dict]) -> float:
    """The largest difference between the actions sessions got under load and what a
    fresh session gets alone for the same observations and seed."""
    from ..client import PolicyClient

    worst = 0.0
    with PolicyClient("127.0.0.1", port) as client:
        for rec in records:
            client.reset(seed=rec["seed"])
            for obs, actions in zip(rec["obs"], rec["actions"], strict=True):
                got = client.infer(obs)["actions"]
                worst = max(worst, float(np.abs(got - actions).max()))
    return worst


def load_run(port: int, sessions: int, task: str, seconds: float, warmup: float,
             max_requests: int) -> dict:
    """N concurrent sessions stepping ``task`` for ``seconds`` (after ``warmup``)."""
    out: dict[int, dict] = {}
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    threads = [threading.Thread(target=_session_loop, args=(port, task, i, t_start, t_end,
                                                            max_requests, out))
               for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    if len(out) != sessions:
        raise RuntimeError(f"{sessions - len(out)} of {sessions} sessions failed")
    lat = [x for r in out.values() for x in r["latencies"]]
    if not lat:
        raise RuntimeError(f"{sessions} sessions: no request completed in {seconds} s; raise "
                           "--seconds")
    picks = sorted({0, sessions - 1})
    worst = _replay_check(port, [out[i]["record"] for i in picks])
    if worst > 1e-4:
        raise RuntimeError(f"a session's actions under load differ from serving it alone by "
                           f"{worst:.3g}: its state was not its own")
    return {"sessions": sessions, "requests": len(lat), "seconds": elapsed,
            "requests_per_s": len(lat) / elapsed, "p50_ms": 1e3 * percentile(lat, 50),
            "p99_ms": 1e3 * percentile(lat, 99), "replay_max_diff": worst}


def run(args) -> int:
    from ..policies import make_policy

    sessions = [1, 4, 16] if args.quick else [int(s) for s in args.sessions.split(",")]
    smol_sessions = [s for s in sessions if s in {int(x) for x in
                                                  args.smolvla_sessions.split(",")}]
    seconds = 1.5 if args.quick else args.seconds
    warmup = 0.5 if args.quick else args.warmup
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    variants = {"batched": (args.batch_wait_ms, 64), "one-at-a-time": (0.0, 1)}
    results: dict = {"task": args.task, "mode": "step", "seconds": seconds,
                     "server_threads": os.environ["OMP_NUM_THREADS"],
                     "batch_wait_ms": args.batch_wait_ms, "torch": torch_info(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.checkpoints.split(","):
            import torch

            torch.manual_seed(0)
            policy = make_policy(_config(preset))
            ckpt = policy.save_pretrained(Path(tmp) / preset)
            params = sum(p.numel() for p in policy.parameters())
            del policy
            ns = smol_sessions if preset == SMOLVLA else sessions
            servers = {}
            try:  # both variants up at once, run back to back per N: the same machine load
                for variant, (wait_ms, max_batch) in variants.items():
                    servers[variant] = _Server(ckpt, wait_ms, max_batch)
                for n in ns:
                    for variant, server in servers.items():
                        secs = seconds if preset != SMOLVLA else (
                            6.0 if args.quick else args.smolvla_seconds)
                        r = load_run(server.port, n, args.task, secs, warmup, args.requests)
                        r.update(checkpoint=preset, params=params, variant=variant)
                        results["runs"].append(r)
                        print(f"{preset:>13} {variant:>13} {n:>3} sessions: "
                              f"{r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                              f"p99 {r['p99_ms']:7.1f} ms", flush=True)
            finally:
                for server in servers.values():
                    server.close()
    _summarise(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def _summarise(results: dict) -> None:
    runs = {(r["checkpoint"], r["variant"], r["sessions"]): r for r in results["runs"]}
    rows, summary = [], []
    for (ckpt, variant, n), r in runs.items():
        if variant != "batched":
            continue
        alone = runs.get((ckpt, "one-at-a-time", n))
        single = runs.get((ckpt, "batched", 1))
        speedup = r["requests_per_s"] / alone["requests_per_s"] if alone else float("nan")
        p99_ratio = r["p99_ms"] / single["p99_ms"] if single else float("nan")
        summary.append({"checkpoint": ckpt, "sessions": n, "speedup": speedup,
                        "p99_over_single_session": p99_ratio})
        rows.append([ckpt, n, f"{r['requests_per_s']:.1f}",
                     f"{alone['requests_per_s']:.1f}" if alone else "-",
                     f"{speedup:.2f}x", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                     f"{p99_ratio:.2f}x"])
    results["summary"] = summary
    print()
    print(format_table(["checkpoint", "sessions", "batched req/s", "one-at-a-time req/s",
                        "speedup", "p50 ms", "p99 ms", "p99 / 1-session p99"], rows))
