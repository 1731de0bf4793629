"""Checkpoints: ``config.json`` + ``model.safetensors`` + ``processor.safetensors``, each
written atomically (never pickle). Loading names the file of any error, and the missing
and unexpected keys when weights do not match their config."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .. import __version__
from ..utils import atomic_write_bytes, atomic_write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROCESSOR_FILE = "processor.safetensors"


def write_checkpoint(directory: str | Path, policy_type: str, config: dict,
                     weights: dict[str, Tensor], processor: dict[str, Tensor]) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / WEIGHTS_FILE, st_save({k: v.contiguous() for k, v in weights.items()},
                                                 metadata={"format": "pt"}))
    atomic_write_bytes(d / PROCESSOR_FILE, st_save(processor, metadata={"format": "pt"}))
    # the config goes last: a directory with a config.json is a complete checkpoint
    atomic_write_json(d / CONFIG_FILE, {"type": policy_type, "memvla_version": __version__,
                                        "config": config})
    return d


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; is {directory} a memvla checkpoint?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt JSON ({e})") from e
    for key in ("type", "config"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    return data


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"{path}: corrupt safetensors file ({e})") from e


def check_keys(path: str | Path, expected: set[str], found: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")

        raise ValueError(f"{path}: weights do not match the config: "
                         f"{len(missing)} missing keys [{show(missing)}], "
                         f"{len(unexpected)} unexpected keys [{show(unexpected)}]")
