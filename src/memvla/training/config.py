"""The training run's configuration: the policy config plus :class:`TrainConfig`, saved as
``RUN/run.json`` and compared on ``--resume``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..configs import PolicyConfig, _positive, _require

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
TRAIN_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Optimiser and loop settings. Defaults follow SmolVLA (AdamW, betas (0.9, 0.95),
    eps 1e-8, weight decay 1e-10, gradient clipping at 10, warmup then cosine decay to
    2.5% of the peak), with the warmup scaled to the run length when it is shorter."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-10
    grad_clip_norm: float = 10.0
    warmup_steps: int = 1000  # capped at 10% of `steps`
    decay_lr_ratio: float = 0.025  # final lr = ratio * lr (SmolVLA: 2.5e-6 / 1e-4)
    seed: int = 0
    num_workers: int = 2  # data-loading worker processes (0 = in the main process)
    save_every: int = 1000  # checkpoint every K steps (and at the end, and on SIGINT/SIGTERM)
    keep_checkpoints: int = 3  # keep the newest N checkpoints (the last one among them); 0: all
    log_every: int = 10
    device: str = "auto"  # auto: CUDA when available (each process its own GPU), else cpu
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else no
    tensorboard: bool = False
    # Recurrent (memory) policies train on whole episodes cut into chunk-aligned segments,
    # batch_size episodes at a time, with truncated back-propagation through time:
    bptt_depth: int = -1  # k: -1 whole episode, 0 detach every segment, k > 0 k updates
    curriculum_segments: int = 0  # 0: all segments; n > 0: start with n segments ...
    curriculum_every: int = 200  # ... and allow one more every this many steps
    # parts whose parameters are not trained: vision, connector, text, vlm, expert, or any
    # parameter-name prefix (e.g. train.freeze='["vlm"]': train the expert and a new memory)
    freeze: list[str] = field(default_factory=list)
    # context.kind=experience: a store directory whose items join the training set's own
    # (e.g. failed episodes, `memvla store --decoy 1`, so that the policy sees failures)
    store: str | None = None

    def __post_init__(self):
        _positive("train", steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                  save_every=self.save_every, log_every=self.log_every)
        _require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got "
                 f"{self.warmup_steps}")
        _require(self.keep_checkpoints >= 0, f"train.keep_checkpoints must be >= 0 (the "
                 f"newest N checkpoints are kept; 0 keeps all), got {self.keep_checkpoints}")
        _require(self.num_workers >= 0, f"train.num_workers must be >= 0, got "
                 f"{self.num_workers}")
        _require(self.grad_clip_norm > 0, f"train.grad_clip_norm must be > 0, got "
                 f"{self.grad_clip_norm}")
        _require(0 <= self.decay_lr_ratio <= 1, f"train.decay_lr_ratio must be in [0, 1], got "
                 f"{self.decay_lr_ratio}")
        _require(self.bptt_depth >= -1, f"train.bptt_depth must be >= -1 (-1 = whole "
                 f"episode), got {self.bptt_depth}")
        _require(self.curriculum_segments >= 0 and self.curriculum_every > 0,
                 f"train.curriculum_segments must be >= 0 and train.curriculum_every > 0, "
                 f"got {self.curriculum_segments}, {self.curriculum_every}")
        _require(self.device in TRAIN_DEVICES, f"train.device must be one of {TRAIN_DEVICES}, "
                 f"got {self.device!r}")
        _require(self.mixed_precision in MIXED_PRECISION, f"train.mixed_precision must be one "
                 f"of {MIXED_PRECISION}, got {self.mixed_precision!r}")

    @property
    def effective_warmup(self) -> int:
        return min(self.warmup_steps, self.steps // 10)

    def max_segments(self, step: int) -> int | None:
        """Segments of each episode used at ``step`` (None: all)."""
        if self.curriculum_segments == 0:
            return None
        return self.curriculum_segments + step // self.curriculum_every


@dataclass
class RunConfig:
    """What ``memvla train`` was asked to do: a preset, a dataset and the resolved configs."""

    preset: str = "tiny"
    dataset: str = ""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init_from: str = ""  # a checkpoint whose config and weights the run starts from
