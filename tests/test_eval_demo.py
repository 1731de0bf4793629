"""memvla eval and memvla demo: the expert through the evaluation path, reproducible
evaluations, mismatch errors, the Wilson interval, and the demo end to end (reduced)."""

import json

import numpy as np
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
    """An untrained tiny flow policy: its actions are mostly its noise, so its episodes
    differ (some touch the right disc, some a wrong one, some run out of steps)."""
    policy = make_policy(get_preset("tiny", ["model.num_steps=2"]))
    policy.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_two_evaluations_of_a_checkpoint_agree(tmp_path):
    ckpt = _tiny_policy(tmp_path)
    for out in ("a", "b"):
        assert main(["eval", "--checkpoint", str(ckpt), "--task", "reach-color", "--episodes",
                     "8", "--batch", "3", "--out", str(tmp_path / out), "--record", "1",
                     "--device", "cpu", "--no-progress"]) == 0
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    b = json.loads((tmp_path / "b" / "eval.json").read_text())
    episodes = a["per_episode"]
    assert [e["seed"] for e in episodes] == list(range(8))
    outcomes = {e["success"] for e in episodes}
    assert outcomes == {True, False}  # the episodes differ: agreement means something
    assert len({e["length"] for e in episodes}) > 2
    assert episodes == b["per_episode"]
    for key in ("success_rate", "ci95", "mean_episode_length", "episodes", "task_options"):
        assert a[key] == b[key]
    assert a["successes"] == sum(e["success"] for e in episodes)
    assert a["mean_episode_length"] == pytest.approx(np.mean([e["length"] for e in episodes]))
    assert a["device"] == "cpu" and a["policy"] == str(ckpt)
    assert set(a["chunk_latency_ms"]) == {"p50", "p90", "p99"}
    assert 0 < a["step_latency_ms"] < a["chunk_latency_ms"]["p50"]
    assert (tmp_path / "a" / "rollout_00.gif").stat().st_size > 0


def test_episode_outcomes_do_not_depend_on_the_batch_nor_the_global_rng():
    """Each episode draws its noise from its own generator: the same outcomes and actions
    whether it runs alone or beside others, whatever the global RNG, which stays as it
    was."""
    policy = make_policy(get_preset("tiny", ["model.num_steps=2"])).eval()
    runs = []
    for batch, global_seed in ((1, 1), (4, 2)):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        res, recs = evaluate("reach-color", 6, policy, batch=batch, seed=3, record=6,
                             progress=False)
        assert torch.equal(torch.get_rng_state(), before)  # untouched
        runs.append((res, recs))
    (one, recs_one), (four, recs_four) = runs
    assert one["per_episode"] == four["per_episode"]
    assert {e["success"] for e in one["per_episode"]} == {True, False}
    for a, b in zip(recs_one, recs_four, strict=True):
        assert a["seed"] == b["seed"] and len(a["actions"]) == len(b["actions"])
        np.testing.assert_allclose(np.stack(a["actions"]), np.stack(b["actions"]), atol=1e-5)
        np.testing.assert_array_equal(np.stack(a["frames"]), np.stack(b["frames"]))


def test_a_timed_out_episode_is_a_failure(tmp_path):
    """The expert needs more than 5 steps: every episode runs out of steps (truncated,
    never terminated) and counts as a failure; with the default limit it succeeds."""
    for limit, expected in ((5, False), (None, True)):
        opts = [] if limit is None else ["--opt", f"max_episode_steps={limit}"]
        out = tmp_path / str(limit)
        assert main(["eval", "--policy", "expert", "--task", "remember-color", "--episodes",
                     "3", "--out", str(out), "--record", "0", "--no-progress", *opts]) == 0
        res = json.loads((out / "eval.json").read_text())
        assert [e["success"] for e in res["per_episode"]] == [expected] * 3
        assert res["successes"] == (3 if expected else 0)
        outcome = "success" if expected else "timeout"
        assert [e["outcome"] for e in res["per_episode"]] == [outcome] * 3
        assert res["outcomes"] == {"success": 0, "failed": 0, "timeout": 0, outcome: 3}
        if limit is not None:
            assert [e["length"] for e in res["per_episode"]] == [limit] * 3


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
    err = capsys.readouterr().err
    assert "a memvla checkpoint?" in err and "nor is it a training run" in err
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
    """What the demo must produce: the data of the task and of its twin, every variant
    trained on its data for the budget and evaluated on the same seeds as the expert (the
    ceiling: 100%), the plots, the rollouts, and a report with a row per variant."""
    from memvla.data.lerobot_v3 import read_info

    torch.manual_seed(0)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["variants"]}
    assert list(rows) == ["plain", "memory-bptt", "frames-3x8", "slow-fast", "plain-twin"]
    # data: the task and its memoryless twin, 12 expert episodes each
    for name, twin in (("remember-color", False), ("remember-color-twin", True)):
        info = read_info(out / "data" / name)
        assert info["total_episodes"] == 12 == results["datasets"][name]["episodes"]
        assert info["memvla"]["options"]["memoryless"] is twin
    # every variant: trained for the budget on its data, evaluated on the same 4 seeds
    seeds = [10_000 + i for i in range(4)]
    expert = results["expert"]
    assert [e["seed"] for e in expert["per_episode"]] == seeds
    assert expert["success_rate"] == 1.0 and all(e["success"] for e in expert["per_episode"])
    assert results["chance_level"] == pytest.approx(1 / 3)
    report = (out / "report.md").read_text()
    for name, r in rows.items():
        e = r["eval"]
        run = json.loads((out / r["run"] / "run.json").read_text())
        assert run["dataset"].endswith("remember-color-twin" if r["twin"] else "remember-color")
        assert r["train_steps"] == 3 and (out / r["run"] / "metrics.jsonl").read_text()
        assert [x["seed"] for x in e["per_episode"]] == seeds and e["episodes"] == 4
        assert e["task_options"] == {**expert["task_options"], "memoryless": r["twin"]}
        assert e["successes"] == sum(x["success"] for x in e["per_episode"])
        assert e["device"] == "cpu" and e["chunk_latency_ms"]["p50"] > e["step_latency_ms"] > 0
        assert len(e["videos"]) == 2 and all((out / v).stat().st_size > 0 for v in e["videos"])
        assert (f"| {name} | {r['label']} | {e['success_rate']:.1%} | "
                f"{e['ci95'][0]:.1%}–{e['ci95'][1]:.1%} | {e['chunk_latency_ms']['p50']:.2f} | "
                f"{e['step_latency_ms']:.2f} | {r['parameters']:,} |") in report
    assert "| expert | scripted | 100.0% |" in report
    assert "| chance | 1 / colours | 33.3% |" in report
    assert "chunk ms: one policy call that predicts an action chunk for 4 environments" in report
    for png in ("training_curves.png", "success.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in report
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
    assert list(rows) == ["flow", "flow-pruned", "flow-released", "oft", "oft-pruned",
                          "oft-released"]
    run = {n: json.loads((tmp_path / "sweep" / "runs" / n / "run.json").read_text())
           for n in rows}
    assert run["oft"]["preset"] == "tiny-oft"
    pruner = {n: r["policy"]["model"]["pruner"] for n, r in run.items()}
    assert pruner["flow-pruned"]["center"] and pruner["flow-pruned"]["duplicates"] == "drop"
    assert not pruner["oft-released"]["center"]
    assert pruner["oft-released"]["duplicates"] == "keep"
    for name, r in rows.items():
        kept = r["eval"].get("pruner_kept")
        assert (kept is not None) == name.endswith(("pruned", "released"))
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


def test_demo_overrides_reach_their_variants_and_bad_ones_fail_first(tmp_path, capsys):
    from memvla.demo import DemoSettings, _variant, variant_overrides

    s = DemoSettings(overrides=["policy.context.frame_stride=4", "train.lr=1e-3"])
    _, frames = variant_overrides(s, _variant("frames-3x8"))
    _, plain = variant_overrides(s, _variant("plain"))
    assert frames[-2:] == ["policy.context.frame_stride=4", "train.lr=1e-3"]  # they win
    assert "train.lr=1e-3" in plain
    assert not any(o.startswith("policy.context.") for o in plain)  # not of its kind
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress",
                 "--set", "policy.model.chunk_size=0"]) == 2
    assert "variant plain: " in capsys.readouterr().err and not out.exists()


def test_demo_variants_named_or_added_to_the_defaults():
    from memvla.demo import DEMO_VARIANTS, variant_names

    assert variant_names("plain, memory-bptt") == ["plain", "memory-bptt"]
    assert variant_names("+mamba,+plain") == [*DEMO_VARIANTS, "mamba"]
    with pytest.raises(ValueError, match="'\\+name'"):
        variant_names("plain,+mamba")


@pytest.mark.parametrize("terminated,truncated,success,outcome", [
    (True, False, True, "success"), (True, False, False, "failed"),
    (False, True, False, "timeout"), (True, True, False, "failed")])
def test_an_episode_ends_in_one_named_outcome(terminated, truncated, success, outcome):
    """Terminated without success is a failure of the task (e.g. the wrong cup touched);
    truncated is the step limit; the summary counts each."""
    from memvla.evaluate import Wave, _step, summarize

    class Env:
        def step(self, action):
            return {}, 0.0, terminated, truncated, {"is_success": success}

    wave = Wave.start([{"task": "t", "observation.images.top": None}], [0], record=0)
    assert _step(Env(), np.zeros(2), 0, [{}], wave, None) is False
    assert wave.episodes[0]["outcome"] == outcome
    assert summarize([wave])["outcomes"] == {"success": 0, "failed": 0, "timeout": 0,
                                             outcome: 1}
