"""``--device`` of memvla eval, demo and bench core / memory / pruning: the argument reaches
the policies and their inputs, and a device this machine cannot use is a clear error
before any work. (CI has no GPU: the plumbing is checked on the CPU.)"""

from __future__ import annotations

import json

import pytest
import torch

from memvla.cli import main

COMMANDS = {
    "eval": ["eval", "--policy", "expert", "--task", "reach-color", "--episodes", "1"],
    "demo": ["demo", "--quick", "--no-progress"],
    "bench core": ["bench", "core", "--presets", "tiny"],
    "bench memory": ["bench", "memory"],
    "bench pruning": ["bench", "pruning"],
}


def _out(name: str, tmp_path) -> list[str]:
    return ["--out", str(tmp_path / "out")] if name in ("eval", "demo") else []


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_unknown_device_is_a_clear_error(name, tmp_path, capsys):
    assert main([*COMMANDS[name], *_out(name, tmp_path), "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "device: expected" in err and "cuda" in err and "got 'tpu'" in err
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", list(COMMANDS))
def test_cuda_without_cuda_is_a_clear_error(name, tmp_path, capsys):
    """The argument is not dropped on the way: asking for CUDA where there is none fails."""
    assert main([*COMMANDS[name], *_out(name, tmp_path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_loads_the_policy_on_the_device_it_is_given(tmp_path, monkeypatch):
    import memvla.policies as policies
    from memvla.presets import get_preset

    policies.make_policy(get_preset("tiny", ["model.num_steps=1"])).save_pretrained(
        tmp_path / "ckpt")
    asked = []
    real = policies.load_policy

    def spy(path, device=None, overrides=None):
        asked.append(device)
        return real(path, device=device, overrides=overrides)

    monkeypatch.setattr(policies, "load_policy", spy)
    for flags, expected in ((["--device", "cpu"], torch.device("cpu")),
                            ([], policies.policy_device(None))):
        out = tmp_path / f"out{len(asked)}"
        assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--task", "reach-color",
                     "--episodes", "1", "--record", "0", "--out", str(out), "--no-progress",
                     *flags]) == 0
        assert asked[-1] == expected
        assert json.loads((out / "eval.json").read_text())["device"] == str(expected)


def test_bench_core_runs_on_the_device_it_is_given(tmp_path):
    path = tmp_path / "core.json"
    assert main(["bench", "core", "--presets", "tiny", "--repeats", "1", "--uncached-repeats",
                 "1", "--warmup", "0", "--device", "cpu", "--json", str(path)]) == 0
    figures = json.loads(path.read_text())
    assert figures["device"] == "cpu" and figures["presets"]["tiny"]["timings"]["chunk"]


def test_bench_memory_runs_on_the_device_it_is_given():
    from memvla.bench.memory import latency_cost, long_episode

    assert latency_cost("tiny", [], 1, device="cpu")["device"] == "cpu"
    assert long_episode(16, repeats=1, device="cpu")["device"] == "cpu"


def test_training_takes_its_device_from_the_config_and_the_demo_passes_its_own():
    from memvla.demo import train_device
    from memvla.training import loop
    from memvla.training.config import TrainConfig

    assert [train_device(d) for d in (None, "cpu")] == ["auto", "cpu"]
    assert loop._on_cpu("cpu") and loop._mixed_precision("auto", "cpu") == "no"
    with pytest.raises(ValueError, match=r"train.device must be one of \('auto', 'cpu', "
                       r"'cuda'\), got 'tpu'"):
        TrainConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device is 'cuda' but CUDA is not"):
            loop._on_cpu("cuda")
