"""The policy server (memvla.serving), its client and ``memvla eval --server``.

Policies are the ``tiny`` preset with random weights; servers run in a background thread
on a free port (port 0) and are always stopped; one test runs ``memvla serve`` as a
process to check SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
import torch

# openpi's own client (the README's test command installs it with --no-deps: it pins numpy<2)
from openpi_client import msgpack_numpy as openpi_msgpack
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from memvla.client import AsyncActor, PolicyClient, ServerError, merge_chunks
from memvla.policies import make_policy
from memvla.presets import get_preset
from memvla.serving import ServeConfig, ServerThread
from memvla.serving.observation import parse_keymap
from memvla.serving.protocol import ProtocolError, packb, unpackb

TASKS = ("touch the red ball", "remember the colour and touch it later")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The server's policy thread, its clients and other jobs share a small CPU: torch's
    intra-op threads spinning against them make these tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _policy(*overrides: str):
    torch.manual_seed(0)
    return make_policy(get_preset("tiny", ["model.num_steps=2", *overrides])).eval()


@pytest.fixture(scope="module")
def memory_policy():
    """Recurrent memory tokens, a chunk every 2 steps: the state matters within steps."""
    return _policy("context.kind=memory_tokens", "n_action_steps=2")


def _obs(session: int, step: int) -> dict:
    r = np.random.default_rng(1000 * session + step)
    return {"observation.images.top": r.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "observation.state": r.standard_normal(3).astype(np.float32),
            "task": TASKS[session % 2]}


def _episode(client, session: int, steps: int, seed: int) -> list[np.ndarray]:
    client.reset(seed=seed)
    return [client.infer(_obs(session, t))["actions"] for t in range(steps)]


def _alone(policy, sessions, steps: int) -> dict[int, list[np.ndarray]]:
    with ServerThread(policy, ServeConfig(port=0)) as s:
        out = {}
        for k in sessions:
            with PolicyClient("127.0.0.1", s.port) as c:
                out[k] = _episode(c, k, steps, seed=k)
        return out


def _close(a: list[np.ndarray], b: list[np.ndarray], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.abs(x - y).max() <= tol
                                    for x, y in zip(a, b, strict=True))


# -- the wire format ---------------------------------------------------------------------------
def test_protocol_round_trip_matches_openpi():
    msg = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2, 2), np.uint8),
           "c": np.array([True, False]), "d": np.int64(7), "e": np.float32(0.5),
           "t": "pick it up", "n": [1, 2.5, None], "empty": np.zeros((0, 3), np.int16)}
    out = unpackb(packb(msg))
    for k in ("a", "b", "c", "empty"):
        assert out[k].dtype == msg[k].dtype and np.array_equal(out[k], msg[k])
        assert out[k].flags.writeable
    assert out["d"] == 7 and out["d"].dtype == np.int64 and out["e"].dtype == np.float32
    assert out["t"] == "pick it up" and out["n"] == [1, 2.5, None]
    # byte for byte what openpi sends, both ways
    assert packb(msg) == openpi_msgpack.packb(msg)
    back = openpi_msgpack.unpackb(packb(msg))
    assert np.array_equal(back["a"], msg["a"]) and back["d"] == 7
    assert np.array_equal(unpackb(openpi_msgpack.packb(msg))["b"], msg["b"])


def _raw_array(dtype: str, data: bytes, shape) -> bytes:
    return msgpack.packb({"x": {b"__ndarray__": True, b"data": data, b"dtype": dtype,
                                b"shape": shape}}, use_bin_type=True)


def test_protocol_refuses_pickle_object_dtypes_and_bad_sizes():
    import pickle

    with pytest.raises(ProtocolError, match="dtype"):
        packb({"x": np.array([object()], dtype=object)})
    evil = pickle.dumps(["would run on load"])
    for dtype in ("|O", "O", "|V8", "i4,f4", "<c8", "<M8[s]"):
        with pytest.raises(ProtocolError, match="dtype"):
            unpackb(_raw_array(dtype, evil, [1]))
    with pytest.raises(ProtocolError, match="expected 24 bytes of data, got 20"):
        unpackb(_raw_array("<f4", b"\0" * 20, [2, 3]))
    with pytest.raises(ProtocolError, match="shape"):
        unpackb(_raw_array("<f4", b"", [-1]))
    with pytest.raises(ProtocolError, match="missing field 'shape'"):
        unpackb(msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "<f4"}))
    with pytest.raises(ProtocolError, match="extension type"):
        unpackb(msgpack.packb(msgpack.ExtType(5, evil)))
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        unpackb(b"\xc1")
    with pytest.raises(ProtocolError, match="over the limit"):
        unpackb(packb({"x": np.zeros(100, np.uint8)}), max_bytes=50)
    # msgpack-numpy's own (pickling) format is not an array here: it stays a plain map
    other = msgpack.packb({b"nd": True, b"type": "|O", b"kind": b"O", b"data": evil})
    assert isinstance(unpackb(other), dict)


# -- openpi's client, health, authentication ----------------------------------------------------
def test_openpi_client_gets_actions_and_errors(memory_policy):
    cfg = ServeConfig(port=0, keymap=parse_keymap(["image=observation.images.top",
                                                   "prompt=task"]))
    with ServerThread(memory_policy, cfg) as s:
        client = WebsocketClientPolicy("127.0.0.1", s.port)
        meta = client.get_server_metadata()
        assert meta["server"] == "memvla" and meta["n_action_steps"] == 2
        assert meta["context"] == "memory_tokens" and meta["mode"] == "step"
        obs = _obs(0, 0)
        robot = {"image": obs["observation.images.top"],
                 "observation.state": obs["observation.state"], "prompt": obs["task"]}
        first = client.infer(robot)
        assert first["actions"].shape == (2, 3) and first["actions"].dtype == np.float32
        assert first["predicted"] and {"infer_ms", "batch_size"} <= set(first["server_timing"])
        second = client.infer(robot)  # the queued second action of the chunk, then its end
        assert not second["predicted"] and np.array_equal(second["actions"],
                                                          first["actions"][1:])
        with pytest.raises(RuntimeError, match="observation.state.*expected .*\\(3,\\).*"
                           "got float32 array of shape \\(4,\\)"):
            client.infer({**robot, "observation.state": np.zeros(4, np.float32)})
        assert client.infer(robot)["predicted"]  # the same connection keeps working


def test_healthz_and_api_key(memory_policy):
    with ServerThread(memory_policy, ServeConfig(port=0, api_key="sesame")) as s:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/healthz", timeout=10) as r:
            assert r.status == 200 and r.read() == b"OK\n"
        for key in (None, "wrong"):
            with pytest.raises(InvalidStatus) as e:
                WebsocketClientPolicy("127.0.0.1", s.port, api_key=key)
            assert e.value.response.status_code == 401
        ok = WebsocketClientPolicy("127.0.0.1", s.port, api_key="sesame")
        assert ok.infer(_obs(0, 0))["actions"].shape == (2, 3)
        assert s.server.sessions_opened == 1  # the refused connections never became sessions


# -- sessions: isolation, batching, reset ---------------------------------------------------------
def test_sessions_interleaved_keep_their_own_memory(memory_policy):
    steps = 6
    alone = _alone(memory_policy, (0, 1), steps)
    with ServerThread(memory_policy, ServeConfig(port=0)) as s:
        a, b = PolicyClient("127.0.0.1", s.port), PolicyClient("127.0.0.1", s.port)
        a.reset(seed=0)
        b.reset(seed=1)
        got = {0: [], 1: []}
        for t in range(steps):  # strictly interleaved: A, B, A, B, ...
            got[0].append(a.infer(_obs(0, t))["actions"])
            got[1].append(b.infer(_obs(1, t))["actions"])
        # the state matters: session 0's last frames after session 1's history differ
        c = PolicyClient("127.0.0.1", s.port)
        c.reset(seed=0)
        mixed = [c.infer(_obs(1 if t < 4 else 0, t))["actions"] for t in range(steps)]
    assert _close(got[0], alone[0]) and _close(got[1], alone[1])
    assert not np.allclose(mixed[4], alone[0][4], atol=1e-4)


def test_gather_scatter_and_signature():
    from memvla.serving.batcher import gather, scatter, signature

    def tree(seed: int, t: int = 4):
        g = torch.Generator().manual_seed(seed)
        return {"frames": [torch.randn(1, t, 3, generator=g)], "count": torch.tensor([seed]),
                "cache": (torch.randn(1, 2, generator=g), None), "kind": "x"}

    a, b = tree(1), tree(2)
    assert signature(a) == signature(b) != signature(tree(3, t=5))
    both = gather([a, b])
    assert both["frames"][0].shape == (2, 4, 3) and both["count"].tolist() == [1, 2]
    for orig, back in zip((a, b), scatter(both, 2), strict=True):
        assert signature(back) == signature(orig) and back["kind"] == "x"
        assert torch.equal(back["frames"][0], orig["frames"][0])
        assert torch.equal(back["cache"][0], orig["cache"][0]) and back["cache"][1] is None
    with pytest.raises(ValueError, match="leading batch axis of 3"):
        scatter(both, 3)


def test_a_failing_batch_is_retried_session_by_session(memory_policy, monkeypatch):
    from memvla.serving.batcher import Engine, Reply, Request
    from memvla.serving.observation import ObservationSpec
    from memvla.serving.session import Session

    spec = ObservationSpec(memory_policy.config)
    engine = Engine(memory_policy)
    alone = engine.serve([Request(Session(torch.device("cpu"), seed=0),
                                  spec.to_batch(_obs(0, 0)))])[0]
    predict = memory_policy.predict_action_chunk

    def fragile(obs, noise=None):
        if "boom" in obs["task"]:
            raise RuntimeError("boom")
        return predict(obs, noise=noise)

    monkeypatch.setattr(memory_policy, "predict_action_chunk", fragile)
    good = Request(Session(torch.device("cpu"), seed=0), spec.to_batch(_obs(0, 0)))
    bad = Request(Session(torch.device("cpu"), seed=1),
                  spec.to_batch({**_obs(0, 0), "task": "boom"}))
    out = engine.serve([good, bad])
    assert isinstance(out[0], Reply) and isinstance(out[1], RuntimeError)
    np.testing.assert_allclose(out[0].actions, alone.actions, atol=1e-5)  # same noise


@pytest.mark.parametrize("context", ["memory_tokens", "frames"])
def test_batched_equals_alone(context):
    frames = ["context.num_frames=3", "context.frame_stride=1"] if context == "frames" else []
    policy = _policy(f"context.kind={context}", "n_action_steps=2", *frames)
    steps, sessions = 5, (0, 1, 2, 3)
    alone = _alone(policy, sessions, steps)
    together = {}
    with ServerThread(policy, ServeConfig(port=0, batch_wait_ms=200)) as s:
        clients = {k: PolicyClient("127.0.0.1", s.port) for k in sessions}

        def run(k):
            together[k] = _episode(clients[k], k, steps, seed=k)

        threads = [threading.Thread(target=run, args=(k,)) for k in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        sizes = s.server.batcher.batch_sizes
    assert max(sizes) > 1, f"no request was batched: {sizes}"
    for k in sessions:
        assert _close(together[k], alone[k]), f"session {k} differs from serving it alone"


def test_reset_starts_a_new_episode(memory_policy):
    with ServerThread(memory_policy, ServeConfig(port=0)) as s, \
            PolicyClient("127.0.0.1", s.port) as c:
        first = _episode(c, 0, 4, seed=3)
        carried = [c.infer(_obs(0, t))["actions"] for t in range(4)]  # no reset: memory kept
        again = _episode(c, 0, 4, seed=3)
        reply = c.reset(seed=5)
    assert reply["reset"] and reply["seed"] == 5
    assert _close(first, again, tol=0.0)
    assert not _close(first, carried, tol=1e-4)


# -- bad input, limits, idle sessions -----------------------------------------------------------
def test_bad_requests_get_errors_and_the_server_keeps_serving(memory_policy):
    cfg = ServeConfig(port=0, max_message_mb=0.05)  # 52 kB: a 64x64 frame is 12 kB
    good = packb(_obs(0, 0))
    bad = {
        "not valid msgpack": b"\xc1\x00",
        "binary msgpack frame, got a text frame": "hello",
        "over the limit of 52428 bytes": packb({**_obs(0, 0), "x": np.zeros(60_000, np.uint8)}),
        "observation.images.top: expected uint8 \\(H, W, C\\) = \\(64, 64, 3\\).*got uint8 "
        "array of shape \\(32, 32, 3\\)":
            packb({**_obs(0, 0), "observation.images.top": np.zeros((32, 32, 3), np.uint8)}),
        "missing key 'task'": packb({k: v for k, v in _obs(0, 0).items() if k != "task"}),
        "task: expected a string": packb({**_obs(0, 0), "task": 3}),
        "observation.state: expected finite values": packb(
            {**_obs(0, 0), "observation.state": np.array([np.nan, 0, 0], np.float32)}),
        "dtype": _raw_array("|O", b"\x80", [1]),
        "expected a map": packb([1, 2, 3]),
        "seed: expected an integer": packb({"reset": True, "seed": -1}),
    }
    with ServerThread(memory_policy, cfg) as s:
        other = PolicyClient("127.0.0.1", s.port)
        with connect(f"ws://127.0.0.1:{s.port}") as ws:
            ws.recv()  # metadata
            for why, message in bad.items():
                ws.send(message)
                reply = ws.recv(timeout=30)
                assert isinstance(reply, str) and reply.startswith("error:"), why
                assert __import__("re").search(why, reply), (why, reply)
                assert other.infer(_obs(1, 0))["actions"].shape[1] == 3  # others unaffected
            ws.send(good)
            assert unpackb(ws.recv(timeout=30))["actions"].shape == (2, 3)
        # over twice the limit the websocket layer cuts the connection (1009) ...
        with connect(f"ws://127.0.0.1:{s.port}", max_size=None) as ws:
            ws.recv()
            ws.send(b"\0" * (3 * cfg.max_message_bytes))
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=30)
            assert e.value.rcvd is not None and e.value.rcvd.code == 1009
        # ... and the server still accepts and serves
        assert other.infer(_obs(1, 1))["actions"].shape[1] == 3
        assert PolicyClient("127.0.0.1", s.port).infer(_obs(2, 0))["predicted"]
    with ServerThread(memory_policy, ServeConfig(port=0)) as s, \
            pytest.raises(ServerError, match="missing key"):
        PolicyClient("127.0.0.1", s.port).infer({"task": "x"})


def test_idle_timeout_frees_the_session(memory_policy):
    with ServerThread(memory_policy, ServeConfig(port=0, idle_timeout_s=0.3)) as s:
        with connect(f"ws://127.0.0.1:{s.port}") as ws:
            ws.recv()
            ws.send(packb(_obs(0, 0)))
            ws.recv()
            assert len(s.server.sessions) == 1
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=10)
        assert e.value.rcvd.code == 1000 and e.value.rcvd.reason == "idle timeout"
        deadline = time.monotonic() + 5
        while s.server.sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not s.server.sessions


def test_stop_answers_the_request_in_flight(memory_policy):
    with ServerThread(memory_policy, ServeConfig(port=0)) as s:
        serve = s.server.engine.serve

        def slow(requests):
            time.sleep(0.5)
            return serve(requests)

        s.server.engine.serve = slow
        with connect(f"ws://127.0.0.1:{s.port}") as ws:
            ws.recv()
            ws.send(packb(_obs(0, 0)))
            deadline = time.monotonic() + 10
            while not s.server._busy and time.monotonic() < deadline:
                time.sleep(0.005)
            stopper = threading.Thread(target=s.stop)
            stopper.start()
            reply = ws.recv(timeout=30)  # answered although the server is stopping
            assert unpackb(reply)["actions"].shape == (2, 3)
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)
            stopper.join(30)
        assert not stopper.is_alive()


def test_chunk_mode_refuses_frame_history():
    with pytest.raises(ValueError, match="records every frame"):
        ServerThread(_policy("context.kind=frames"), ServeConfig(port=0, mode="chunk"))


# -- the client's asynchronous inference ----------------------------------------------------------
def test_merge_chunks():
    old = np.array([[1.0], [2.0]], np.float32)
    new = np.array([[3.0], [4.0], [5.0]], np.float32)
    assert merge_chunks(old, new, "replace").ravel().tolist() == [3, 4, 5]
    assert merge_chunks(old, new, "average").ravel().tolist() == [2, 3, 5]
    np.testing.assert_allclose(merge_chunks(old, new, "weighted").ravel(), [2.4, 3.4, 5])
    assert merge_chunks(new, old, "average").ravel().tolist() == [2, 3, 5]
    with pytest.raises(ValueError, match="merge"):
        merge_chunks(old, new, "max")


class _StepClient:
    """A chunk-mode server stand-in whose actions are the step they are for (and a delay),
    so that misaligned merging shows in the executed actions."""

    def __init__(self, n: int = 10, delay: float = 0.01):
        self.n, self.delay, self.calls = n, delay, 0

    def get_server_metadata(self) -> dict:
        return {"mode": "chunk", "n_action_steps": self.n}

    def infer(self, obs: dict) -> dict:
        self.calls += 1
        time.sleep(self.delay)
        return {"actions": (obs["t"] + np.arange(self.n, dtype=np.float32))[:, None]}

    def reset(self, seed=None) -> dict:
        return {"reset": True}


@pytest.mark.parametrize("merge", ["replace", "average", "weighted"])
def test_async_actor_requests_ahead_and_aligns_chunks(merge):
    client = _StepClient()
    actor = AsyncActor(client, threshold=0.3, merge=merge)  # ask again at 3 actions left
    executed = []
    for t in range(40):
        executed.append(float(actor.act({"t": t})[0]))
        time.sleep(0.01)  # the robot's step
    actor.close()
    np.testing.assert_allclose(executed, np.arange(40), atol=1e-5)  # aligned merging
    # one request per ~6 steps (10 - 3 left - ~1 in flight), asked ahead: rarely waited for
    assert 40 / 10 < client.calls <= 40 / 4 and actor.starved < 40 / 8
    with pytest.raises(ValueError, match="mode 'chunk'"):
        AsyncActor(type("C", (), {"get_server_metadata": lambda self: {"mode": "step"}})())


def test_async_actor_against_a_chunk_mode_server():
    policy = _policy("context.kind=memory_tokens", "n_action_steps=4")
    with ServerThread(policy, ServeConfig(port=0, mode="chunk")) as s, \
            PolicyClient("127.0.0.1", s.port) as client:
        assert client.infer(_obs(0, 0))["actions"].shape == (4, 3)  # a chunk every request
        assert client.infer(_obs(0, 0))["predicted"]
        actor = AsyncActor(client, threshold=0.5, merge="average")
        actor.reset(seed=0)
        actions = [actor.act(_obs(0, t)) for t in range(12)]
        actor.close()
    assert all(a.shape == (3,) and np.isfinite(a).all() for a in actions)
    assert 12 / 4 <= actor.requests < 12


# -- remote evaluation and the command ------------------------------------------------------
def test_eval_server_matches_local_eval(tmp_path):
    from memvla.evaluate import evaluate
    from memvla.policies import load_policy
    from memvla.serving.remote_eval import remote_evaluate

    _policy("context.kind=memory_tokens").save_pretrained(tmp_path / "ckpt")
    policy = load_policy(tmp_path / "ckpt", device="cpu")
    opts = {"delay": 4}
    local, local_rec = evaluate("remember-color", 3, policy, batch=3, task_options=opts,
                                record=3, progress=False)
    with ServerThread(policy, ServeConfig(port=0)) as s:
        remote, remote_rec = remote_evaluate("remember-color", 3, f"127.0.0.1:{s.port}",
                                             batch=3, task_options=opts, record=3,
                                             progress=False)
    assert remote["success_rate"] == local["success_rate"]
    assert [e["length"] for e in remote["per_episode"]] == [
        e["length"] for e in local["per_episode"]]
    for a, b in zip(local_rec, remote_rec, strict=True):
        np.testing.assert_allclose(np.stack(a["actions"]), np.stack(b["actions"]), atol=1e-4)


def test_serve_command_fails_before_listening_and_drains_on_sigterm(tmp_path):
    from memvla.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--port", "0"]) == 2
    _policy("context.kind=memory_tokens").save_pretrained(tmp_path / "ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "memvla.cli", "serve", "--checkpoint",
                             str(tmp_path / "ckpt"), "--port", "0", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("memvla serve: ws://127.0.0.1:"), (line, proc.stderr.read())
        port = int(line.split()[2].rsplit(":", 1)[1])
        client = PolicyClient("127.0.0.1", port)
        assert client.infer(_obs(0, 0))["actions"].shape == (8, 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(ConnectionClosed) as e:
            client.infer(_obs(0, 1))
        assert e.value.rcvd is None or e.value.rcvd.code == 1001
        with pytest.raises((ConnectionRefusedError, urllib.error.URLError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_policy_writing_while_a_chunk_executes_is_served_as_it_runs_locally():
    from memvla.serving.observation import ObservationSpec
    from memvla.serving.session import Session

    policy = _policy("context.kind=memory_tokens", "n_action_steps=4", "context.observe_every=2")
    steps = 9
    served = _alone(policy, (0,), steps)[0]
    spec, session, m = ObservationSpec(policy.config), Session(torch.device("cpu"), seed=0), \
        policy.config.model
    policy.reset()
    local = []
    for t in range(steps):
        noise = session.draw_noise(m.chunk_size, m.max_action_dim) if (
            policy.queued_actions == 0) else None
        local.append(policy.select_action(spec.to_batch(_obs(0, t)), noise=noise)[0].numpy())
    assert all(np.abs(s[0] - a).max() <= 1e-5 for s, a in zip(served, local, strict=True))
    with pytest.raises(ValueError, match=r"observe_every=2.*serve it in mode 'step'"):
        ServerThread(policy, ServeConfig(port=0, mode="chunk"))
