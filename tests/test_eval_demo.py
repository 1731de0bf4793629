"""memvla eval and memvla demo: the expert through the evaluation path, reproducible
evaluations, mismatch errors, the Wilson interval, and the demo end to end (reduced)."""

import json

import pytest
import torch

from memvla.cli import main
from memvla.config_utils import apply_overrides
from memvla.evaluate import evaluate, wilson_interval
from memvla.policies import make_policy
from memvla.presets import get_preset


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.9630, abs=1e-4)


def test_expert_through_the_evaluation_path():
    res, _ = evaluate("remember-color", 50, None, batch=10, seed=0, progress=False)
    assert res["success_rate"] >= 0.98
    assert res["chance_level"] == pytest.approx(1 / 3)


def _tiny_policy(tmp_path):
    policy = make_policy(get_preset("tiny", ["model.num_steps=2"]))
    policy.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_two_evaluations_of_a_checkpoint_agree(tmp_path):
    ckpt = _tiny_policy(tmp_path)
    for out in ("a", "b"):
        assert main(["eval", "--checkpoint", str(ckpt), "--task", "reach-color", "--episodes",
                     "4", "--batch", "2", "--out", str(tmp_path / out), "--record", "1",
                     "--no-progress"]) == 0
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    b = json.loads((tmp_path / "b" / "eval.json").read_text())
    for key in ("success_rate", "ci95", "mean_episode_length", "episodes", "task_options"):
        assert a[key] == b[key]
    assert set(a["latency_ms"]) == {"p50", "p90", "p99"}
    assert (tmp_path / "a" / "rollout_00.gif").stat().st_size > 0


def test_checkpoint_that_does_not_fit_the_task(tmp_path, capsys):
    cfg = apply_overrides(get_preset("tiny"), ["state_dim=4"])
    make_policy(cfg).save_pretrained(tmp_path / "ckpt")
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--task", "reach-color",
                 "--episodes", "1", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "state dim: task 3, checkpoint 4" in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_the_task_api(tmp_path):
    cfg = apply_overrides(get_preset("tiny"), ["state_dim=4", "action_dim=2"])
    with pytest.raises(ValueError, match=r"state dim: task 3, checkpoint 4; action dim: "
                       r"task 3, checkpoint 2"):
        evaluate("reach-color", 1, make_policy(cfg), progress=False)


def test_missing_or_corrupt_checkpoint(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--task", "reach-color",
                 "--out", str(tmp_path / "o")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    ckpt = _tiny_policy(tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 10)
    assert main(["eval", "--checkpoint", str(ckpt), "--task", "reach-color",
                 "--out", str(tmp_path / "o")]) == 2
    assert "model.safetensors: corrupt" in capsys.readouterr().err


def test_unknown_task_did_you_mean(tmp_path, capsys):
    assert main(["eval", "--policy", "expert", "--task", "remember-colour", "--out",
                 str(tmp_path / "o")]) == 2
    assert "Did you mean 'remember-color'" in capsys.readouterr().err


def test_demo_reduced_budget_end_to_end(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [r["variant"] for r in results["variants"]]
    assert names == ["plain", "memory-k0", "memory-bptt", "plain-twin"]
    for r in results["variants"]:
        assert 0.0 <= r["eval"]["success_rate"] <= 1.0
        assert r["eval"]["episodes"] == 4 and r["parameters"] > 0
    assert results["expert"]["success_rate"] >= 0.75
    report = (out / "report.md").read_text()
    assert "| memory-bptt |" in report and "chance" in report
    for png in ("training_curves.png", "success.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # never overwritten unless asked
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2


def test_sweep_with_other_variants_both_families_and_pruner_counts(tmp_path):
    """A sweep of benchmark variants (the pruning bench's): both families, with and without
    the pruner, trained on the same data; the pruned ones report their kept counts."""
    from memvla.bench.pruning import success_variants
    from memvla.demo import DemoSettings, run_sweep

    s = DemoSettings.quick()
    s.task, s.overrides = "reach-color", []  # (quick's num_steps override is flow-only)
    res = run_sweep(tmp_path / "sweep", s, progress=False, report=False,
                    variants=success_variants("lightvla"))
    rows = {r["variant"]: r for r in res["variants"]}
    assert list(rows) == ["flow", "flow-pruned", "oft", "oft-pruned"]
    assert json.loads((tmp_path / "sweep" / "runs" / "oft" / "run.json").read_text())[
        "preset"] == "tiny-oft"
    for name, r in rows.items():
        kept = r["eval"].get("pruner_kept")
        assert (kept is not None) == name.endswith("pruned")
        if kept:  # 16 visual tokens per 32×32 image in both families
            assert kept["visual_tokens"] == 16
            assert 1 <= kept["min"] <= kept["mean"] <= kept["max"] <= 16
            assert sum(kept["histogram"]) > 0


def test_sweep_trains_on_varied_episodes_and_evaluates_on_fixed_ones(tmp_path):
    """``data_options`` reach the recorded data only: 0..3 swaps there, 3 in evaluation."""
    from memvla.data.lerobot_v3_read import LeRobotV3Dataset
    from memvla.demo import DemoSettings, run_sweep

    s = DemoSettings.quick()
    s.task, s.episodes, s.variants = "shell-game", 16, ["memory-bptt"]
    s.options = {"n_swaps": 3, "swap_steps": 8}
    s.data_options = {"n_swaps": 0, "max_swaps": 3}
    res = run_sweep(tmp_path / "sweep", s, progress=False, report=False)
    ds = LeRobotV3Dataset(tmp_path / "sweep" / "data" / "shell-game")
    lengths = [b - a for a, b in map(ds.episode_range, range(ds.num_episodes))]
    # with 3 swaps of 8 frames the choice (and its 8 held frames) starts at frame 30
    assert min(lengths) < 30 and max(lengths) > 38
    assert res["variants"][0]["eval"]["episodes"] == 4
    assert res["variants"][0]["eval"]["mean_episode_length"] > 30  # evaluated on 3 swaps
    assert s.task_options(False) == {"image_size": 32, "memoryless": False, "n_swaps": 3,
                                     "swap_steps": 8}
