"""What every memvla policy shares behind the LeRobot-style API, whatever its model family.

A subclass names its ``policy_type`` (the checkpoint's ``type``) and ``family`` (the
``PolicyConfig.family`` it accepts), builds its model in :meth:`build_model` and defines
``forward(batch) -> (loss, info)`` and ``predict_action_chunk(obs)``. This base holds the
rest: input validation and preparation, normalisation (in the processor, outside the model,
saved with the policy), the tokenizer, the action queue of ``select_action``, ``reset``,
the training-progress hook and the safetensors + JSON checkpoints.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config_utils import apply_overrides, to_dict
from ..configs import PolicyConfig
from ..data.tokenizers import make_tokenizer
from .checkpoint import (
    PROCESSOR_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    check_keys,
    check_shapes,
    checkpoint_files,
    read_policy_config,
    read_tensors,
    resolve_checkpoint,
    upgrade_keys,
    write_checkpoint,
)
from .episodes import ContextPolicyMixin
from .experience import ExperiencePolicyMixin
from .inputs import check_observation, images_to_float
from .processor import Normalizer, resize_with_pad, state_prompts


def pad_last(x: Tensor, size: int) -> Tensor:
    """Zero-pad the last axis to ``size`` (state/action to max_state_dim/max_action_dim)."""
    return F.pad(x, (0, size - x.shape[-1]))


class VLAPolicy(ExperiencePolicyMixin, ContextPolicyMixin, nn.Module):
    """Base of the policies: config -> model + processors + tokenizer + action queue."""

    policy_type: str = ""
    family: str = ""
    # the attributes one episode lives in, besides the action queue (a server swaps them)
    episode_attrs: tuple[str, ...] = ("_context_state",)

    def __init__(self, config: PolicyConfig, stats: dict[str, dict[str, Tensor]] | None = None):
        super().__init__()
        if config.family != self.family:
            raise ValueError(f"{type(self).__name__} builds family {self.family!r} models, the "
                             f"config has family {config.family!r}; use "
                             "memvla.policies.make_policy(config), which picks the class")
        self.config = config
        self.model = self.build_model(config)
        self.normalizer = Normalizer(config.normalization, stats)
        self.tokenizer = make_tokenizer(config.tokenizer)
        vocab = config.model.text.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but "
                             f"model.text.vocab_size is {vocab}; raise model.text.vocab_size")
        if getattr(config.model, "action_head", "l1") == "text" and (
                self.tokenizer.vocab_size > config.model.first_action_id):
            raise ValueError(f"model.action_head='text' uses the last {config.model.text_actions}"
                             f" ids of the vocabulary as action tokens, but the tokenizer has "
                             f"{self.tokenizer.vocab_size} tokens; raise model.text.vocab_size "
                             f"to at least {self.tokenizer.vocab_size + config.model.text_actions}")
        self._queue: deque[Tensor] = deque()
        self._context_state = None  # the temporal context's state, carried between chunks

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` / ``.cuda()`` also place the normaliser's statistics (float32)."""
        out = super()._apply(fn, recurse)
        if any(True for _ in self.parameters()):
            self.normalizer.to(self.device)
        return out

    @classmethod
    def build_model(cls, config: PolicyConfig) -> nn.Module:
        """The model of ``config`` (with its temporal context), no processors."""
        raise NotImplementedError

    @property
    def queued_actions(self) -> int:
        """Actions left in the queue: the next ``select_action`` predicts a chunk iff 0."""
        return len(self._queue)

    @property
    def context_state(self):
        """The temporal context's state carried to the next chunk (:mod:`memvla.context`),
        or None (a fresh episode, or a context that carries nothing)."""
        return self._context_state

    @property
    def memory(self):
        """The same as :attr:`context_state` (for memory tokens: the memory (B, M, D))."""
        return self._context_state

    @property
    def is_recurrent(self) -> bool:
        """True when the policy's temporal context is trained through whole episodes
        (memory tokens); a frame-history policy trains on frames."""
        return self.config.context.recurrent

    @property
    def device(self) -> torch.device:
        """Where the model's weights are; inputs are moved there."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's weights (float32, bfloat16, ...); inputs are
        cast to it after normalisation (which runs in float32)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    # -- inputs ---------------------------------------------------------------------------
    def encode_observation(self, batch: dict):
        """Validate and prepare model inputs on the model's device and in its dtype: images
        per camera (B, C, S, S) in [-1, 1], language ids/pad (B, Nl), normalised state
        padded to max_state_dim (B, Ds'). uint8 images are moved as bytes and converted on
        the device."""
        return self._encode(batch)[1]

    def _encode(self, batch: dict):
        """-> (the checked images per camera (B, C, H, W) as given, on the device: what a
        temporal context records; the model inputs of :meth:`encode_observation`)."""
        cfg = self.config
        images, state, tasks = check_observation(batch, cfg)
        dev, dtype = self.device, self.dtype
        raw = [img.to(dev, non_blocking=True) for img in images]
        state = self.normalizer.normalize("observation.state", state.to(dev))  # (B, Ds)
        state = pad_last(state, cfg.model.max_state_dim).to(dtype)  # (B, Ds')
        if getattr(cfg.model, "state_token", None) == "prompt":  # π0.5: in the prompt
            tasks = state_prompts(tasks, state)
        ids, pad = self.tokenize(tasks)  # (B, Nl)
        return raw, (self.prepare_images(raw), ids.to(dev), pad.to(dev), state)

    def prepare_images(self, images: list[Tensor]) -> list[Tensor]:
        """Checked images per camera (..., C, H, W) (uint8, or float in [0, 1]) on the
        device -> the vision tower's input (..., C, S, S) in [-1, 1] in the model's dtype."""
        size, out = self.config.model.vision.image_size, []
        for img in images:
            lead = img.shape[:-3]
            x = images_to_float(img.reshape(-1, *img.shape[-3:]), self.dtype)  # (N, C, H, W)
            x = resize_with_pad(x, size, self.config.image_pad) * 2 - 1  # (N, C, S, S)
            out.append(x.reshape(*lead, *x.shape[1:]))
        return out

    def observed_images(self, obs: dict) -> list[Tensor]:
        """The observation's checked images per camera (B, C, H, W), as given, on the
        device (what a temporal context records)."""
        images, _, _ = check_observation(obs, self.config)
        return [img.to(self.device, non_blocking=True) for img in images]

    def tokenize(self, tasks: list[str]) -> tuple[Tensor, Tensor]:
        """Task strings -> ids and real-token flags (B, Nl), on the CPU."""
        return self.tokenizer(tasks)

    # -- training -------------------------------------------------------------------------
    def _reduce(self, losses: Tensor, valid: Tensor) -> Tensor:
        """Mean of per-element losses (B, A, Da) over the real action steps (valid (B, A))."""
        denom = valid.sum() * self.config.action_dim
        if denom == 0:
            raise ValueError("action_is_pad: every action step of the batch is padding")
        return (losses * valid[..., None]).sum() / denom

    def set_training_progress(self, frac: float) -> None:
        """Tell the model how far training is (0 → 1), e.g. for the pruner's noise decay;
        a no-op for models without a schedule."""
        pruner = getattr(self.model, "pruner", None)
        if pruner is not None:
            pruner.set_progress(frac)

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def select_action(self, obs: dict, noise: Tensor | None = None) -> Tensor:
        """-> the next action (B, action_dim); a new chunk is predicted every
        ``n_action_steps`` calls. Every observation is validated, queued actions or not.
        ``noise`` (B, chunk_size, max_action_dim) is the sampling noise of the chunk when
        one is predicted (ignored otherwise, and by deterministic families)."""
        if not self._queue:  # predicting a chunk also shows the temporal context the frame
            chunk = self.predict_action_chunk(obs, noise=noise)[:, : self.config.n_action_steps]
            self._queue.extend(chunk.transpose(0, 1))  # n_action_steps × (B, Da)
        elif self.writes_with(len(self._queue)):
            self.write_observation(obs)  # context.observe_every: the chunk is executing
        elif self.model.context.stateful:  # e.g. frame history records every frame
            self.observe(obs)
        else:
            check_observation(obs, self.config)
        return self._queue.popleft()

    def observe(self, obs: dict) -> None:
        """Show a stateful temporal context the frame of a step that predicts no chunk."""
        images = self.observed_images(obs)
        self._context_state = self.model.context.observe(
            self._context_state, images, geometry=self.step_geometry(obs, images[0].shape[0]))

    def episode_state(self) -> dict:
        """The episode this policy carries, without its action queue (what a server keeps
        per session and swaps in around each call)."""
        return {name: getattr(self, name) for name in self.episode_attrs}

    def load_episode_state(self, state: dict | None) -> None:
        """Carry ``state`` (from :meth:`episode_state`; None: a fresh episode) from now on;
        the action queue is cleared."""
        self._queue.clear()
        for name in self.episode_attrs:
            setattr(self, name, None if state is None else state[name])

    def reset(self) -> None:
        """Forget the episode: clears the action queue and the temporal context's state."""
        self._queue.clear()
        self._context_state = None
        if getattr(self.model, "vision_reuse", None) is not None:
            self.model.vision_reuse.reset()  # the previous frame is another episode's

    # -- persistence ----------------------------------------------------------------------
    def checkpoint_files(self) -> dict[str, bytes]:
        """The policy's checkpoint files by name (config, weights, processor), serialised."""
        config = to_dict(self.config)
        tokenizer_files = {}
        if self.config.tokenizer.kind == "hf":  # the tokenizer travels with the weights
            config["tokenizer"]["path"] = TOKENIZER_DIR
            tokenizer_files = {f"{TOKENIZER_DIR}/{name}": data
                               for name, data in self.tokenizer.files().items()}
        return {**checkpoint_files(self.policy_type, config, self.model.state_dict(),
                                   self.normalizer.state_dict()), **tokenizer_files}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write (or replace, as a whole and atomically) the checkpoint ``directory``."""
        return write_checkpoint(directory, self.checkpoint_files())

    def load_weights(self, directory: str | Path) -> None:
        """Load a checkpoint's model weights (and normaliser) into this policy, in place.
        The checkpoint must be of this policy's type, temporal context and shapes; any
        difference is an error naming it."""
        d = resolve_checkpoint(directory)
        saved_config = self._saved_config(d)
        mine, theirs = (getattr(c.model, "backbone", "transformer")
                        for c in (self.config, saved_config))
        if mine != theirs:
            raise ValueError(f"{d / 'config.json'}: a checkpoint of another backbone: "
                             f"model.backbone is {theirs!r} there, {mine!r} here")
        saved = saved_config.context
        if saved != self.config.context:
            diff = [f"context.{k} is {getattr(saved, k)!r} there, {v!r} here"
                    for k, v in vars(self.config.context).items() if getattr(saved, k) != v]
            raise ValueError(f"{d / 'config.json'}: a checkpoint of another temporal context: "
                             + "; ".join(diff) + " (load it with load_policy, or make this "
                             "policy with its context)")
        weights = self._checked_weights(d)
        self.model.load_state_dict(weights)  # copied onto the model's device and dtype
        self.normalizer = Normalizer.from_state_dict(
            self.config.normalization, read_tensors(d / PROCESSOR_FILE))

    def _checked_weights(self, d: Path) -> dict[str, Tensor]:
        """The checkpoint ``d``'s weights, checked against this policy's names and shapes."""
        weights = upgrade_keys(read_tensors(d / WEIGHTS_FILE))
        own = self.model.state_dict()
        check_keys(d / WEIGHTS_FILE, set(own), set(weights))
        check_shapes(d / WEIGHTS_FILE, weights, own)
        return weights

    @classmethod
    def _saved_config(cls, d: Path) -> PolicyConfig:
        """The policy config of checkpoint ``d``, which must be of this policy's type."""
        policy_type, config = read_policy_config(d)
        if policy_type != cls.policy_type:
            raise ValueError(f"{d / 'config.json'}: policy type {policy_type!r}, expected "
                             f"{cls.policy_type!r}")
        return config

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        overrides: list[str] | None = None):
        """The policy of checkpoint ``directory`` on ``device``. ``overrides``: dotted
        options of its config changed for this use (``context.voxel_size=0.5``,
        ``model.num_steps=5``, ``n_action_steps=4``): any that keeps the weights' names and
        shapes (a change that does not is an error naming the keys)."""
        d = Path(directory)
        config = cls._saved_config(d)
        if overrides:
            config = apply_overrides(config, list(overrides))
        with torch.device("meta"):  # no random initialisation: every weight is loaded
            policy = cls(config)
        policy.normalizer = Normalizer.from_state_dict(config.normalization,
                                                       read_tensors(d / PROCESSOR_FILE))
        policy.model.load_state_dict(policy._checked_weights(d), assign=True)
        return policy.to(device)
