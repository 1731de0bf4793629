"""Importing OpenVLA-OFT and LightVLA checkpoints.

A tiny OFT fine-tune in the published layout (timm's DINOv2-reg and SigLIP towers,
transformers' Llama, OFT's projector, proprio projector and MLP-ResNet head, written as OFT
publishes them) is built in the LeRobot environment by ``tests/lerobot/make_openvla_oft.py``
with the actions OFT's inference computes; it imports into memvla and gives those actions,
normalisation and prompt included. The ``openvla-oft-7b`` preset has the names and shapes
those classes build at real size; bad sources get errors naming the file and the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_in_lerobot_env
from safetensors.torch import load_file

from memvla.cli import main
from memvla.interop.importer import import_checkpoint
from memvla.policies import FAMILY_POLICIES, load_policy
from memvla.presets import get_preset

TOL = 1e-4
PUBLISHED_VLA_PARAMETERS = 7_541_237_184  # openvla-7b's weights (its index: 15.08 GB bf16)


@pytest.fixture(scope="module")
def oft_case(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("openvla-oft")
    run_in_lerobot_env("make_openvla_oft.py", out)
    return out


def _case(d: Path) -> tuple[dict, torch.Tensor]:
    t = load_file(d / "case.safetensors")
    obs = {k: v for k, v in t.items() if k.startswith("observation.")}
    obs["task"] = [json.loads((d / "case.json").read_text())["task"]] * len(t["actions"])
    return obs, t["actions"]


def test_oft_import_gives_ofts_actions(oft_case, tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["import", "openvla-oft", str(oft_case / "checkpoint"), "--out",
                 str(out)]) == 0
    table = capsys.readouterr().out
    assert "missing (needed, not in the source)       0" in table
    assert "unmapped (in the source, not used)        0" in table
    obs, want = _case(oft_case)
    policy = load_policy(out, "cpu")
    assert policy.config.model.action_offset == 1
    got = policy.predict_action_chunk(obs)  # (B, A, Da), unnormalised
    assert got.shape == want.shape == (2, 8, 3)
    assert (got - want).abs().max().item() <= TOL
    # the read matters: the head on the placeholders themselves gives other actions
    placeholders = load_policy(out, "cpu", overrides=["model.action_offset=0"])
    assert (placeholders.predict_action_chunk(obs) - want).abs().max().item() > 1e-2
    # the checkpoint carries the tokenizer, the prompt and the normaliser: the source may go
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    assert torch.equal(load_policy(moved, "cpu").predict_action_chunk(obs), got)


def test_lightvla_import_is_oft_with_the_pruner_on(oft_case, tmp_path):
    import_checkpoint("openvla-oft", oft_case / "checkpoint", tmp_path / "oft")
    import_checkpoint("lightvla", oft_case / "checkpoint", tmp_path / "light")
    oft, light = (load_policy(tmp_path / n, "cpu") for n in ("oft", "light"))
    assert light.config.model.pruner.enabled and not oft.config.model.pruner.enabled
    a, b = oft.model.state_dict(), light.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # no weights
    obs, _ = _case(oft_case)
    chunk = light.predict_action_chunk(obs)
    assert chunk.shape == (2, 8, 3) and torch.isfinite(chunk).all()
    kept = light.model.last_prune_stat_tensors["kept"]
    assert 0 < kept.item() < 2 * 16  # of the two cameras' 16 patches each


def test_openvla_oft_7b_preset_has_the_published_layout(tmp_path):
    """Names and shapes of OpenVLA-OFT at real size (LIBERO's 8 × 7 actions and 8-d
    proprio) as timm, transformers and OFT's module layout build it."""
    run_in_lerobot_env("make_openvla_oft.py", "--layout", tmp_path / "layout.json")
    published = json.loads((tmp_path / "layout.json").read_text())
    with torch.device("meta"):
        model = FAMILY_POLICIES["parallel"].build_model(get_preset("openvla-oft-7b"))
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(published) - set(mine)) == [] and sorted(set(mine) - set(published)) == []
    assert {k for k in mine if mine[k] != published[k]} == set()
    vla = sum(v.numel() for k, v in model.state_dict().items()
              if not k.startswith(("action_head.", "proprio_projector.")))
    assert vla == PUBLISHED_VLA_PARAMETERS


class NotATensor:
    pass


def test_oft_import_bad_sources(oft_case, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(oft_case / "checkpoint", src)
    head_file = src / "action_head--10_checkpoint.pt"
    head = torch.load(head_file, weights_only=True)
    # an action head for another width than the config's decoder
    bad = dict(head)
    bad["module.model.fc1.weight"] = torch.zeros(64, 3 * 32)
    torch.save(bad, head_file)
    with pytest.raises(ValueError, match=r"action_head--10_checkpoint.pt: model.fc1.weight "
                       r"takes 96 inputs; expected action_dim × text_config.hidden_size = "
                       r"3 × 64 = 192"):
        import_checkpoint("openvla-oft", src, tmp_path / "x")
    # a pickled object is refused, never run
    torch.save({"model.fc1.weight": NotATensor()}, head_file)
    with pytest.raises(ValueError, match="not a plain state dict of tensors"):
        import_checkpoint("openvla-oft", src, tmp_path / "x")
    torch.save(head, head_file)
    # statistics of two datasets: the one to use must be named
    stats_file = src / "dataset_statistics.json"
    stats = json.loads(stats_file.read_text())
    stats["other_dataset"] = next(iter(stats.values()))
    stats_file.write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="statistics of 2 datasets.*--unnorm-key"):
        import_checkpoint("openvla-oft", src, tmp_path / "x")
    import_checkpoint("openvla-oft", src, tmp_path / "ok", unnorm_key="other_dataset")
    with pytest.raises(ValueError, match="no statistics for 'nope'"):
        import_checkpoint("openvla-oft", src, tmp_path / "x", unnorm_key="nope")
    # a memvla checkpoint is not an OFT directory
    with pytest.raises(ValueError, match="not an OpenVLA-OFT checkpoint.*memvla checkpoint"):
        import_checkpoint("openvla-oft", tmp_path / "ok", tmp_path / "x")
    # a missing shard is named
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names shard model-00002-of-00002"):
        import_checkpoint("openvla-oft", src, tmp_path / "x")


def test_q01_q99_normalisation_clips_and_passes_masked_dimensions():
    from memvla.policies.processor import Normalizer

    stats = {"action": {"q01": torch.tensor([0.0, -2.0]), "q99": torch.tensor([2.0, 2.0]),
                        "mask": torch.tensor([1.0, 0.0])}}
    norm = Normalizer({"action": "q01_q99"}, stats)
    x = torch.tensor([[1.0, 0.5], [3.0, -1.5], [-1.0, 0.25]])
    y = norm.normalize("action", x)
    assert torch.allclose(y, torch.tensor([[0.0, 0.5], [1.0, -1.0], [-1.0, 0.25]]))
    back = norm.unnormalize("action", torch.tensor([[0.0, 0.5], [1.0, -0.75]]))
    assert torch.allclose(back, torch.tensor([[1.0, 0.5], [2.0, -0.75]]))
    # a dataset's statistics have no mask: every dimension is normalised
    plain = Normalizer({"action": "q01_q99"}, {"action": {k: stats["action"][k]
                                                          for k in ("q01", "q99")}})
    assert torch.allclose(plain.normalize("action", x)[:, 1], torch.tensor([0.25, -0.75, 0.125]))
    with pytest.raises(ValueError, match=r"lack \['q99'\]"):
        Normalizer({"action": "q01_q99"}, {"action": {"q01": torch.zeros(2)}})


def test_timm_layout_options_are_checked():
    from memvla.configs import VisionConfig

    with pytest.raises(ValueError, match="layout='siglip' has none of the timm layout's"):
        VisionConfig(reg_tokens=4)
    with pytest.raises(ValueError, match=r"feature_layer must be in \[0, vision.depth=2\)"):
        VisionConfig(layout="timm", depth=2, feature_layer=2)
    with pytest.raises(ValueError, match="pixel_mean must have one value per channel"):
        VisionConfig(layout="timm", pixel_mean=(0.5,), pixel_std=(0.5,))
    with pytest.raises(ValueError, match="vision.layout must be one of"):
        VisionConfig(layout="clip")


def test_tokenizer_prompt_and_end_ids_are_options_of_hf_tokenizers():
    from memvla.configs import TokenizerConfig

    with pytest.raises(ValueError, match="options of kind = 'hf'"):
        TokenizerConfig(end_ids=[29871])
    with pytest.raises(ValueError, match=r"may name only \{task\}"):
        TokenizerConfig(kind="hf", path="x", prompt="{instruction}")
