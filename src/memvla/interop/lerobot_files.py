"""Reading a LeRobot policy checkpoint directory (no LeRobot needed).

LeRobot saves a policy as ``config.json`` (its ``PreTrainedConfig``, with ``"type"``),
``model.safetensors`` and the processor pipelines ``policy_preprocessor.json`` /
``policy_postprocessor.json``, whose normaliser steps name their statistics file in
``state_file`` (``policy_preprocessor_step_<k>_normalizer_processor.safetensors``; k
differs by policy and version, so the file is found by the step, not by its name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..policies.checkpoint import read_tensors
from ..utils import read_json

PREPROCESSOR = "policy_preprocessor.json"
POSTPROCESSOR = "policy_postprocessor.json"
NORMALIZER_STEPS = ("normalizer_processor", "unnormalizer_processor")
# LeRobot's NormalizationMode -> memvla's normalisation modes
NORM_MODES = {"MEAN_STD": "mean_std", "MIN_MAX": "min_max", "IDENTITY": "identity"}
# what a directory's config.json says about its format
POLICY_TYPES = {"smolvla": "lerobot-smolvla", "pi0": "lerobot-pi0", "pi05": "lerobot-pi05"}


@dataclass
class LeRobotCheckpoint:
    root: Path
    config: dict  # config.json
    weights: dict[str, Tensor]  # model.safetensors
    stats: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # {feature: {stat: x}}
    norm_map: dict[str, str] = field(default_factory=dict)  # {"STATE": "MEAN_STD", ...}

    def features(self, kind: str) -> dict[str, list[int]]:
        """The input/output features of a LeRobot feature type ("VISUAL", "STATE",
        "ACTION") -> {key: shape}."""
        found = {**self.config.get("input_features", {}),
                 **self.config.get("output_features", {})}
        return {k: list(f["shape"]) for k, f in found.items() if f.get("type") == kind}


def guess_format(root: Path) -> str:
    """What a directory looks like: a LeRobot policy (``lerobot-<type>``), a memvla
    checkpoint or run, a Hugging Face model (``hf-<model_type>``), or ``unknown``."""
    if (root / "run.json").is_file():
        return "a memvla training run"
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        return "unknown (no config.json)"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "unknown (config.json is not JSON)"
    if "memvla_version" in cfg:
        return "a memvla checkpoint"
    if "type" in cfg:
        return POLICY_TYPES.get(cfg["type"], f"a LeRobot '{cfg['type']}' policy")
    if "model_type" in cfg:
        return f"hf-{cfg['model_type']}"
    return "unknown"


def read_checkpoint(root: str | Path, fmt: str) -> LeRobotCheckpoint:
    """Read LeRobot checkpoint ``root`` of format ``fmt`` (its config, weights and
    normalisation statistics); a directory of another format is an error saying which it
    looks like."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such checkpoint directory")
    looks = guess_format(root)
    if looks != fmt:
        raise ValueError(f"{root}: not a {fmt} checkpoint; it looks like {looks}")
    config = read_json(root / "config.json")
    weights = read_tensors(root / "model.safetensors")
    ckpt = LeRobotCheckpoint(root, config, weights)
    _read_normalizers(ckpt)
    return ckpt


def _read_normalizers(ckpt: LeRobotCheckpoint) -> None:
    """Statistics of every normaliser step of both pipelines (pre: state, post: action);
    a pipeline file that is missing is an error (the statistics would be lost)."""
    for name in (PREPROCESSOR, POSTPROCESSOR):
        pipeline = read_json(ckpt.root / name)
        for step in pipeline.get("steps", []):
            if step.get("registry_name") not in NORMALIZER_STEPS:
                continue
            ckpt.norm_map.update(step.get("config", {}).get("norm_map", {}))
            state_file = step.get("state_file")
            if state_file is None:
                raise ValueError(f"{ckpt.root / name}: the {step['registry_name']} step names "
                                 "no state_file, so its normalisation statistics are missing")
            for key, value in read_tensors(ckpt.root / state_file).items():
                feature, stat = key.rsplit(".", 1)
                ckpt.stats.setdefault(feature, {})[stat] = value
