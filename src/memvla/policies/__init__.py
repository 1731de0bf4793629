"""Policies: config -> model + processors + action queue, behind one API."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..configs import PolicyConfig
from .checkpoint import read_config
from .flow_policy import FlowVLAPolicy
from .inputs import batch_observation

POLICIES = {FlowVLAPolicy.policy_type: FlowVLAPolicy}


def make_policy(config: PolicyConfig, stats: dict[str, dict[str, Tensor]] | None = None):
    return FlowVLAPolicy(config, stats)


def load_policy(directory: str | Path, device: str = "cpu"):
    """Load any memvla policy checkpoint directory."""
    kind = read_config(directory)["type"]
    if kind not in POLICIES:
        raise ValueError(f"{Path(directory) / 'config.json'}: unknown policy type {kind!r}; "
                         f"known: {sorted(POLICIES)}")
    return POLICIES[kind].from_pretrained(directory, device)


__all__ = ["FlowVLAPolicy", "POLICIES", "batch_observation", "load_policy", "make_policy"]
