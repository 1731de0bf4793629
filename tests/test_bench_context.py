"""memvla bench context: what each temporal-context kind costs (prefix tokens, carried
state, chunk latency along an episode); bad arguments are refused before any timing."""

import json

import pytest

from memvla.bench.context import KINDS, episode_cost
from memvla.cli import main


def test_bench_context_reports_every_kind(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["bench", "context", "--steps", "24", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["kinds"]
    assert set(res) == set(KINDS)
    at = {k: r["at"]["10"] for k, r in res.items()}
    none = at["none"]["prefix_tokens"]
    tokens = 16  # tiny: 64×64 images, patch 8, pixel shuffle 2 -> 4×4 tokens per image
    assert at["frames"]["prefix_tokens"] == none + 6 * tokens  # 6 past frames
    assert at["frames-pooled"]["prefix_tokens"] == none + 6 * 4  # pooled 4×4 -> 2×2
    assert at["frames-mem"]["prefix_tokens"] == none  # the prefix does not grow
    assert at["memory_tokens"]["prefix_tokens"] == none + 4
    assert at["none"]["state_bytes"] == 0
    assert at["memory_tokens"]["state_bytes"] == 4 * 64 * 4  # M × D float32
    assert at["frames"]["state_bytes"] == 60 * 64 * 64 * 3 + 8  # a ring of 6 × 10 uint8 frames
    # at step 10 (the second chunk) the fast cache holds the first turn
    assert at["slow_fast"]["attended_keys"] == 2 * none
    assert "ms@10" in capsys.readouterr().out


def test_full_history_stops_at_its_state_limit():
    r = episode_cost("full-history", 200, max_state_mb=0.05)
    assert r["stopped_at"] is not None and r["steps"] == r["stopped_at"] < 200


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], r"--steps must be >= 1, got 0"),
    (["--kinds", "none,tape"], r"--kinds: expected names among none, memory_tokens"),
])
def test_bad_arguments_are_refused_before_timing(flags, message, capsys):
    assert main(["bench", "context", *flags]) == 2
    assert message.split(",")[0].replace("\\", "") in capsys.readouterr().err
