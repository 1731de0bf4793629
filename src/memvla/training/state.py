"""A training run's checkpoints: ``RUN/checkpoints/step-XXXXXX/`` holds the policy
(config.json, model.safetensors, processor.safetensors), the optimiser state
(optimizer.safetensors + its param groups in training_state.json), the step, and every
process's RNG states (rng_rank<r>.safetensors + rng_rank<r>.json); ``RUN/checkpoints/last``
names the newest one. The learning-rate schedule is a pure function of the step, so the
step is the scheduler's whole state.

Crash safety: a step directory is replaced as a whole (written into a staging sibling,
fsynced, swapped in: :func:`memvla.utils.atomic_directory`), then ``last`` is replaced
atomically, then older checkpoints beyond ``train.keep_checkpoints`` are removed. A
process killed at any moment leaves ``last`` naming a complete checkpoint: the previous
one until the new one is in place and ``last`` names it. :func:`last_checkpoint` also
finds a step directory in the instant between the two renames of its replacement, and the
next save clears whatever a killed one left."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from ..policies.checkpoint import WEIGHTS_FILE, read_tensors, upgrade_keys, write_files
from ..utils import (
    atomic_write_bytes,
    begin_directory,
    commit_directory,
    json_bytes,
    readable_directory,
    recover_directory,
    remove_directory,
    staging_directory,
)

RUN_FILE = "run.json"  # marks a training run directory
CHECKPOINTS = "checkpoints"
LAST = "last"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "training_state.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_LEFTOVER = re.compile(r"\.(step-\d+)\.(new|old|trash)")
_LAST_TMP = re.compile(r"\.last\..*\.tmp")  # of a killed atomic_write_bytes


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
def seed_process(seed: int, rank: int) -> None:
    """One stream per process for what training draws (flow-matching noise and times, the
    pruner's noise): torch from seed + 1 + rank, NumPy and Python from seed + rank. (The
    model's initial weights come from ``torch.manual_seed(seed)`` on every process.)"""
    torch.manual_seed(seed + 1 + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def rng_files(rank: int) -> dict[str, bytes]:
    """This process's RNG states as the files of a checkpoint."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    extra = {"python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return {f"rng_rank{rank}.safetensors": st_save(tensors),
            f"rng_rank{rank}.json": json_bytes(extra)}


def set_rng_state(tensors: dict[str, torch.Tensor], extra: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = extra["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = extra["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


# -- saving ---------------------------------------------------------------------------------
def save_checkpoint(run: str | Path, step: int, policy, opt: torch.optim.Optimizer,
                    keep: int, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Checkpoint ``step`` of ``run``: every process writes its RNG states, rank 0 the
    policy, the optimiser and the step, publishes the directory, points ``last`` at it and
    keeps the newest ``keep`` checkpoints (0: all). ``barrier`` synchronises the
    processes (every process calls this)."""
    root = Path(run) / CHECKPOINTS
    final = root / step_dir_name(step)
    if rank == 0:
        begin_directory(final)
    barrier()
    staging = staging_directory(final)
    write_files(staging, rng_files(rank))
    barrier()
    if rank == 0:
        flat, groups = optimizer_tensors(opt)
        write_files(staging, {**policy.checkpoint_files(), OPTIMIZER_FILE: st_save(flat),
                              STATE_FILE: json_bytes({"step": step, "param_groups": groups})})
        commit_directory(final)
        atomic_write_bytes(root / LAST, (final.name + "\n").encode())
        prune_checkpoints(root, keep)
    barrier()
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Clear what killed saves left, then remove all but the newest ``keep`` checkpoints
    (0: keep all) and the one ``last`` names."""
    for p in list(root.iterdir()):
        m = _LEFTOVER.fullmatch(p.name)
        if m:
            recover_directory(root / m.group(1))
        elif _LAST_TMP.fullmatch(p.name):
            p.unlink()
    if keep == 0:
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir())
    last = (root / LAST).read_text().strip()
    for _, p in steps[:-keep]:
        if p.name != last:
            remove_directory(p)


# -- loading --------------------------------------------------------------------------------
def last_checkpoint(run: str | Path) -> Path:
    run = Path(run)
    pointer = run / CHECKPOINTS / LAST
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer}: no such file; {run} has no checkpoint to resume "
                                "from")
    path = readable_directory(run / CHECKPOINTS / pointer.read_text().strip())
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


def restore_checkpoint(run: str | Path, policy, opt: torch.optim.Optimizer, rank: int) -> int:
    """Load the last checkpoint of ``run`` (if any) into ``policy``, ``opt`` and this
    process's RNGs -> its step (0 without a checkpoint)."""
    if not (Path(run) / CHECKPOINTS / LAST).is_file():
        return 0
    ckpt = last_checkpoint(run)
    policy.model.load_state_dict(upgrade_keys(read_tensors(ckpt / WEIGHTS_FILE)))
    meta = _read_json(ckpt / STATE_FILE)
    load_optimizer(opt, read_tensors(ckpt / OPTIMIZER_FILE), meta["param_groups"])
    rng_path = ckpt / f"rng_rank{rank}.safetensors"
    if not rng_path.is_file():
        raise FileNotFoundError(f"{rng_path}: no such file (was the run made with a "
                                "different number of processes?)")
    set_rng_state(read_tensors(rng_path), _read_json(ckpt / f"rng_rank{rank}.json"))
    return meta["step"]


def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt JSON ({e})") from e
