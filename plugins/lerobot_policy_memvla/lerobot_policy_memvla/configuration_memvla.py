"""The ``memvla`` policy type's LeRobot config: a memvla preset plus dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import NormalizationMode
from lerobot.optim.optimizers import AdamWConfig
from lerobot.optim.schedulers import CosineDecayWithWarmupSchedulerConfig


@PreTrainedConfig.register_subclass("memvla")
@dataclass
class MemvlaConfig(PreTrainedConfig):
    """``preset``: a memvla preset (``memvla presets``); ``overrides``: dotted options of
    its policy config (``["model.chunk_size=8", "context.kind=frames"]``). Cameras, image
    shape and state/action sizes come from the dataset's features; LeRobot's processors
    normalise state and actions (memvla's own normaliser stays the identity)."""

    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    n_obs_steps: int = 1
    normalization_mapping: dict[str, NormalizationMode] = field(default_factory=lambda: {
        "VISUAL": NormalizationMode.IDENTITY,
        "STATE": NormalizationMode.MEAN_STD,
        "ACTION": NormalizationMode.MEAN_STD,
    })
    optimizer_lr: float = 1e-4
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 1e-10
    optimizer_grad_clip_norm: float = 10.0
    scheduler_warmup_steps: int = 1000
    scheduler_decay_steps: int = 30000
    scheduler_decay_lr: float = 2.5e-6

    def __post_init__(self):
        super().__post_init__()
        if self.n_obs_steps != 1:
            raise ValueError(f"memvla: n_obs_steps must be 1 (temporal context is memvla's "
                             f"context.kind), got {self.n_obs_steps}")
        from memvla.presets import get_preset

        get_preset(self.preset)  # an unknown preset fails here, with a did-you-mean

    def memvla_config(self):
        """The memvla policy config: the preset, the overrides, and no normalisation of
        its own (LeRobot's processors do it)."""
        from memvla.config_utils import apply_overrides
        from memvla.presets import get_preset

        return apply_overrides(get_preset(self.preset), [
            *self.overrides, 'normalization={"observation.state": "identity", '
            '"action": "identity"}'])

    @property
    def chunk_size(self) -> int:
        return self.memvla_config().model.chunk_size

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(lr=self.optimizer_lr, betas=self.optimizer_betas,
                           eps=self.optimizer_eps, weight_decay=self.optimizer_weight_decay,
                           grad_clip_norm=self.optimizer_grad_clip_norm)

    def get_scheduler_preset(self) -> CosineDecayWithWarmupSchedulerConfig:
        return CosineDecayWithWarmupSchedulerConfig(
            peak_lr=self.optimizer_lr, decay_lr=self.scheduler_decay_lr,
            num_warmup_steps=self.scheduler_warmup_steps,
            num_decay_steps=self.scheduler_decay_steps)

    def validate_features(self) -> None:
        if not self.image_features:
            raise ValueError("memvla: the policy needs at least one camera "
                             "(an observation.images.<name> feature)")
        if self.robot_state_feature is None or self.action_feature is None:
            raise ValueError("memvla: the policy needs observation.state and action features")
