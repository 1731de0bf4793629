"""memvla train: exact resume (plain, recurrent, pruned, worker processes), metrics once per
step after a crash, checkpoint retention, gradient clipping, warmup, SIGTERM checkpoint,
2-process DDP on CPU, loading a run, no pickle, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from memvla.cli import main
from memvla.policies import load_policy, resolve_checkpoint
from memvla.training.config import TrainConfig
from memvla.training.loop import read_run_config
from memvla.training.schedule import lr_at
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


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# a memory policy that predicts a chunk every 4 of its 8 steps (segments every 4 frames),
# and a pruner whose keys read the previously executed chunk (from the dataset)
RECURRENT = ["policy.context.kind=memory_tokens", "train.bptt_depth=1",
             "policy.n_action_steps=4"]
PRUNED = ["policy.model.pruner.enabled=true", "policy.model.pruner.action_context=prev_chunk"]


FRAMES = ["policy.context.kind=frames", "policy.context.num_frames=2",
          "policy.context.frame_stride=3"]


@pytest.mark.parametrize("extra", [[], RECURRENT, PRUNED, FRAMES, ["train.num_workers=1"]],
                         ids=["plain", "recurrent", "pruned", "frames", "workers"])
def test_stop_and_resume_equals_straight_run(dataset, tmp_path, extra):
    straight, split = tmp_path / "straight", tmp_path / "split"
    base = ["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "4"]
    assert main([*base, "--out", str(straight), *ARGS, *extra]) == 0
    assert main([*base, "--out", str(split), "--stop-at", "2", *ARGS, *extra]) == 0
    assert summary(split)["step"] == 2
    assert main(["train", "--resume", str(split), "--no-progress"]) == 0
    a, b = summary(straight), summary(split)
    assert b["start_step"] == 2 and b["step"] == 4
    assert a["losses"][2:] == b["losses"]
    pa = load_policy(last_checkpoint(straight), device="cpu").state_dict()
    pb = load_policy(last_checkpoint(split), device="cpu").state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # the run's metrics hold every step's loss once
    steps = [m["step"] for m in metrics(split)]
    assert steps == sorted(set(steps))


def test_training_reads_the_previous_chunk_and_cuts_episodes_every_n_action_steps(
        dataset, tmp_path, monkeypatch):
    from memvla.policies import FlowVLAPolicy

    seen = []
    real = FlowVLAPolicy.forward

    def spy(self, batch, *args, **kwargs):
        seen.append(batch)
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(FlowVLAPolicy, "forward", spy)
    run = tmp_path / "pruned"
    base = ["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "3", *ARGS]
    assert main([*base, "--out", str(run), *PRUNED, "policy.n_action_steps=5"]) == 0
    assert seen[0]["prev_action"].shape == (4, 5, 3)
    assert seen[0]["observation.images.top"].dtype == torch.uint8  # converted on the device
    first = load_policy(run / "checkpoints" / "step-000003", device="cpu")
    assert first.model.pruner_key_proj is not None
    torch.manual_seed(0)  # the run's initial weights: the same seed, the same config
    from memvla.policies import make_policy

    init = make_policy(read_run_config(run).policy)
    assert not torch.equal(first.model.pruner_key_proj.weight, init.model.pruner_key_proj.weight)
    seen.clear()
    run = tmp_path / "frames"  # frame history: every camera's past frames from the dataset
    assert main([*base, "--out", str(run), *FRAMES]) == 0
    assert seen[0]["history.observation.images.top"].shape == (4, 2, 64, 64, 3)
    assert seen[0]["history.observation.images.top_is_pad"].shape == (4, 2)
    seen.clear()
    run = tmp_path / "recurrent"
    assert main([*base, "--out", str(run), *RECURRENT]) == 0
    episodes = seen[0]
    starts = episodes.frame_index[~episodes.segment_is_pad]
    assert (starts % 4 == 0).all() and episodes.action.shape[2] == 8
    assert episodes.num_segments == -(-int(episodes.length.max()) // 4)


def test_resume_after_a_crash_logs_every_step_once(dataset, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    base = ["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "8", *ARGS,
            "train.save_every=4", "train.log_every=1"]
    assert main([*base, "--out", str(straight)]) == 0
    assert main([*base, "--out", str(crashed), "--stop-at", "6"]) == 0
    # as if killed after logging step 6 and before its checkpoint: the last one is step 4
    shutil.rmtree(crashed / "checkpoints" / "step-000006")
    (crashed / "checkpoints" / "last").write_text("step-000004\n")
    assert [m["step"] for m in metrics(crashed)] == [1, 2, 3, 4, 5, 6]
    assert main(["train", "--resume", str(crashed), "--no-progress"]) == 0
    assert summary(crashed)["start_step"] == 4
    got, want = metrics(crashed), metrics(straight)
    assert [m["step"] for m in got] == list(range(1, 9))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]


def test_only_the_newest_checkpoints_are_kept(dataset, tmp_path):
    run, every = tmp_path / "run", tmp_path / "every"
    base = ["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "8"]
    assert main([*base, "--out", str(run), "--stop-at", "5", *ARGS, "train.save_every=2",
                 "train.keep_checkpoints=2"]) == 0
    assert checkpoint_names(run) == ["last", "step-000004", "step-000005"]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert checkpoint_names(run) == ["last", "step-000006", "step-000008"]
    assert last_checkpoint(run).name == "step-000008"
    assert main([*base, "--out", str(every), *ARGS, "train.save_every=2",
                 "train.keep_checkpoints=0"]) == 0
    assert checkpoint_names(every) == ["last"] + [f"step-00000{s}" for s in (2, 4, 6, 8)]
    assert TrainConfig().keep_checkpoints == 3
    with pytest.raises(ValueError, match=r"train.keep_checkpoints must be >= 0 .*got -1"):
        TrainConfig(keep_checkpoints=-1)


def test_gradients_are_clipped_and_the_norm_before_clipping_is_logged(dataset, tmp_path):
    run, clip = tmp_path / "run", 1e-12
    assert main(["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "2",
                 "--out", str(run), *ARGS, "train.save_every=1", "train.log_every=1",
                 "train.weight_decay=0", f"train.grad_clip_norm={clip}"]) == 0
    assert all(m["grad_norm"] > 1e6 * clip for m in metrics(run))  # before clipping
    # AdamW's second step from gradients of norm <= clip moves a weight by at most
    # lr * clip / (1 - beta1^2) / eps (~5e-4 lr here); unclipped, by up to about lr
    before = load_policy(run / "checkpoints" / "step-000001", device="cpu").state_dict()
    after = load_policy(run / "checkpoints" / "step-000002", device="cpu").state_dict()
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    lr = metrics(run)[1]["lr"]
    assert 0 < moved < 1e-3 * lr


def test_the_learning_rate_warms_up_linearly(dataset, tmp_path):
    peak, low = 1e-3, 0.025e-3
    def lr(step):  # a 103-step run: 3 warmup steps, then 100 of cosine decay
        return lr_at(step, peak, 103, 3, 0.025)

    assert [lr(s) for s in range(4)] == pytest.approx([peak / 4, peak / 2, 3 * peak / 4, peak])
    assert lr(53) == pytest.approx((peak + low) / 2) and lr(103) == pytest.approx(low)
    decay = [lr(s) for s in range(3, 104)]
    assert decay == sorted(decay, reverse=True)
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "30",
                 "--stop-at", "3", "--out", str(run), *ARGS, "train.log_every=1",
                 "train.lr=1e-3", "train.warmup_steps=3"]) == 0
    assert [m["lr"] for m in metrics(run)] == pytest.approx([peak / 4, peak / 2, 3 * peak / 4])


def test_load_policy_takes_a_run_or_a_checkpoint_and_a_device(dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "1",
                 "--out", str(run), *ARGS]) == 0
    ckpt = last_checkpoint(run)
    assert resolve_checkpoint(run) == ckpt and resolve_checkpoint(ckpt) == ckpt
    a, b = load_policy(run, device="cpu"), load_policy(ckpt, torch.device("cpu"))
    assert a.device.type == "cpu" and a.config == b.config == read_run_config(run).policy
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    default = "cuda" if torch.cuda.is_available() else "cpu"
    assert load_policy(run).device.type == default
    with pytest.raises(ValueError, match=r"device: expected None, 'cpu', 'cuda'.*got 'gpu0'"):
        load_policy(run, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: expected 'cpu' or None .*got 'cuda'"):
            load_policy(run, device="cuda")
    fresh = tmp_path / "fresh"  # a run without a checkpoint yet
    fresh.mkdir()
    shutil.copy(run / "run.json", fresh / "run.json")
    with pytest.raises(FileNotFoundError, match=r"checkpoints/last: no such file"):
        load_policy(fresh)


def test_checkpoints_are_json_and_safetensors_and_loading_never_unpickles(
        dataset, tmp_path, monkeypatch):
    import pickle

    from safetensors.torch import load as st_load

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "2",
                 "--out", str(run), "--stop-at", "1", *ARGS]) == 0
    ckpt = last_checkpoint(run)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.json", "model.safetensors", "optimizer.safetensors",
                     "processor.safetensors", "rng_rank0.json", "rng_rank0.safetensors",
                     "training_state.json"]
    for p in ckpt.iterdir():  # each file parses as what its name says, and nothing else
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            assert p.suffix == ".safetensors"
            st_load(p.read_bytes())

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for owner, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"),
                        (pickle, "Unpickler")]:
        monkeypatch.setattr(owner, name, refuse)
    load_policy(run, device="cpu")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # restores the rest
    assert summary(run)["start_step"] == 1 and summary(run)["step"] == 2


def test_the_loader_pins_memory_for_cuda_and_keeps_its_workers(dataset):
    from memvla.data.lerobot_v3 import LeRobotV3Dataset
    from memvla.policies import make_policy
    from memvla.training.loop import make_loader, make_run_config

    rc = make_run_config("tiny", str(dataset), 4, ["train.num_workers=1"])
    ds = LeRobotV3Dataset(dataset, delta_indices={"action": list(range(8))})
    policy = make_policy(rc.policy, stats=ds.stats)
    loader = make_loader(ds, policy, rc.train, 0, 0, 1, pin_memory=True)
    assert loader.pin_memory and loader.persistent_workers and loader.num_workers == 1
    plain = make_loader(ds, policy, TrainConfig(num_workers=0), 0, 0, 1)
    assert not plain.pin_memory and not plain.persistent_workers


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
    policy = load_policy(ckpt, device="cpu")
    assert policy.config == read_run_config(run).policy
    state = json.loads((ckpt / "training_state.json").read_text())
    assert 0 < state["step"] < 100000


@pytest.mark.parametrize(("port", "extra"), [(29531, []), (29532, RECURRENT), (29533, PRUNED)],
                         ids=["plain", "recurrent", "pruned"])
def test_two_process_ddp_on_cpu_ends_with_identical_parameters(dataset, tmp_path, port, extra):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), "-m", "memvla.cli", "train", "--preset", "tiny",
           "--dataset", str(dataset), "--steps", "3", "--out", str(run), *ARGS, *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    s = summary(run)
    assert s["world_size"] == 2 and s["step"] == 3
    assert len(s["param_digests"]) == 2 and s["param_digests"][0] == s["param_digests"][1]
    assert load_policy(last_checkpoint(run), device="cpu").config == read_run_config(run).policy


@pytest.mark.parametrize("extra", [RECURRENT, FRAMES], ids=["memory-tokens", "frames"])
def test_the_parallel_family_trains_with_a_temporal_context(dataset, tmp_path, extra):
    run = tmp_path / "oft"
    assert main(["train", "--preset", "tiny-oft", "--dataset", str(dataset), "--steps", "3",
                 "--out", str(run), *ARGS, *extra]) == 0
    policy = load_policy(run, device="cpu")
    assert policy.config.family == "parallel" and policy.model.context.stateful
    s = summary(run)
    assert s["step"] == 3 and all(np.isfinite(s["losses"]))


def test_init_from_a_checkpoint_adds_memory_and_freezes_the_vlm(dataset, tmp_path, capsys):
    """--init-from: the checkpoint's config and weights plus a new temporal context; the
    frozen VLM keeps the checkpoint's weights, the expert trains, the memory is new."""
    from memvla.training.init_from import freeze

    base = tmp_path / "base"
    assert main(["train", "--preset", "tiny", "--dataset", str(dataset), "--steps", "2",
                 "--out", str(base), *ARGS]) == 0
    run = tmp_path / "mem"
    assert main(["train", "--init-from", str(base), "--dataset", str(dataset), "--steps", "2",
                 "--out", str(run), *ARGS, "policy.context.kind=memory_tokens",
                 "train.freeze=[\"vlm\"]", "train.lr=1e-2"]) == 0
    assert read_run_config(run).init_from == str(resolve_checkpoint(base).resolve())
    before = load_policy(base, "cpu").model.state_dict()
    after = load_policy(run, "cpu").model.state_dict()
    vlm = [k for k in before if k.startswith("vlm_with_expert.vlm.")]
    expert = [k for k in before if k.startswith("vlm_with_expert.lm_expert.")]
    assert vlm and all(torch.equal(before[k], after[k]) for k in vlm)
    assert any(not torch.equal(before[k], after[k]) for k in expert)
    assert set(after) - set(before)  # the memory's parameters
    # a group that names nothing, and a weight the new config reshaped, are errors
    with pytest.raises(ValueError, match="train.freeze: 'vlmm'.*Did you mean 'vlm'"):
        freeze(load_policy(base, "cpu").model, ["vlmm"])
    assert main(["train", "--init-from", str(base), "--dataset", str(dataset), "--steps", "1",
                 "--out", str(tmp_path / "bad"), *ARGS, "policy.model.max_state_dim=6"]) == 2
    assert "has shape" in capsys.readouterr().err
