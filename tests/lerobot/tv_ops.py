"""Import before LeRobot in its test environment (``scripts/lerobot-env``): see
:func:`memvla.bench.lerobot.declare_torchvision_ops`."""

from memvla.bench.lerobot import declare_torchvision_ops

declare_torchvision_ops()
