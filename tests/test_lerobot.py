"""Importing LeRobot checkpoints: a tiny SmolVLA built and saved by LeRobot's own classes
(in the environment ``scripts/lerobot-env`` makes, run as a subprocess) imports into memvla
and gives LeRobot's action chunk for the same observation and noise, normalisation
included; bad sources get errors that name what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_in_lerobot_env
from safetensors.torch import load_file

from memvla.cli import main
from memvla.interop.importer import import_checkpoint
from memvla.policies import load_policy

TOL = 1e-4


@pytest.fixture(scope="module")
def smolvla_case(tmp_path_factory) -> Path:
    """LeRobot's tiny SmolVLA checkpoint, its VLM directory and its recorded actions."""
    out = tmp_path_factory.mktemp("lerobot-smolvla")
    run_in_lerobot_env("make_smolvla.py", out)
    return out


def _case(d: Path):
    t = load_file(d / "case.safetensors")
    obs = {k: v for k, v in t.items() if k.startswith("observation.")}
    obs["task"] = json.loads((d / "case.json").read_text())["task"]
    return obs, t["noise"], t["actions"]


def test_smolvla_import_gives_lerobots_actions(smolvla_case, tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["import", "lerobot-smolvla", str(smolvla_case / "checkpoint"), "--out",
                 str(out)]) == 0
    table = capsys.readouterr().out
    assert "mapped" in table and "missing (needed, not in the source)       0" in table
    obs, noise, want = _case(smolvla_case)
    policy = load_policy(out, "cpu")
    got = policy.predict_action_chunk(obs, noise=noise.clone())  # (B, A, Da)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL
    # the checkpoint carries its tokenizer: it still loads once the VLM directory is gone
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    again = load_policy(moved, "cpu").predict_action_chunk(obs, noise=noise.clone())
    assert torch.equal(again, got)


def test_smolvla_import_bad_sources(smolvla_case, tmp_path):
    src = smolvla_case / "checkpoint"
    # another format: named for what it looks like
    import_checkpoint("lerobot-smolvla", src, tmp_path / "ok")
    with pytest.raises(ValueError, match="looks like a memvla checkpoint"):
        import_checkpoint("lerobot-smolvla", tmp_path / "ok", tmp_path / "x")
    with pytest.raises(ValueError, match="not known.*Did you mean 'lerobot-smolvla'"):
        import_checkpoint("lerobot-smolvlaa", src, tmp_path / "x")
    # a shape-preserving option set on the way; one that reshapes a weight is refused
    import_checkpoint("lerobot-smolvla", src, tmp_path / "plain-positions",
                      overrides=["model.vision.position_buckets=false"])
    assert not load_policy(tmp_path / "plain-positions").config.model.vision.position_buckets
    with pytest.raises(ValueError, match="has shape"):
        import_checkpoint("lerobot-smolvla", src, tmp_path / "x",
                          overrides=["model.max_action_dim=6"])
    # a truncated weights file
    broken = tmp_path / "truncated"
    shutil.copytree(src, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        import_checkpoint("lerobot-smolvla", broken, tmp_path / "x")
    # a config whose shapes disagree with the weights: the tensor is named
    wrong = tmp_path / "wrong-shapes"
    shutil.copytree(src, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["max_state_dim"] = 6
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.state_proj.weight has shape \(64, 8\)"):
        import_checkpoint("lerobot-smolvla", wrong, tmp_path / "x")
    # the VLM directory (config and tokenizer) missing
    novlm = tmp_path / "no-vlm"
    shutil.copytree(src, novlm)
    cfg = json.loads((novlm / "config.json").read_text())
    cfg["vlm_model_name"] = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    (novlm / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="--vlm DIR"):
        import_checkpoint("lerobot-smolvla", novlm, tmp_path / "x")
    import_checkpoint("lerobot-smolvla", novlm, tmp_path / "via-vlm",
                      vlm=str(smolvla_case / "vlm"))
    # normalisation statistics missing
    nostats = tmp_path / "no-stats"
    shutil.copytree(src, nostats)
    for f in nostats.glob("policy_postprocessor_step_*_unnormalizer_processor.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="unnormalizer_processor"):
        import_checkpoint("lerobot-smolvla", nostats, tmp_path / "x")



def test_lerobot_trains_and_runs_a_memvla_policy_through_the_plugin(tmp_path):
    """``lerobot-train --policy.type=memvla`` (the plugin found by LeRobot's discovery)
    trains 2 steps on a LeRobot v3.0 dataset memvla wrote; the saved checkpoint loads as a
    LeRobot ``PreTrainedPolicy`` with its processors and acts through ``select_action``."""
    from memvla.data.record import generate_dataset

    data = tmp_path / "data"
    generate_dataset("remember-color", 6, data, seed=0, options={"image_size": 32},
                     progress=False)
    run_in_lerobot_env("run_plugin.py", data, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["type"] == "memvla" and result["memvla_class"] == "FlowVLAPolicy"
    actions = torch.tensor(result["actions"])  # (steps, 1, Da)
    assert actions.shape == (3, 1, 3) and result["finite"]
    # the run directory is LeRobot's: its checkpoint holds LeRobot's config and processors
    saved = tmp_path / "train" / "checkpoints" / "last" / "pretrained_model"
    assert json.loads((saved / "config.json").read_text())["type"] == "memvla"
    assert (saved / "policy_preprocessor.json").is_file()


@pytest.mark.parametrize("vcodec", ["libsvtav1", "h264"])
def test_video_datasets_lerobot_wrote_read_frame_by_frame(vcodec, tmp_path):
    """A dataset LeRobot 0.4.4 wrote with its own encoder (AV1 by SVT-AV1, or H.264) reads
    in memvla, decoded whole or by seeking, with every frame closest to the frame LeRobot
    was given at that index (a frame off by one would be far from it)."""
    from memvla.data.lerobot_v3 import LeRobotV3Dataset

    run_in_lerobot_env("make_video_dataset.py", tmp_path, vcodec)
    given = load_file(tmp_path / "frames.safetensors")["frames"].numpy().astype(int)
    key = "observation.images.top"
    for cache in (True, False):
        ds = LeRobotV3Dataset(tmp_path / "dataset", image_cache=cache)
        assert ds.features[key]["dtype"] == "video" and len(ds) == len(given) == 49
        got = ds.get_numpy(key, np.arange(len(ds))).astype(int)  # (N, H, W, 3)
        dist = np.abs(got[:, None] - given[None]).reshape(len(ds), len(ds), -1).mean(-1)
        assert (dist.argmin(1) == np.arange(len(ds))).all()
        assert dist.diagonal().max() < 20  # lossy, but the frame at that index
