"""The ``memvla`` policy's LeRobot processors: batch, device and LeRobot's own normaliser
(memvla tokenises the task and prepares the images itself)."""

from __future__ import annotations

from typing import Any

import torch
from lerobot.processor import (
    AddBatchDimensionProcessorStep,
    DeviceProcessorStep,
    NormalizerProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    RenameObservationsProcessorStep,
    UnnormalizerProcessorStep,
)
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
from lerobot.utils.constants import (
    POLICY_POSTPROCESSOR_DEFAULT_NAME,
    POLICY_PREPROCESSOR_DEFAULT_NAME,
)

from .configuration_memvla import MemvlaConfig


def make_memvla_pre_post_processors(
    config: MemvlaConfig, dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None
) -> tuple[PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
           PolicyProcessorPipeline[PolicyAction, PolicyAction]]:
    features = {**config.input_features, **config.output_features}
    pre = [RenameObservationsProcessorStep(rename_map={}), AddBatchDimensionProcessorStep(),
           DeviceProcessorStep(device=config.device),
           NormalizerProcessorStep(features=features, norm_map=config.normalization_mapping,
                                   stats=dataset_stats)]
    post = [UnnormalizerProcessorStep(features=config.output_features,
                                      norm_map=config.normalization_mapping,
                                      stats=dataset_stats),
            DeviceProcessorStep(device="cpu")]
    return (PolicyProcessorPipeline[dict[str, Any], dict[str, Any]](
                steps=pre, name=POLICY_PREPROCESSOR_DEFAULT_NAME),
            PolicyProcessorPipeline[PolicyAction, PolicyAction](
                steps=post, name=POLICY_POSTPROCESSOR_DEFAULT_NAME,
                to_transition=policy_action_to_transition,
                to_output=transition_to_policy_action))
