"""Policies: config -> model + processors + action queue, behind one API."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..configs import PolicyConfig
from .base import VLAPolicy
from .checkpoint import read_config
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


def load_policy(directory: str | Path, device: str = "cpu"):
    """Load any memvla policy checkpoint directory."""
    kind = read_config(directory)["type"]
    if kind not in POLICIES:
        raise ValueError(f"{Path(directory) / 'config.json'}: unknown policy type {kind!r}; "
                         f"known: {sorted(POLICIES)}")
    return POLICIES[kind].from_pretrained(directory, device)


__all__ = ["FlowVLAPolicy", "POLICIES", "ParallelVLAPolicy", "VLAPolicy", "batch_observation",
           "load_policy", "make_policy"]
