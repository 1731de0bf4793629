"""The flow-matching VLA behind the LeRobot-style policy API.

``forward(batch) -> (loss, info)``, ``predict_action_chunk(obs) -> (B, A, action_dim)``,
``select_action(obs) -> (B, action_dim)`` popping from a queue of ``n_action_steps``,
``reset()``. Inputs use LeRobot keys (``observation.images.<camera>``,
``observation.state``, ``task``, ``action``, ``action_is_pad``) and are validated;
normalisation happens in the processor, outside the model, and is saved with the policy.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config_utils import from_dict, to_dict
from ..configs import PolicyConfig
from ..data.tokenizers import make_tokenizer
from ..models.flow_vla import FlowMatchingVLA
from .checkpoint import (
    PROCESSOR_FILE,
    WEIGHTS_FILE,
    check_keys,
    read_config,
    read_tensors,
    write_checkpoint,
)
from .inputs import check_actions, check_observation
from .processor import Normalizer, resize_with_pad


def pad_last(x: Tensor, size: int) -> Tensor:
    """Zero-pad the last axis to ``size`` (state/action to max_state_dim/max_action_dim)."""
    return F.pad(x, (0, size - x.shape[-1]))


class FlowVLAPolicy(nn.Module):
    policy_type = "flow_vla"

    def __init__(self, config: PolicyConfig, stats: dict[str, dict[str, Tensor]] | None = None):
        super().__init__()
        self.config = config
        self.model = FlowMatchingVLA(config.model, config.context)
        self.normalizer = Normalizer(config.normalization, stats)
        self.tokenizer = make_tokenizer(config.tokenizer)
        vocab = config.model.text.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but "
                             f"model.text.vocab_size is {vocab}; raise model.text.vocab_size")
        self._queue: deque[Tensor] = deque()
        self._memory: Tensor | None = None  # (B, M, D) carried between chunks

    @property
    def queued_actions(self) -> int:
        """Actions left in the queue: the next ``select_action`` predicts a chunk iff 0."""
        return len(self._queue)

    @property
    def memory(self) -> Tensor | None:
        """The memory carried to the next chunk (B, M, D), or None (fresh episode / none)."""
        return self._memory

    @property
    def is_recurrent(self) -> bool:
        """True when the policy carries memory from chunk to chunk (trained on episodes)."""
        return self.config.context.recurrent

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- inputs ---------------------------------------------------------------------------
    def encode_observation(self, batch: dict):
        """Validate and prepare model inputs: images per camera (B, C, S, S) in [-1, 1],
        language ids/pad (B, Nl), normalised state padded to max_state_dim (B, Ds')."""
        cfg = self.config
        images, state, tasks = check_observation(batch, cfg)
        dev = self.device
        size = cfg.model.vision.image_size
        images = [resize_with_pad(img.to(dev), size, cfg.image_pad) * 2 - 1 for img in images]
        ids, pad = self.tokenizer(tasks)  # (B, Nl)
        state = self.normalizer.normalize("observation.state", state.to(dev))  # (B, Ds)
        return images, ids.to(dev), pad.to(dev), pad_last(state, cfg.model.max_state_dim)

    # -- training -------------------------------------------------------------------------
    def forward(self, batch, noise: Tensor | None = None, time: Tensor | None = None,
                bptt_depth: int = -1, max_segments: int | None = None) -> tuple[Tensor, dict]:
        """Flow-matching loss of independent samples: mean squared error over the real (not
        padded) action steps and the real action dimensions. A memory policy starts from
        its initial memory here. Given a ``SegmentBatch`` (whole episodes), this is
        :meth:`forward_episode` (so that DDP wrappers see one forward call)."""
        if not isinstance(batch, dict):
            return self.forward_episode(batch, bptt_depth, max_segments)
        losses, valid, _ = self._segment_losses(batch, None, noise, time)
        loss = self._reduce(losses, valid)
        return loss, {"loss": loss.item(), "valid_steps": int(valid.sum().item())}

    def _segment_losses(self, batch: dict, memory: Tensor | None, noise: Tensor | None = None,
                        time: Tensor | None = None):
        images, ids, pad, state = self.encode_observation(batch)
        actions, is_pad = check_actions(batch, self.config, state.shape[0])
        actions = self.normalizer.normalize("action", actions.to(state.device))  # (B, A, Da)
        padded = pad_last(actions, self.config.model.max_action_dim)  # (B, A, Da')
        if memory is None:
            memory = self.model.initial_memory(state.shape[0])
        losses, new_memory = self.model(images, ids, pad, state, padded, noise, time,
                                        memory=memory)  # (B, A, Da')
        valid = (~is_pad.to(state.device)).float()  # (B, A)
        return losses[..., : self.config.action_dim], valid, new_memory

    def _reduce(self, losses: Tensor, valid: Tensor) -> Tensor:
        denom = valid.sum() * self.config.action_dim
        if denom == 0:
            raise ValueError("action_is_pad: every action step of the batch is padding")
        return (losses * valid[..., None]).sum() / denom

    def forward_episode(self, episodes, bptt_depth: int = -1,
                        max_segments: int | None = None) -> tuple[Tensor, dict]:
        """Loss over whole episodes cut into chunk-aligned segments (a
        :class:`memvla.data.segments.SegmentBatch`), carrying the memory from segment to
        segment in lockstep across the batch.

        Truncated back-propagation through time of depth k = ``bptt_depth``: the carried
        memory is detached before segments s > 0 with s % (k + 1) == 0, so the loss of a
        segment back-propagates through at most k memory updates; k = 0 detaches every
        segment (independent samples), k = -1 keeps the whole episode.
        """
        a = self.config.model.chunk_size
        s_total = episodes.num_segments if max_segments is None else min(
            max_segments, episodes.num_segments)
        if bptt_depth < -1:
            raise ValueError(f"bptt_depth must be >= -1, got {bptt_depth}")
        if bptt_depth > s_total:
            raise ValueError(f"bptt_depth ({bptt_depth}) is larger than the number of segments "
                             f"({s_total}); use at most {s_total}, or -1 for the whole episode")
        if episodes.action.shape[2] != a:
            raise ValueError(f"segments hold chunks of {episodes.action.shape[2]} actions, the "
                             f"policy's chunk_size is {a}; build them with "
                             f"EpisodeSegmentLoader(chunk_size={a})")
        starts = torch.arange(episodes.num_segments) * a  # (S,)
        real = ~episodes.segment_is_pad  # (B, S)
        misaligned = real & (episodes.frame_index != starts[None])
        if misaligned.any():
            b, s = misaligned.nonzero()[0].tolist()
            raise ValueError(
                f"segment {s} of episode {int(episodes.episode_index[b])} starts at frame "
                f"{int(episodes.frame_index[b, s])}, not at {s * a}: episodes must be cut at "
                f"multiples of chunk_size={a} from their first frame (use "
                f"EpisodeSegmentLoader(chunk_size={a}))")
        memory = None
        total, count = 0.0, 0.0
        for s in range(s_total):
            if memory is not None and bptt_depth >= 0 and s % (bptt_depth + 1) == 0:
                memory = memory.detach()
            seg = episodes.segment(s)
            losses, valid, new_memory = self._segment_losses(seg, memory)
            total = total + (losses * valid[..., None]).sum()
            count = count + valid.sum() * self.config.action_dim
            if new_memory is not None:
                keep = seg["segment_is_pad"].to(new_memory.device)[:, None, None]  # (B, 1, 1)
                memory = torch.where(keep, memory if memory is not None else new_memory,
                                     new_memory)
        if count == 0:
            raise ValueError("action_is_pad: every action step of the episodes is padding")
        loss = total / count
        return loss, {"loss": loss.item(), "valid_steps": int(count / self.config.action_dim),
                      "segments": s_total}

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, obs: dict, noise: Tensor | None = None) -> Tensor:
        """-> unnormalised actions (B, chunk_size, action_dim). A memory policy reads its
        memory and writes the next one (one update per predicted chunk)."""
        images, ids, pad, state = self.encode_observation(obs)
        b = state.shape[0]
        memory = self._memory
        if memory is not None and memory.shape[0] != b:
            raise ValueError(f"observation batch size {b} differs from the {memory.shape[0]} "
                             "episodes this policy remembers; call reset() first")
        if memory is None:
            memory = self.model.initial_memory(b)
        x, new_memory = self.model.sample_actions(images, ids, pad, state, noise,
                                                  memory=memory)  # (B, A, Da')
        self._memory = None if new_memory is None else new_memory.detach()
        x = x[..., : self.config.action_dim]  # (B, A, Da)
        return self.normalizer.unnormalize("action", x)

    @torch.no_grad()
    def select_action(self, obs: dict) -> Tensor:
        """-> the next action (B, action_dim); a new chunk is predicted every
        ``n_action_steps`` calls. Every observation is validated, queued actions or not."""
        check_observation(obs, self.config)
        if not self._queue:
            chunk = self.predict_action_chunk(obs)[:, : self.config.n_action_steps]
            self._queue.extend(chunk.transpose(0, 1))  # n_action_steps × (B, Da)
        return self._queue.popleft()

    def reset(self) -> None:
        """Forget the episode: clears the action queue and the memory."""
        self._queue.clear()
        self._memory = None

    # -- persistence ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        return write_checkpoint(directory, self.policy_type, to_dict(self.config),
                                self.model.state_dict(), self.normalizer.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"):
        d = Path(directory)
        meta = read_config(d)
        if meta["type"] != cls.policy_type:
            raise ValueError(f"{d / 'config.json'}: policy type {meta['type']!r}, expected "
                             f"{cls.policy_type!r}")
        config = from_dict(PolicyConfig, meta["config"])
        weights = read_tensors(d / WEIGHTS_FILE)
        processor = read_tensors(d / PROCESSOR_FILE)
        policy = cls(config)
        policy.normalizer = Normalizer.from_state_dict(config.normalization, processor)
        own = policy.model.state_dict()
        check_keys(d / WEIGHTS_FILE, set(own), set(weights))
        for k, v in weights.items():
            if v.shape != own[k].shape:
                raise ValueError(f"{d / WEIGHTS_FILE}: {k} has shape {tuple(v.shape)}, the "
                                 f"config expects {tuple(own[k].shape)}")
        policy.model.load_state_dict(weights)
        return policy.to(device)
