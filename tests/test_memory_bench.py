"""The memory bench's measures on untrained tiny memory policies (cue sensitivity, drift
against the trained delay, the long-episode bench) and its command-line settings."""

import argparse
import re

import pytest
import torch
from helpers import narrow_config

from memvla.policies import make_policy

CUE_OPTIONS = {"image_size": 32, "delay": 3, "palette_size": 3, "layout": "fixed"}


def _cue_policy():
    """An untrained tiny memory policy at remember-color's 32 px."""
    torch.manual_seed(0)
    return make_policy(narrow_config("tiny", extra=[
        "context.kind=memory_tokens", "context.num_tokens=3", "model.num_steps=1",
        "model.vision.image_size=32", "image_shape=[3,32,32]"])).eval()


def test_cue_sensitivity_sees_a_memory_that_depends_on_the_cue():
    from memvla.bench.memory import cue_sensitivity

    opts, policy = CUE_OPTIONS, _cue_policy()
    res = cue_sensitivity(policy, opts, episodes=2)
    assert res["after_cue"] > 1e-3  # untrained: the written memory reads the whole image
    # a memory that ignores its input (what training drove it to in our runs) reads ~0
    with torch.no_grad():
        for p in policy.model.vlm_with_expert.text_model.layers.parameters():
            p.zero_()
    assert cue_sensitivity(policy, opts, episodes=2)["after_cue"] < 1e-6
    with pytest.raises(ValueError, match="needs a memory policy"):
        cue_sensitivity(make_policy(narrow_config("tiny", extra=[
            "model.num_steps=1", "model.vision.image_size=32", "image_shape=[3,32,32]"])), opts)


def test_memory_drift_measures_against_the_trained_delay():
    from memvla.bench.memory import memory_drift

    opts, policy = CUE_OPTIONS, _cue_policy()
    same, longer = memory_drift(policy, opts, [3, 12], episodes=1)
    assert same["own"] == 0.0 and same["other"] > 1e-3  # its own reference, bit for bit
    assert longer["own"] > 1e-3 and 0.0 <= longer["decoded"] <= 1.0
    # a memory that ignores its input is the same for every cue: only ties, 1 in 3 decoded
    with torch.no_grad():
        for p in policy.model.vlm_with_expert.text_model.layers.parameters():
            p.zero_()
    (flat,) = memory_drift(policy, opts, [12], episodes=1)
    assert flat["own"] < 1e-6 and flat["decoded"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="delays must be integers >= 0, got -1"):
        memory_drift(policy, opts, [-1])


def test_memory_bench_drift_needs_a_checkpoint_and_delays():
    from memvla.bench.memory import add_arguments, drift_report

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="--drift needs --checkpoint"):
        drift_report(parser.parse_args(["--drift", "90"]), "cpu")
    with pytest.raises(ValueError, match="comma-separated delays.*'ninety'"):
        drift_report(parser.parse_args(["--drift", "ninety", "--checkpoint", "x"]), "cpu")


def test_long_episode_bench_reports_paired_latency_and_the_norm_bound():
    from memvla.bench.memory import long_episode

    res = long_episode(steps=48, repeats=2)  # default write: clip at max_rms 16
    assert res["chunk_every"] == 8 and res["paired_ratio"] > 0
    assert res["norm_bound"] == pytest.approx(16.0 * 64 ** 0.5)
    assert 0 < res["max_norm"] <= res["norm_bound"] * 1.001
    res = long_episode(steps=48, repeats=2, overrides=("context.write=norm",))
    assert res["norm_bound"] == pytest.approx(8.0)  # final-norm weight 1 at init: RMS 1
    assert res["max_norm"] <= 8.0 * 1.001
    assert abs(res["norm_ratio"] - 1.0) < 1e-3


@pytest.mark.parametrize(("flags", "message"), [
    (["--min-swaps", "4"], r"--min-swaps must be in \[0, --swaps=3\], got 4"),
    (["--delay", "10", "--min-delay", "12"], r"--min-delay must be in \[0, --delay=10\], got 12"),
])
def test_bench_memory_rejects_bad_training_ranges_before_timing(flags, message, capsys):
    from memvla.cli import main

    assert main(["bench", "memory", "--success", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_bench_memory_sweep_settings_from_the_command_line():
    from memvla.bench.memory import add_arguments, sweep_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--min-delay", "10", "--opt", "cue_steps=2",
                              "--set", "policy.context.write=norm"])
    rc = sweep_settings(args, "remember-color")
    assert rc.task_options(False)["delay"] == 30 and rc.task_options(False)["cue_steps"] == 2
    assert rc.task_options(False, data=True)["delay"] == 10
    assert rc.task_options(False, data=True)["max_delay"] == 30
    assert rc.task_options(False, longer=True)["delay"] == 90
    assert rc.overrides == ["policy.context.write=norm"]
    sg = sweep_settings(args, "shell-game")
    assert sg.task_options(True)["n_swaps"] == 3 and sg.task_options(True)["memoryless"]
    assert (sg.task_options(False, data=True)["n_swaps"],
            sg.task_options(False, data=True)["max_swaps"]) == (0, 3)
    assert sg.task_options(False, longer=True)["n_swaps"] == 9
    assert "max_swaps" not in sg.task_options(False, longer=True)
    default = sweep_settings(parser.parse_args([]), "remember-color")  # delays 0..30
    assert default.data_options == {"delay": 0, "max_delay": 30}
    # a memory option reaches the memory variants only (a plain config has no such option)
    from memvla.demo import for_context

    sweep = ["policy.context.write=norm", "train.lr=1e-3"]
    assert for_context(sweep, ["policy.context.kind=memory_tokens"]) == sweep
    assert for_context(sweep, []) == ["train.lr=1e-3"]
