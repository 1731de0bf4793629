"""Training checkpoints: ``RUN/checkpoints/step-XXXXXX/`` holds the policy (config.json,
model.safetensors, processor.safetensors), the optimiser state (optimizer.safetensors +
its param groups in training_state.json), the step, and every process's RNG states
(rng_rank<r>.safetensors). A checkpoint is written into a temporary directory and renamed
into place; ``RUN/checkpoints/last`` names the newest one. The learning-rate schedule is a
pure function of the step, so the step is the scheduler's whole state."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from ..policies.checkpoint import read_tensors
from ..utils import atomic_write_bytes, atomic_write_json

LAST = "last"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# -- optimiser ------------------------------------------------------------------------------
def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    flat = {f"{i}/{name}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
            for i, st in sd["state"].items() for name, v in st.items()}
    return flat, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor],
                   groups: list) -> None:
    state: dict[int, dict] = {}
    for key, v in flat.items():
        i, name = key.split("/", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# -- random number generators ---------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    extra = {"python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, extra


def set_rng_state(tensors: dict[str, torch.Tensor], extra: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = extra["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = extra["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


# -- whole checkpoints ----------------------------------------------------------------------
def write_rng(directory: Path, rank: int) -> None:
    tensors, extra = rng_state()
    atomic_write_bytes(directory / f"rng_rank{rank}.safetensors", st_save(tensors))
    atomic_write_json(directory / f"rng_rank{rank}.json", extra)


def write_training_state(directory: Path, policy, opt: torch.optim.Optimizer, step: int,
                         extra: dict | None = None) -> None:
    """Policy, optimiser and step into ``directory`` (rank 0 only)."""
    policy.save_pretrained(directory)
    flat, groups = optimizer_tensors(opt)
    atomic_write_bytes(directory / "optimizer.safetensors", st_save(flat))
    atomic_write_json(directory / "training_state.json",
                      {"step": step, "param_groups": groups, **(extra or {})})


def publish(checkpoints: Path, tmp: Path, step: int) -> Path:
    """Move a finished temporary checkpoint into place and point ``last`` at it."""
    final = checkpoints / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_bytes(checkpoints / LAST, (final.name + "\n").encode())
    return final


def last_checkpoint(run: Path) -> Path:
    pointer = run / "checkpoints" / LAST
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer}: no such file; {run} has no checkpoint to resume "
                                "from")
    path = run / "checkpoints" / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


def read_training_state(directory: Path, rank: int) -> tuple[dict, dict, dict, dict]:
    """-> (training_state.json, optimizer tensors, rng tensors, rng extra) of ``rank``."""
    meta_path = directory / "training_state.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no such file")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: corrupt JSON ({e})") from e
    opt = read_tensors(directory / "optimizer.safetensors")
    rng_path = directory / f"rng_rank{rank}.safetensors"
    rng = read_tensors(rng_path)
    extra_path = directory / f"rng_rank{rank}.json"
    if not extra_path.is_file():
        raise FileNotFoundError(f"{extra_path}: no such file (was the run made with a "
                                "different number of processes?)")
    return meta, opt, rng, json.loads(extra_path.read_text())
