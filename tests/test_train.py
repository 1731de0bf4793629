"""memvla train: exact resume, SIGTERM checkpoint, 2-process DDP on CPU, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from memvla.cli import main
from memvla.policies import load_policy
from memvla.training.loop import read_run_config
from memvla.training.state import last_checkpoint

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from memvla.data.lerobot_v3 import LeRobotV3Writer

    root = tmp_path_factory.mktemp("ds") / "synthetic"
    rng = np.random.default_rng(0)
    w = LeRobotV3Writer(root, fps=10)
    for _ in range(12):
        t = int(rng.integers(10, 16))
        w.add_episode({
            "observation.images.top": rng.integers(0, 255, (t, 64, 64, 3), dtype=np.uint8),
            "observation.state": rng.normal(size=(t, 3)).astype(np.float32),
            "action": rng.normal(size=(t, 3)).astype(np.float32)}, task="touch the red ball")
    w.finalize()
    return root


def summary(run: Path) -> dict:
    return json.loads((run / "last_summary.json").read_text())


ARGS = ["--no-progress", "train.batch_size=4", "train.num_workers=0"]


def test_stop_and_resume_equals_straight_run(dataset, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    base = ["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "4"]
    assert main([*base, "--out", str(straight), *ARGS]) == 0
    assert main([*base, "--out", str(split), "--stop-at", "2", *ARGS]) == 0
    assert summary(split)["step"] == 2
    assert main(["train", "--resume", str(split), "--no-progress"]) == 0
    a, b = summary(straight), summary(split)
    assert b["start_step"] == 2 and b["step"] == 4
    assert a["losses"][2:] == b["losses"]
    pa = load_policy(last_checkpoint(straight)).state_dict()
    pb = load_policy(last_checkpoint(split)).state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # the run's metrics hold every step's loss once
    lines = (split / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(set(steps))


def test_resume_with_a_different_config_is_refused(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "2",
                 "--out", str(run), *ARGS]) == 0
    assert main(["train", "--resume", str(run), "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "train.lr: run has 0.001, asked 0.5" in err
    # a run directory is never overwritten unless asked
    assert main(["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "2",
                 "--out", str(run), *ARGS]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "2",
                 "--out", str(run), "--overwrite", *ARGS]) == 0


def test_not_a_dataset_and_bad_overrides(tmp_path, dataset, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--preset", "tiny", "--dataset", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "info.json" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--dataset", str(dataset),
                 "--out", str(tmp_path / "r2"), "train.lrr=3"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err
    assert main(["train", "--preset", "tinyy", "--dataset", str(dataset),
                 "--out", str(tmp_path / "r3")]) == 2
    assert "Did you mean 'tiny'" in capsys.readouterr().err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "memvla.cli", *args]


def test_sigterm_leaves_a_loadable_checkpoint(dataset, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("train", "--preset", "tiny", "--dataset", str(dataset),
                                 "--steps", "100000", "--out", str(run), *ARGS,
                                 "train.save_every=100000", "train.log_every=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "interrupted (SIGTERM)" in out
    ckpt = last_checkpoint(run)
    policy = load_policy(ckpt)
    assert policy.config == read_run_config(run).policy
    state = json.loads((ckpt / "training_state.json").read_text())
    assert 0 < state["step"] < 100000


def test_two_process_ddp_on_cpu_ends_with_identical_parameters(dataset, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29531", "-m", "memvla.cli", "train", "--preset", "tiny",
           "--dataset", str(dataset), "--steps", "3", "--out", str(run), *ARGS]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    s = summary(run)
    assert s["world_size"] == 2 and s["step"] == 3
    assert len(s["param_digests"]) == 2 and s["param_digests"][0] == s["param_digests"][1]
    assert load_policy(last_checkpoint(run)).config == read_run_config(run).policy
