"""memvla bench context: every temporal-context kind's prefix tokens, carried state and
chunk latency along an episode, through the CLI and the library; bad arguments are refused
before any timing."""

import json
import math

import pytest

from memvla.bench import context as bench
from memvla.cli import main


def test_bench_context_reports_every_kind(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["bench", "context", "--steps", "24", "--repeats", "1", "--warmup", "0",
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["kinds"]) == set(bench.KINDS)
    assert {"torch", "threads"} <= set(figures["torch"])
    for r in figures["kinds"].values():
        assert set(r["at"]) == {"10", "24"}  # step 10 and the episode's last
        assert r["at"]["10"]["window_steps"] == [1, 9, 17]  # every chunk call of 24 steps
        assert r["paired"]["early_step"] == 9 and r["paired"]["late_step"] == 17
        assert r["latency_ratio"] > 0 and r["paired"]["ratio"] > 0
    at = {k: r["at"]["10"] for k, r in figures["kinds"].items()}

    cfg = bench.kind_config("frames")
    c, h, w = cfg.image_shape
    k, per_image = cfg.context.num_frames, cfg.model.tokens_per_image
    none = at["none"]["prefix_tokens"]
    assert at["frames"]["prefix_tokens"] == none + k * per_image
    pooled = (math.isqrt(per_image) // cfg.context.pool_stride) ** 2  # tiny: 4×4 -> 2×2
    assert at["frames-pooled"]["prefix_tokens"] == none + k * pooled
    assert at["frames-mem"]["prefix_tokens"] == none  # the prefix does not grow
    assert at["none"]["state_bytes"] == 0
    ring = k * cfg.context.frame_stride * c * h * w  # uint8 frames, + the int64 count
    for kind in ("frames", "frames-pooled", "frames-mem"):
        assert at[kind]["state_bytes"] == ring + 8
    # the chunk at step 9 attends to the cached first turn as well
    assert at["slow_fast"]["attended_keys"] == 2 * at["slow_fast"]["prefix_tokens"]
    assert "ms@10" in capsys.readouterr().out


def test_memory_tokens_carry_m_by_d_floats():
    cfg = bench.kind_config("memory_tokens")
    m, d = cfg.context.num_tokens, cfg.model.text.width
    r = bench.episode_cost("memory_tokens", 9, repeats=1, warmup=0)
    none = bench.episode_cost("none", 9, repeats=1, warmup=0)
    assert r["at"]["9"]["state_bytes"] == m * d * 4  # float32
    assert r["at"]["9"]["prefix_tokens"] == none["at"]["9"]["prefix_tokens"] + m


@pytest.mark.parametrize("max_mb", [0.5, 0.05])  # 0.05: stops at the first chunk
def test_full_history_stops_at_its_state_limit(max_mb):
    r = bench.episode_cost("full-history", 200, repeats=1, warmup=0, max_state_mb=max_mb)
    assert r["stopped_at"] is not None and r["steps"] == r["stopped_at"] < 200
    assert r["at"][str(r["stopped_at"])]["state_bytes"] > max_mb * 2 ** 20
    assert r["paired"]["early_step"] == min(9, r["stopped_at"])


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--kinds", "none,tape"], "--kinds: expected names among none, memory_tokens"),
    (["--set", "context.num_tokens=8"], "context.num_tokens is an option of"),
    (["--success", "--variants", "plain,tape"], "--variants: expected names among plain"),
    (["--success", "--tasks", "remember-colour"], "--tasks: expected names among"),
])
def test_bad_arguments_are_refused_before_timing(flags, message, capsys, monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("timing started")

    monkeypatch.setattr(bench, "episode_cost", no_timing)
    assert main(["bench", "context", *flags]) == 2
    assert message in capsys.readouterr().err


def test_bench_scaling_reports_every_kind_with_memory_the_scan_and_a_plot(tmp_path):
    out = tmp_path / "s.json"
    assert main(["bench", "scaling", "--steps", "24", "--repeats", "1", "--warmup", "0",
                 "--kinds", "none,memory_tokens,mamba", "--scan-lengths", "16",
                 "--scan-repeats", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["kinds"]) == {"none", "memory_tokens", "mamba"}
    for r in figures["kinds"].values():
        assert r["at"]["24"]["peak_rss_bytes"] >= r["at"]["10"]["peak_rss_bytes"] > 0
    mamba = figures["kinds"]["mamba"]["at"]
    # the Mamba state: a fixed size, and no keys beyond the step's own tokens
    assert mamba["10"]["state_bytes"] == mamba["24"]["state_bytes"] > 0
    assert mamba["24"]["attended_keys"] == mamba["24"]["prefix_tokens"]
    assert [r["length"] for r in figures["scan"]] == [16]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
