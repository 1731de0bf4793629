"""Policies: config -> model + processors + action queue, behind one API."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..configs import PolicyConfig
from .base import VLAPolicy
from .checkpoint import read_config, resolve_checkpoint
from .flow_policy import FlowVLAPolicy
from .inputs import batch_observation
from .parallel_policy import ParallelVLAPolicy

POLICIES: dict[str, type[VLAPolicy]] = {FlowVLAPolicy.policy_type: FlowVLAPolicy,
                                        ParallelVLAPolicy.policy_type: ParallelVLAPolicy}
FAMILY_POLICIES: dict[str, type[VLAPolicy]] = {p.family: p for p in POLICIES.values()}


def make_policy(config: PolicyConfig, stats: dict[str, dict[str, Tensor]] | None = None):
    """The policy class of ``config.family`` ("flow" or "parallel")."""
    if config.family not in FAMILY_POLICIES:
        raise ValueError(f"policy.family {config.family!r} has no policy class; known: "
                         f"{sorted(FAMILY_POLICIES)}")
    return FAMILY_POLICIES[config.family](config, stats)


def policy_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device; None: CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected None, 'cpu', 'cuda', 'cuda:N' or a torch.device, "
                         f"got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected None, 'cpu', 'cuda' or 'cuda:N', got {device!r} "
                         f"(memvla runs on the CPU and on CUDA GPUs)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected 'cpu' or None (CUDA is not available here), got "
                         f"{device!r}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: expected a GPU index below {torch.cuda.device_count()} "
                         f"(the GPUs here), got {device!r}")
    return dev


def load_policy(path: str | Path, device: str | torch.device | None = None,
                overrides: list[str] | None = None):
    """Load a memvla policy from a checkpoint directory or a training run directory (its
    last checkpoint, see :func:`resolve_checkpoint`) onto ``device`` (None: CUDA when
    available, else the CPU). ``overrides``: dotted config options changed for this use,
    e.g. ``["context.voxel_size=0.5"]`` (training-free options; the weights must fit)."""
    dev = policy_device(device)
    directory = resolve_checkpoint(path)
    kind = read_config(directory)["type"]
    if kind not in POLICIES:
        raise ValueError(f"{directory / 'config.json'}: unknown policy type {kind!r}; "
                         f"known: {sorted(POLICIES)}")
    return POLICIES[kind].from_pretrained(directory, dev, overrides)


__all__ = ["FlowVLAPolicy", "POLICIES", "ParallelVLAPolicy", "VLAPolicy", "batch_observation",
           "load_policy", "make_policy", "policy_device", "resolve_checkpoint"]
