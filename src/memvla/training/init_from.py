"""Starting a run from a checkpoint (``memvla train --init-from CKPT``) and freezing parts.

The run's policy config is the checkpoint's with the command line's overrides applied, so
a temporal context (``policy.context.kind=memory_tokens``), a pruner or another chunk can
be added to an imported or trained policy. The checkpoint's weights are loaded by name;
parameters the new config adds (memory tokens, a pruner) keep their fresh initialisation
and are listed; a checkpoint weight the new model has no place for, or one whose shape the
overrides changed, is an error naming it. ``train.freeze`` then stops the gradient of whole
parts (``vision``, ``connector``, ``text``, ``vlm``, ``expert``) or of any parameter-name
prefix.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..configs import PolicyConfig
from ..policies.checkpoint import (
    WEIGHTS_FILE,
    check_shapes,
    read_policy_config,
    read_tensors,
    resolve_checkpoint,
    upgrade_keys,
)
from ..utils import did_you_mean

# train.freeze names -> parameter-name prefixes of the flow family's model
FREEZE_GROUPS = {
    "vision": ("vlm_with_expert.vlm.model.vision_model.",),
    "connector": ("vlm_with_expert.vlm.model.connector.",),
    "text": ("vlm_with_expert.vlm.model.text_model.", "vlm_with_expert.vlm.lm_head."),
    "vlm": ("vlm_with_expert.vlm.",),
    "expert": ("vlm_with_expert.lm_expert.",),
}


def checkpoint_policy_config(path: str | Path) -> tuple[Path, PolicyConfig]:
    """(the checkpoint directory, its policy config) of a checkpoint or a run's last one."""
    d = resolve_checkpoint(path)
    return d, read_policy_config(d)[1]


def load_init_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Copy checkpoint ``path``'s weights into ``model`` by name -> the names of the
    parameters the checkpoint does not have (left as initialised)."""
    d = resolve_checkpoint(path)
    weights = upgrade_keys(read_tensors(d / WEIGHTS_FILE))
    own = model.state_dict()
    extra = sorted(set(weights) - set(own))
    if extra:
        raise ValueError(f"{d / WEIGHTS_FILE}: {len(extra)} weights have no place in the new "
                         f"config's model: {extra[:6]}")
    check_shapes(d / WEIGHTS_FILE, weights, own,
                 "the new config's model (an override changed it) expects")
    model.load_state_dict(weights, strict=False)
    return sorted(set(own) - set(weights))


def freeze(model: nn.Module, names: list[str]) -> list[str]:
    """Stop the gradient of the parameters ``names`` select (groups of
    :data:`FREEZE_GROUPS` or parameter-name prefixes) -> the frozen parameters' names."""
    params = dict(model.named_parameters())
    frozen: list[str] = []
    for name in names:
        prefixes = FREEZE_GROUPS.get(name, (name,))
        hit = [p for p in params if p.startswith(prefixes)]
        if not hit:
            raise ValueError(f"train.freeze: {name!r} names no parameter; expected one of "
                             f"{sorted(FREEZE_GROUPS)} or a parameter-name prefix ("
                             f"{did_you_mean(name, FREEZE_GROUPS, 'group')})")
        for p in hit:
            params[p].requires_grad_(False)
        frozen += hit
    return sorted(set(frozen))
