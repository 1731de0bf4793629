"""Import before LeRobot in its test environment (``scripts/lerobot-env``).

PyPI's torchvision wheel is built for CUDA: beside the CPU torch its C extension does not
load, and torchvision's fake-op registrations then fail on ``torchvision::nms``. Declaring
the two operator schemas first lets ``import torchvision`` succeed; the C ops themselves
stay unavailable, and nothing LeRobot's policies run uses them.
"""

import torch

try:
    _ = torch.ops.torchvision.nms
except (AttributeError, RuntimeError):
    for name in ("nms", "qnms"):
        torch.library.define(f"torchvision::{name}",
                             "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
