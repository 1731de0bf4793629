"""Robot-side client of ``memvla serve`` (and of any openpi-protocol policy server).

:class:`PolicyClient` has openpi's ``WebsocketClientPolicy`` calls (``infer(obs)``,
``get_server_metadata()``) plus ``reset(seed=None)``, which starts a new episode of this
session on the server (its memory, history, queue and noise). A text frame from the
server is an error and raises :class:`ServerError` with the server's message.

:class:`AsyncActor` is asynchronous inference as SmolVLA / LeRobot do it: the robot
executes actions from a local queue; once at most ``threshold`` of a chunk is left, the
current observation is sent in a background thread while the queue keeps being executed,
and the new chunk, aligned to the step its observation was taken at (the actions for
steps already executed are dropped), is merged with what is left of the old one
(:func:`merge_chunks`: ``"replace"``, ``"average"`` or ``"weighted"``, LeRobot's 0.3 old /
0.7 new). It needs a server in ``chunk`` mode (every request predicts a chunk).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .serving.protocol import packb, unpackb

MERGES = ("replace", "average", "weighted")


class ServerError(RuntimeError):
    """The server answered a request with an error (a text frame)."""


class PolicyClient:
    """A websocket connection to a policy server: one robot, one session."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = 8000,
                 api_key: str | None = None, timeout: float = 60.0):
        from websockets.sync.client import connect

        uri = host if host.startswith("ws") else f"ws://{host}"
        if port is not None:
            uri += f":{port}"
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self.uri = uri
        self.timeout = timeout
        self._lock = threading.Lock()  # one request at a time on the connection
        self._ws = connect(uri, additional_headers=headers, compression=None, max_size=None,
                           open_timeout=timeout)
        self._ws.__enter__()  # held open by this object (closed by close() / __exit__)
        self._metadata = self._receive()

    def _receive(self) -> Any:
        reply = self._ws.recv(timeout=self.timeout)
        if isinstance(reply, str):
            raise ServerError(reply)
        return unpackb(reply)

    def _call(self, message: dict) -> dict:
        with self._lock:
            self._ws.send(packb(message))
            return self._receive()

    def get_server_metadata(self) -> dict:
        """What the server sent on connect (policy, observation spec, mode, session)."""
        return self._metadata

    def infer(self, obs: dict) -> dict:
        """One observation (no batch axis) -> the server's reply (``actions`` (k, Da))."""
        return self._call(obs)

    def reset(self, seed: int | None = None) -> dict:
        """Start a new episode of this session (``seed``: its noise draws)."""
        return self._call({"reset": True, "seed": seed})

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_chunks(old: np.ndarray, new: np.ndarray, how: str = "average") -> np.ndarray:
    """The actions to execute next: ``old`` (k, Da) what is left of the current chunk,
    ``new`` (m, Da) the new chunk from the same step on. On the steps both cover, keep
    ``new`` (``replace``), their mean (``average``) or 0.3·old + 0.7·new (``weighted``);
    past them, the longer one's actions."""
    if how not in MERGES:
        raise ValueError(f"merge: expected one of {MERGES}, got {how!r}")
    if old.ndim != 2 or new.ndim != 2 or (len(old) and old.shape[1] != new.shape[1]):
        raise ValueError(f"merge: expected chunks (k, Da) and (m, Da), got {old.shape} and "
                         f"{new.shape}")
    n = min(len(old), len(new))
    if how == "replace" or n == 0:
        head = new[:n]
    elif how == "average":
        head = 0.5 * (old[:n] + new[:n])  # (n, Da)
    else:
        head = 0.3 * old[:n] + 0.7 * new[:n]  # (n, Da)
    tail = new[n:] if len(new) > n else old[n:]
    return np.concatenate([head, tail]).astype(np.float32)  # (max(k, m), Da)


class AsyncActor:
    """Asynchronous inference over a :class:`PolicyClient` (see the module)."""

    def __init__(self, client: PolicyClient, threshold: float = 0.5, merge: str = "average"):
        meta = client.get_server_metadata()
        if meta.get("mode") != "chunk":
            raise ValueError(f"AsyncActor: expected a server in mode 'chunk' (every request "
                             f"predicts a chunk), got mode {meta.get('mode')!r}; start it with "
                             "'memvla serve --mode chunk'")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold: expected a fraction of the chunk in [0, 1), got "
                             f"{threshold}")
        if merge not in MERGES:
            raise ValueError(f"merge: expected one of {MERGES}, got {merge!r}")
        self.client = client
        self.chunk = int(meta["n_action_steps"])
        self.threshold = threshold
        self.merge = merge
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="memvla-async")
        self._queue: deque[np.ndarray] = deque()
        self._pending: tuple[int, Future] | None = None  # (step of its observation, reply)
        self.step = 0
        self.requests = 0
        self.starved = 0  # steps that had to wait for a chunk

    def _request(self, obs: dict) -> None:
        self._pending = (self.step, self._pool.submit(self.client.infer, dict(obs)))
        self.requests += 1

    def _collect(self, block: bool) -> None:
        if self._pending is None:
            return
        t_obs, future = self._pending
        if not block and not future.done():
            return
        self._pending = None
        new = np.asarray(future.result()["actions"], dtype=np.float32)[self.step - t_obs:]
        old = np.stack(self._queue) if self._queue else new[:0]
        self._queue = deque(merge_chunks(old, new, self.merge))

    def act(self, obs: dict) -> np.ndarray:
        """The action (Da,) to execute for ``obs``, the observation of this step."""
        self._collect(block=False)
        while not self._queue:  # the first step, or the chunk ran out before the next came
            if self._pending is None:
                self._request(obs)
            self.starved += 1
            self._collect(block=True)
        action = self._queue.popleft()
        if self._pending is None and len(self._queue) <= self.threshold * self.chunk:
            self._request(obs)  # predicted from this step's frame: its first action is now
        self.step += 1
        return action

    def reset(self, seed: int | None = None) -> dict:
        """Wait for the request in flight, forget the queue and start a new episode."""
        if self._pending is not None:
            self._pending[1].result()
            self._pending = None
        self._queue.clear()
        self.step = 0
        return self.client.reset(seed)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
