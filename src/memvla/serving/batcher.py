"""Batching across sessions: requests that arrive together run as one policy call.

:class:`Batcher` collects the requests of every session on the event loop. A request that
only pops the session's queue (a step between chunks, for a context that records nothing
between chunks) is answered at once, without the policy; for the others, once one is
pending it waits at most ``wait_s`` (default 5 ms) for others, less when every open
session already has one pending or ``max_batch`` are there, then hands the lot to
:class:`Engine` in a single worker thread (one policy, one call at a time; the event loop
keeps reading and answering meanwhile). One-at-a-time serving is ``wait_s=0,
max_batch=1``.

:class:`Engine` splits a batch into groups that can share a call: the same work (predict a
chunk, show a stateful context the frame, write its state from the frame
(``context.observe_every``: a write pass while the chunk executes), or only pop a queued
action, which needs no call) and the same *signature* — the same observation dtypes and
shapes and episode states of the same tree structure and leaf shapes except the batch axis
(a fresh episode, whose state is None, goes with other fresh ones; a frame history of the
same ring size with others at any step; a growing cache only with caches of its length). A
group's episode states are gathered leaf by leaf along the batch axis (``torch.cat``),
swapped into the policy, and scattered back (``split``) after the call; each session draws
its noise (1, A, Da') from its own generator, so its actions are those it gets served alone
(up to float rounding of batched kernels, ~1e-6). A failing group is retried session by
session, so one bad request never fails the others.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..context.base import TemporalContext
from .observation import stack_batches
from .session import Episode, Session, load_episode, read_episode

PREDICT, WRITE, OBSERVE, POP = "predict", "write", "observe", "pop"


def signature(tree: Any) -> Any:
    """What must agree for states to be gathered: structure, dtypes, devices and leaf
    shapes except the leading batch axis; non-tensor leaves by value (objects the batcher
    cannot split by identity, so that they are never batched with another session's)."""
    if tree is None:
        return None
    if isinstance(tree, Tensor):
        return ("T", str(tree.dtype), str(tree.device), tuple(tree.shape[1:]))
    if isinstance(tree, dict):
        return ("D", tuple((k, signature(v)) for k, v in tree.items()))
    if isinstance(tree, list | tuple):
        return (type(tree).__name__, tuple(signature(v) for v in tree))
    if isinstance(tree, bool | int | float | str):
        return ("V", tree)
    return ("O", id(tree))


def gather(trees: list[Any]) -> Any:
    """States of the same signature -> one state of their batches, leaf by leaf."""
    if len(trees) == 1:
        return trees[0]
    first = trees[0]
    if isinstance(first, Tensor):
        return torch.cat(trees)  # (ΣB, ...)
    if isinstance(first, dict):
        return {k: gather([t[k] for t in trees]) for k in first}
    if isinstance(first, list | tuple):
        return type(first)(gather(list(parts)) for parts in zip(*trees, strict=True))
    return first  # None or an equal plain value


def scatter(tree: Any, b: int) -> list[Any]:
    """One state of batch ``b`` -> ``b`` states of batch 1 (views of its rows)."""
    if b == 1:
        return [tree]
    if isinstance(tree, Tensor):
        if tree.shape[0] != b:
            raise ValueError(f"episode state: expected a leading batch axis of {b}, got a "
                             f"tensor of shape {tuple(tree.shape)}")
        return list(tree.split(1))  # b × (1, ...)
    if isinstance(tree, dict):
        parts = {k: scatter(v, b) for k, v in tree.items()}
        return [{k: parts[k][i] for k in tree} for i in range(b)]
    if isinstance(tree, list | tuple):
        parts = [scatter(v, b) for v in tree]
        return [type(tree)(p[i] for p in parts) for i in range(b)]
    return [tree] * b


def observation_signature(obs: dict) -> tuple:
    return tuple((k, str(v.dtype), tuple(v.shape[1:])) for k, v in obs.items()
                 if isinstance(v, Tensor))


@dataclass
class Request:
    """One session's observation (a policy batch of one) waiting to be served."""

    session: Session
    obs: dict
    mode: str = "step"  # "step": select_action logic; "chunk": a new chunk every request
    future: Any = None
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class Reply:
    """What a request gets: the actions from this step on (k, Da), and how it was served."""

    actions: np.ndarray
    predicted: bool
    batch_size: int  # sessions that shared the policy call (0: no call, a queue pop)
    infer_ms: float
    wait_ms: float = 0.0


class Engine:
    """Runs a batch of requests on one policy: groups, gathers, calls, scatters."""

    def __init__(self, policy):
        self.policy = policy
        ctx = policy.model.context
        # a context whose observe() is the base one's keeps its state between chunks (memory
        # tokens, SSM state, slow-fast): a step between chunks only pops the queue
        self.observes = bool(ctx.stateful) and type(ctx).observe is not TemporalContext.observe
        self.calls = 0  # policy calls made (for the benchmark and the tests)

    def kind(self, request: Request) -> str:
        if request.mode == "chunk" or not request.session.queue:
            return PREDICT
        if self.policy.writes_with(len(request.session.queue)):
            return WRITE
        return OBSERVE if self.observes else POP

    def serve(self, requests: list[Request]) -> list[Reply | Exception]:
        """Every request's reply (or the exception it raised), in order."""
        start = time.monotonic()
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(requests):
            kind = self.kind(r)
            key = (kind,) if kind == POP else (
                kind, observation_signature(r.obs), signature(r.session.episode.as_tree()))
            groups.setdefault(key, []).append(i)
        out: list[Reply | Exception] = [None] * len(requests)  # type: ignore[list-item]
        for key, idx in groups.items():
            members = [requests[i] for i in idx]
            rng = [r.session.generator.get_state() for r in members]
            try:
                replies = self._run(key[0], members)
            except Exception:  # noqa: BLE001 - isolate the culprit, answer the others
                for r, state in zip(members, rng, strict=True):
                    r.session.generator.set_state(state)  # the retry draws the same noise
                replies = []
                for r in members:
                    try:
                        replies += self._run(key[0], [r])
                    except Exception as e:  # noqa: BLE001
                        replies.append(e)
            for i, rep in zip(idx, replies, strict=True):
                if isinstance(rep, Reply):
                    rep.wait_ms = 1e3 * (start - requests[i].enqueued)
                out[i] = rep
        return out

    def _run(self, kind: str, members: list[Request]) -> list[Reply]:
        if kind == POP:
            return [self._reply(r.session, r.mode, False, 0, 0.0) for r in members]
        policy, b = self.policy, len(members)
        obs = stack_batches([r.obs for r in members])
        episode = Episode.from_tree(gather([r.session.episode.as_tree() for r in members]))
        t0 = time.perf_counter()
        load_episode(policy, episode)
        try:
            if kind == PREDICT:
                m = policy.config.model
                noise = torch.cat([r.session.draw_noise(m.chunk_size, m.max_action_dim)
                                   for r in members]).to(policy.dtype)  # (B, A, Da')
                n = policy.config.n_action_steps
                chunk = policy.predict_action_chunk(obs, noise=noise)[:, :n]  # (B, n, Da)
                chunk = chunk.float().cpu()
            elif kind == WRITE:
                policy.write_observation(obs)  # as select_action does while a chunk executes
            else:
                policy.observe(obs)  # as select_action does between chunks
            written = read_episode(policy)
        finally:
            load_episode(policy, Episode())  # the policy holds no session's state between calls
        ms = 1e3 * (time.perf_counter() - t0)
        self.calls += 1
        parts = scatter(written.as_tree(), b)
        replies = []
        for i, r in enumerate(members):
            r.session.episode = Episode.from_tree(parts[i])
            if kind == PREDICT:
                r.session.queue = list(chunk[i])  # n × (Da,)
                r.session.chunks += 1
            replies.append(self._reply(r.session, r.mode, kind == PREDICT, b, ms))
        return replies

    @staticmethod
    def _reply(session: Session, mode: str, predicted: bool, b: int, ms: float) -> Reply:
        """Step mode: this step's action first, then the rest of the queue; chunk mode: the
        whole chunk (the queue is not kept)."""
        actions = np.stack([a.numpy() for a in session.queue]).astype(np.float32)  # (k, Da)
        session.queue = session.queue[1:] if mode == "step" else []
        session.step += 1
        return Reply(actions, predicted, b, ms)


class Batcher:
    """Collects requests on the event loop and serves them in batches (see the module)."""

    def __init__(self, engine: Engine, wait_s: float = 0.005, max_batch: int = 64,
                 open_sessions=None):
        if wait_s < 0 or max_batch < 1:
            raise ValueError(f"batching: expected wait >= 0 and max batch >= 1, got "
                             f"{wait_s * 1e3} ms and {max_batch}")
        self.engine = engine
        self.wait_s = wait_s
        self.max_batch = max_batch
        self.open_sessions = open_sessions  # () -> sessions that may still send
        self._pending: list[Request] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="memvla-policy")
        self.batch_sizes: list[int] = []

    async def submit(self, session: Session, obs: dict, mode: str = "step") -> Reply:
        if self._closed:
            raise RuntimeError("the server is shutting down")
        request = Request(session, obs, mode)
        if self.engine.kind(request) == POP:  # no policy call: answered at once
            reply = self.engine.serve([request])[0]
            if isinstance(reply, Exception):
                raise reply
            return reply
        request.future = asyncio.get_running_loop().create_future()
        self._pending.append(request)
        self._idle.clear()
        self._wake.set()
        return await request.future

    def _everyone_waiting(self) -> bool:
        return self.open_sessions is not None and len(self._pending) >= self.open_sessions()

    async def run(self) -> None:
        """The batching loop; returns once :meth:`close` was called and nothing is left."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if not self._pending:
                self._wake.clear()
                if self._closed:
                    return
                continue
            deadline = self._pending[0].enqueued + self.wait_s
            while len(self._pending) < self.max_batch and not self._everyone_waiting():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            batch = self._pending[: self.max_batch]
            self._pending = self._pending[self.max_batch:]
            live = [r for r in batch if not r.future.done()]  # a closed connection's is gone
            if live:
                self.batch_sizes.append(len(live))
                results = await loop.run_in_executor(self._executor, self.engine.serve, live)
                for r, res in zip(live, results, strict=True):
                    if r.future.done():
                        continue
                    if isinstance(res, Exception):
                        r.future.set_exception(res)
                    else:
                        r.future.set_result(res)
            if not self._pending:
                self._idle.set()
            self._wake.set()

    async def drain(self) -> None:
        """Wait until every pending request has been answered."""
        await self._idle.wait()

    def close(self) -> None:
        """Serve what is pending, then let :meth:`run` return."""
        self._closed = True
        self._wake.set()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
