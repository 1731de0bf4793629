"""The parallel-decoding VLA (OpenVLA-OFT family) behind the LeRobot-style policy API.

``forward(batch) -> (loss, info)`` is the L1 loss of the regressed chunk over the real
(not padded) action steps and the real action dimensions; ``predict_action_chunk`` decodes
the whole chunk in one pass (deterministic: no noise). The queue, ``reset``, inputs and
checkpoints are shared with the other policies (:mod:`.base`). No memory is carried
(``memory`` is None, ``is_recurrent`` False). With ``model.pruner.enabled`` the info holds
the pruner's statistics and ``set_training_progress(frac)`` drives its noise schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..configs import PolicyConfig
from ..layers.token_pruner import stats_to_floats
from ..models.parallel_vla import ParallelVLA
from .base import VLAPolicy, pad_last
from .inputs import check_actions


def drop_bos(ids: Tensor, pad: Tensor, bos_id: int | None) -> tuple[Tensor, Tensor]:
    """ids/pad (B, Nl) -> (B, Nl - 1) without a leading BOS when every prompt has one;
    unchanged when none has (or the tokenizer has no BOS)."""
    if bos_id is None:
        return ids, pad
    first = (ids[:, 0] == bos_id) & pad[:, 0]  # (B,)
    if bool(first.all()):
        return ids[:, 1:], pad[:, 1:]
    if bool(first.any()):
        raise ValueError(f"task: the tokenizer put BOS (id {bos_id}) before "
                         f"{int(first.sum())} of {len(first)} prompts; expected all or none")
    return ids, pad


class ParallelVLAPolicy(VLAPolicy):
    policy_type = "parallel_vla"
    family = "parallel"

    @classmethod
    def build_model(cls, config: PolicyConfig) -> ParallelVLA:
        return ParallelVLA(config.model, num_cameras=len(config.cameras))

    def tokenize(self, tasks: list[str]) -> tuple[Tensor, Tensor]:
        """The prompt without the tokenizer's BOS (the model puts its own first)."""
        ids, pad = self.tokenizer(tasks)  # (B, Nl)
        return drop_bos(ids, pad, getattr(self.tokenizer, "bos_id", None))

    def forward(self, batch: dict) -> tuple[Tensor, dict]:
        if not isinstance(batch, dict):
            raise ValueError("the parallel VLA trains on frames with action chunks (a dict "
                             f"batch), got {type(batch).__name__}; it carries no memory "
                             "through episodes")
        images, ids, pad, state = self.encode_observation(batch)
        actions, is_pad = check_actions(batch, self.config, state.shape[0])
        actions = self.normalizer.normalize("action", actions.to(state.device))  # (B, A, Da)
        padded = pad_last(actions, self.config.model.max_action_dim)  # (B, A, Da')
        losses, stats = self.model(images, ids, pad, state, padded)  # (B, A, Da')
        valid = (~is_pad.to(state.device)).float()  # (B, A)
        loss = self._reduce(losses[..., : self.config.action_dim], valid)
        info = {"loss": loss.item(), "valid_steps": int(valid.sum().item())}
        info.update({f"pruner_{k}": v for k, v in stats_to_floats(stats).items()})
        return loss, info

    @torch.no_grad()
    def predict_action_chunk(self, obs: dict, noise: Tensor | None = None) -> Tensor:
        """-> unnormalised actions (B, chunk_size, action_dim). ``noise`` is accepted for
        the common API and ignored (the chunk is regressed, not sampled)."""
        images, ids, pad, state = self.encode_observation(obs)
        x = self.model.predict(images, ids, pad, state)  # (B, A, Da')
        x = x[..., : self.config.action_dim]  # (B, A, Da)
        return self.normalizer.unnormalize("action", x)
