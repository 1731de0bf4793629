"""The policy server: openpi's websocket protocol in front of a memvla policy.

Protocol (what ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` speaks):
on connect the server sends a metadata message (a msgpack map: the policy, what an
observation must hold, the serving mode, this session's id and seed); then every binary
message from the client is one robot's observation (a msgpack map of numpy arrays in
openpi's encoding, :mod:`memvla.serving.protocol`, no batch axis) and gets one binary
reply ``{"actions": (k, action_dim) float32, "predicted": bool, "step": int,
"server_timing": {"infer_ms", "wait_ms", "total_ms", "batch_size", "prev_total_ms"}}``.
A request that cannot be served is answered with a *text* frame ``"error: <why>"`` naming
the key and the expected and received value (openpi's client raises on a text frame);
the connection stays open and the session's episode is untouched. ``GET /healthz``
answers ``OK`` (503 while shutting down), without an API key.

What ``actions`` holds (``mode``):

- ``"step"`` (the default): the client sends *every* observation and executes
  ``actions[0]``. The server runs ``select_action``'s logic per session: it predicts a
  chunk of ``n_action_steps`` when the session's queue is empty, else pops the queue
  (a stateful context, e.g. a frame history, is shown the frame first, and with
  ``context.observe_every`` the state is written from it, as locally), and
  replies with this step's action followed by the rest of the queue. A memory policy so
  writes its memory exactly every ``n_action_steps`` steps, and every context sees what
  it sees in local evaluation: ``memvla eval --server`` reaches local evaluation's results.
- ``"chunk"``: every observation predicts a new chunk of ``n_action_steps`` actions (what
  openpi's ``ActionChunkBroker`` and :class:`memvla.client.AsyncActor` expect). A context
  that records every frame (frame history), or a policy that writes its state from the
  frames observed while a chunk executes (``context.observe_every``), cannot be served
  this way (it would miss the frames in between) and is refused at start.

Control message: ``{"reset": true, "seed": int (optional)}`` starts a new episode (a new
connection does too) and is answered ``{"reset": true, "seed": s, "episode": n}``; the
seed makes the session's noise draws those of local evaluation's episode of that seed.

Safety: binds 127.0.0.1 unless told otherwise; with an API key, connections without
``Authorization: Api-Key <key>`` get HTTP 401; messages over ``max_message_bytes`` get an
error reply (over twice that, the websocket layer closes the connection, code 1009, before
reading it whole); nothing is unpickled; a session idle for ``idle_timeout_s`` is closed
(code 1000, "idle timeout") and freed. :meth:`PolicyServer.stop` (SIGTERM / SIGINT in
:func:`serve_forever`) stops accepting connections, answers every request in flight,
closes the connections (code 1001) and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .batcher import Batcher, Engine
from .observation import ObservationSpec
from .protocol import ProtocolError, packb, unpackb
from .session import Session

log = logging.getLogger("memvla.serve")
MODES = ("step", "chunk")


@dataclass
class ServeConfig:
    """How the server listens, batches and guards itself (``memvla serve``'s options)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    keymap: dict[str, str] = field(default_factory=dict)
    mode: str = "step"
    batch_wait_ms: float = 5.0
    max_batch: int = 64
    idle_timeout_s: float | None = 300.0
    max_message_mb: float = 16.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        if self.batch_wait_ms < 0 or self.max_batch < 1:
            raise ValueError(f"batch wait must be >= 0 ms and max batch >= 1, got "
                             f"{self.batch_wait_ms} and {self.max_batch}")
        if self.idle_timeout_s is not None and self.idle_timeout_s <= 0:
            raise ValueError(f"idle timeout: expected > 0 seconds, got {self.idle_timeout_s}")
        if self.max_message_mb <= 0:
            raise ValueError(f"max message size: expected > 0 MB, got {self.max_message_mb}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api key: expected a non-empty string")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)


class PolicyServer:
    """One policy served to many sessions over websockets (see the module)."""

    def __init__(self, policy, config: ServeConfig | None = None):
        self.policy = policy.eval()
        self.config = config or ServeConfig()
        ctx = policy.model.context
        if self.config.mode == "chunk" and ctx.stateful and not ctx.recurrent:
            raise ValueError(f"mode 'chunk': the policy's context ({ctx.kind}) records every "
                             "frame, which a chunk-per-request client does not send; serve it "
                             "in mode 'step'")
        every = policy.config.context.observe_every
        if self.config.mode == "chunk" and every is not None:
            raise ValueError(f"mode 'chunk': the policy writes its {ctx.kind} state from the "
                             f"frames observed while a chunk executes (context.observe_every="
                             f"{every}), which a chunk-per-request client does not send; "
                             "serve it in mode 'step'")
        self.spec = ObservationSpec(policy.config, self.config.keymap)
        self.engine = Engine(policy)
        self.port: int | None = None
        self.sessions: dict[int, tuple[Session, ServerConnection]] = {}
        self.sessions_opened = 0
        self._busy: set[int] = set()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.batcher: Batcher | None = None

    # -- metadata -----------------------------------------------------------------------
    def metadata(self, session: Session) -> dict:
        cfg = self.policy.config
        return {"server": "memvla", "protocol": 1, "policy_type": self.policy.policy_type,
                "family": cfg.family, "context": cfg.context.kind,
                "stateful": bool(self.policy.model.context.stateful),
                "mode": self.config.mode, "n_action_steps": cfg.n_action_steps,
                "chunk_size": cfg.model.chunk_size, "action_dim": cfg.action_dim,
                "state_dim": cfg.state_dim, "cameras": list(cfg.image_keys),
                "image_shape": list(cfg.image_shape), "observation": self.spec.describe(),
                "max_message_bytes": self.config.max_message_bytes,
                "session": session.id, "seed": session.seed}

    # -- HTTP: health and authentication --------------------------------------------------
    def _process_request(self, connection: ServerConnection, request):
        if request.path == "/healthz":
            if self._stopping:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                          "shutting down\n")
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        key = self.config.api_key
        if key is not None:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Api-Key {key}".encode()):
                log.warning("refused a connection from %s: missing or wrong API key",
                            connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key: send the header "
                                          "'Authorization: Api-Key <key>'\n")
        if self._stopping:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        return None

    # -- one connection = one session -------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        session = Session(device=self.policy.device)
        self.sessions[session.id] = (session, ws)
        self.sessions_opened += 1
        log.info("session %d opened from %s", session.id, ws.remote_address)
        prev_total_ms = None
        try:
            await ws.send(packb(self.metadata(session)))
            while not self._stopping:
                try:
                    message = await asyncio.wait_for(ws.recv(), self.config.idle_timeout_s)
                except TimeoutError:
                    log.info("session %d idle for %ss: closed", session.id,
                             self.config.idle_timeout_s)
                    await ws.close(1000, "idle timeout")
                    break
                t0 = time.monotonic()
                self._busy.add(session.id)
                try:
                    reply = await self._answer(session, message, prev_total_ms)
                    await ws.send(reply)
                finally:
                    self._busy.discard(session.id)
                prev_total_ms = 1e3 * (time.monotonic() - t0)
                session.touch()
        except ConnectionClosed:
            pass
        finally:
            self.sessions.pop(session.id, None)
            log.info("session %d closed", session.id)

    async def _answer(self, session: Session, message, prev_total_ms: float | None):
        """The reply to one message: msgpack bytes, or a text frame for an error."""
        t0 = time.monotonic()
        try:
            if isinstance(message, str):
                raise ProtocolError("message: expected a binary msgpack frame, got a text "
                                    "frame")
            msg = unpackb(message, self.config.max_message_bytes)
            if isinstance(msg, dict) and "reset" in msg:
                return packb(self._reset(session, msg))
            obs = self.spec.to_batch(msg)
            reply = await self.batcher.submit(session, obs, self.config.mode)
        except ValueError as e:
            log.info("session %d: bad request: %s", session.id, e)
            return f"error: {e}"
        except Exception as e:  # noqa: BLE001 - the server keeps serving
            log.error("session %d: %s", session.id, traceback.format_exc())
            return f"error: internal server error ({type(e).__name__}: {e})"
        timing = {"infer_ms": reply.infer_ms, "wait_ms": reply.wait_ms,
                  "total_ms": 1e3 * (time.monotonic() - t0), "batch_size": reply.batch_size}
        if prev_total_ms is not None:
            timing["prev_total_ms"] = prev_total_ms
        return packb({"actions": reply.actions, "predicted": reply.predicted,
                      "step": session.step - 1, "server_timing": timing})

    @staticmethod
    def _reset(session: Session, msg: dict) -> dict:
        seed = msg.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2**63):
            raise ValueError(f"seed: expected an integer in [0, 2**63) or none, got {seed!r}")
        seed = session.new_episode(seed)
        return {"reset": True, "seed": seed, "episode": session.episodes}

    # -- running ----------------------------------------------------------------------------
    async def serve(self, on_ready=None) -> None:
        """Serve until :meth:`stop`; ``on_ready(port)`` is called once listening."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        cfg = self.config
        self.batcher = Batcher(self.engine, cfg.batch_wait_ms / 1e3, cfg.max_batch,
                               open_sessions=lambda: len(self.sessions))
        batching = asyncio.create_task(self.batcher.run())
        try:
            async with serve(self._handler, cfg.host, cfg.port, compression=None,
                             max_size=2 * cfg.max_message_bytes,
                             process_request=self._process_request) as server:
                self.port = server.sockets[0].getsockname()[1]
                log.info("serving on ws://%s:%d", cfg.host, self.port)
                if on_ready is not None:
                    on_ready(self.port)
                await self._stop.wait()
                await self._drain(server)
        finally:
            self.batcher.close()
            await batching
            self.batcher.shutdown()

    async def _drain(self, server) -> None:
        """Stop accepting, answer what is in flight, close every connection."""
        self._stopping = True
        server.close(close_connections=False)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.batcher.drain()
        closing = [ws.close(1001, "server shutting down") for _, ws in self.sessions.values()]
        await asyncio.gather(*closing, return_exceptions=True)
        await server.wait_closed()
        log.info("stopped: %d sessions served", self.sessions_opened)

    def stop(self) -> None:
        """Ask the server to drain and return (from any thread)."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: stopped
                self._loop.call_soon_threadsafe(self._stop.set)


def serve_forever(policy, config: ServeConfig, on_ready=None) -> None:
    """Serve in this thread until SIGTERM or SIGINT, then drain and return."""
    server = PolicyServer(policy, config)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.serve(on_ready)

    asyncio.run(main())


class ServerThread:
    """A :class:`PolicyServer` in a background thread (tests, the benchmark, notebooks):
    ``with ServerThread(policy, ServeConfig(port=0)) as s: ... s.port``."""

    def __init__(self, policy, config: ServeConfig | None = None):
        self.server = PolicyServer(policy, config)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="memvla-serve", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def _main(self) -> None:
        try:
            asyncio.run(self.server.serve(lambda port: self._ready.set()))
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the policy server did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.stop()
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
