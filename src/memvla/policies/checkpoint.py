"""Checkpoints: ``config.json`` + ``model.safetensors`` + ``processor.safetensors`` (never
pickle). A checkpoint directory is replaced as a whole: written into a staging sibling,
fsynced, then swapped in (:func:`memvla.utils.atomic_directory`), so that a process killed
at any moment leaves the old checkpoint or the new one, never a mix; readers go through
:func:`resolve_checkpoint`, which also finds the old one in the instant between the swap's
two renames. Loading names the file of any error, and the missing and unexpected keys when
weights do not match their config."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .. import __version__
from ..config_utils import from_dict
from ..configs import PolicyConfig
from ..utils import atomic_directory, json_bytes, readable_directory, write_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROCESSOR_FILE = "processor.safetensors"


def checkpoint_files(policy_type: str, config: dict, weights: dict[str, Tensor],
                     processor: dict[str, Tensor]) -> dict[str, bytes]:
    """The files of a policy checkpoint, by name, serialised."""
    return {
        WEIGHTS_FILE: st_save({k: v.contiguous() for k, v in weights.items()},
                              metadata={"format": "pt"}),
        PROCESSOR_FILE: st_save(processor, metadata={"format": "pt"}),
        CONFIG_FILE: json_bytes({"type": policy_type, "memvla_version": __version__,
                                 "config": config}),
    }


TOKENIZER_DIR = "tokenizer"  # a Hugging Face tokenizer's files, inside the checkpoint


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():  # a name may hold one folder: "tokenizer/vocab.json"
        (directory / name).parent.mkdir(exist_ok=True)
        write_file(directory / name, data)


def read_policy_config(directory: str | Path) -> tuple[str, PolicyConfig]:
    """(policy type, policy config) of checkpoint ``directory``; a Hugging Face tokenizer's
    relative path (its files inside the checkpoint) is made absolute."""
    meta = read_config(directory)
    config = from_dict(PolicyConfig, meta["config"])
    tok = config.tokenizer
    if tok.kind == "hf" and not Path(tok.path).is_absolute():
        tok.path = str((Path(directory) / tok.path).resolve())
    return meta["type"], config


def write_checkpoint(directory: str | Path, files: dict[str, bytes]) -> Path:
    """Write (or replace, as a whole) the checkpoint directory ``directory`` with ``files``
    (see :func:`checkpoint_files`)."""
    with atomic_directory(directory) as staging:
        write_files(staging, files)
    return Path(directory)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory to read for ``path``: a checkpoint directory, or a training
    run (``RUN/run.json``), whose last checkpoint it is."""
    p = readable_directory(path)
    if (p / CONFIG_FILE).is_file():
        return p
    from ..training.state import RUN_FILE, last_checkpoint

    if (p / RUN_FILE).is_file():
        return last_checkpoint(p)
    raise FileNotFoundError(f"{p / CONFIG_FILE}: no such file; is {path} a memvla checkpoint? "
                            f"(nor is it a training run: {p / RUN_FILE}: no such file)")


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


# weight names of earlier memvla versions -> today's (prefix renames)
RENAMED_PREFIXES = {"memory_tokens.": "context.tokens."}


def upgrade_keys(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights saved by an earlier memvla, under today's names."""
    out = {}
    for key, value in weights.items():
        for old, new in RENAMED_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def check_shapes(path: str | Path, weights: dict[str, Tensor], own: dict[str, Tensor],
                 expects: str = "the config expects") -> None:
    """A weight whose shape differs from the model's (``own``, by name) is an error naming
    it; names ``own`` lacks are left to the caller."""
    for k, v in weights.items():
        if k in own and v.shape != own[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, {expects} "
                             f"{tuple(own[k].shape)}")


def check_keys(path: str | Path, expected: set[str], found: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")

        raise ValueError(f"{path}: weights do not match the config: "
                         f"{len(missing)} missing keys [{show(missing)}], "
                         f"{len(unexpected)} unexpected keys [{show(unexpected)}]")
