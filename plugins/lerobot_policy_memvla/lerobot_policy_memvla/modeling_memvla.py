"""A memvla policy as a LeRobot ``PreTrainedPolicy``: LeRobot's training loop calls
``forward`` on its (normalised) batches, its rollout loops call ``select_action`` and
``reset``; everything else is memvla's policy."""

from __future__ import annotations

from dataclasses import replace

import torch
from lerobot.policies.pretrained import PreTrainedPolicy
from torch import Tensor

from .configuration_memvla import MemvlaConfig

CAMERA_PREFIX = "observation.images."


def memvla_policy_config(config: MemvlaConfig):
    """The memvla policy config fitted to the LeRobot config's features."""
    shapes = {tuple(f.shape) for f in config.image_features.values()}
    if len(shapes) != 1:
        raise ValueError(f"memvla: every camera must have the same image shape, got "
                         f"{ {k: tuple(f.shape) for k, f in config.image_features.items()} }")
    return replace(config.memvla_config(),  # (validated again by the config's checks)
                   cameras=[k[len(CAMERA_PREFIX):] for k in config.image_features],
                   image_shape=shapes.pop(), state_dim=config.robot_state_feature.shape[0],
                   action_dim=config.action_feature.shape[0])


class MemvlaPolicy(PreTrainedPolicy):
    config_class = MemvlaConfig
    name = "memvla"

    def __init__(self, config: MemvlaConfig, dataset_stats=None, **kwargs):
        super().__init__(config)
        config.validate_features()
        from memvla.policies import make_policy

        self.memvla = make_policy(memvla_policy_config(config))
        self.reset()

    def get_optim_params(self):
        return [p for p in self.parameters() if p.requires_grad]

    def reset(self) -> None:
        self.memvla.reset()

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        return self.memvla(_memvla_batch(batch))

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        return self.memvla.predict_action_chunk(_memvla_batch(batch), kwargs.get("noise"))

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        return self.memvla.select_action(_memvla_batch(batch), kwargs.get("noise"))


def _memvla_batch(batch: dict) -> dict:
    """LeRobot's batch -> memvla's: the same keys; the task as a list of strings."""
    out = dict(batch)
    task = out.get("task")
    if isinstance(task, str):
        out["task"] = [task]
    return out
