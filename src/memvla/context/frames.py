"""Frame history as a temporal context: the past ``num_frames`` frames at ``frame_stride``
environment steps, the baseline current memory work reports strongest (LeRobot's visual
memory, MEM, HAMLET's frame stacking).

At inference the policy shows the context every frame (:meth:`FramesContext.observe`);
the carried state is a ring of the last R = ``num_frames · frame_stride`` frames per
camera, as given (uint8 or float, (B, R, C, H, W)), and ``count`` (B,), the frames seen.
When a chunk is predicted at step t, :meth:`FramesContext.read` picks frames t − k·stride
(k = K .. 1, oldest first) and whether each exists (t − k·stride ≥ 0; a missing one is
the episode's first frame, as a dataset clamps it). In training the same history comes
from the dataset (:func:`memvla.policies.frames.frame_delta_indices`), so training sees
what inference sees. Nothing is learnt through time: frames train on frames.

The model reads the history, prepared like the current images (B, K, C, S, S), and its
validity (B, K), through the ``context.frames_mode``:

- ``tokens``: each past frame's image tokens (the same tower) in the prefix before the
  current ones, in the block of the images, masked where the frame does not exist;
- ``pooled``: the same, 2-D pooled (:func:`memvla.layers.pooling.pool_grid`);
- ``mem``: MEM's space-time encoder (:func:`memvla.layers.temporal_vision.
  space_time_encode`): the current image is encoded together with its history, and only
  its own tokens enter the prefix, which does not grow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..configs import ContextConfig
from ..layers.pooling import pool_grid
from ..layers.temporal_vision import space_time_encode
from ..layers.tokens import TokenSegment
from .base import TemporalContext


class FramesContext(TemporalContext):
    kind = "frames"

    def __init__(self, cfg: ContextConfig, width: int):
        super().__init__()
        self.cfg = cfg
        self.ring = cfg.num_frames * cfg.frame_stride  # R

    @property
    def stateful(self) -> bool:
        return True

    # -- inference: the frames seen so far ------------------------------------------------
    def observe(self, state, images: list[Tensor], written=None):
        """Record this step's frame of every camera (B, C, H, W) in the ring."""
        if state is None:  # the episode's first frame fills the ring
            frames = [img[:, None].repeat_interleave(self.ring, 1) for img in images]
            return {"frames": frames,  # per camera (B, R, C, H, W)
                    "count": torch.ones(images[0].shape[0], dtype=torch.long,
                                        device=images[0].device)}  # (B,)
        slot = state["count"] % self.ring  # (B,)
        rows = torch.arange(slot.shape[0], device=slot.device)  # (B,)
        for ring, img in zip(state["frames"], images, strict=True):
            ring[rows, slot] = img.to(ring.dtype)  # in place: the ring is the policy's
        return {"frames": state["frames"], "count": state["count"] + 1}

    def read(self, state, images: list[Tensor]) -> dict:
        """The history of the current step: ``images`` per camera (B, K, C, H, W), oldest
        first, as given, and ``valid`` (B, K): which frames exist (the others are the
        episode's first frame)."""
        b, dev = images[0].shape[0], images[0].device
        offsets = torch.tensor(self.cfg.history_offsets, device=dev)  # (K,)
        if state is None:  # the first step: only the current frame exists
            return {"images": [img[:, None].repeat_interleave(len(offsets), 1)
                               for img in images],  # (B, K, C, H, W)
                    "valid": torch.zeros(b, len(offsets), dtype=torch.bool, device=dev)}
        frame = state["count"][:, None] + offsets[None]  # (B, K) frame index t - k·stride
        slots = frame.clamp(min=0) % self.ring  # (B, K)
        rows = torch.arange(b, device=dev)[:, None]  # (B, 1)
        return {"images": [ring[rows, slots] for ring in state["frames"]],  # (B, K, C, H, W)
                "valid": frame >= 0}  # (B, K)

    # -- the model's side --------------------------------------------------------------------
    def encode_images(self, encoder, images: Tensor, camera: int, state) -> Tensor:
        """MEM: the current image (B, C, S, S) encoded with its history -> (B, Ti, D)."""
        if self.cfg.frames_mode != "mem":
            return encoder(images)
        history = state["images"][camera]  # (B, K, C, S, S)
        frames = torch.cat([history, images[:, None]], 1)  # (B, K + 1, C, S, S)
        return encoder.project(space_time_encode(encoder.vision, frames,
                                                 self.cfg.temporal_every))  # (B, Ti, D)

    def extend_prefix(self, parts: list[TokenSegment], state, encoder=None
                      ) -> list[TokenSegment]:
        """``tokens`` / ``pooled``: the history's image tokens before everything else."""
        if self.cfg.frames_mode == "mem":
            return parts
        valid = state["valid"]  # (B, K)
        history = []
        for images in state["images"]:  # per camera (B, K, C, S, S)
            b, k = images.shape[:2]
            tokens = encoder(images.flatten(0, 1))  # (B·K, Ti, D)
            if self.cfg.frames_mode == "pooled":
                grid = math.isqrt(tokens.shape[1])
                tokens = pool_grid(tokens, grid, self.cfg.pool_stride, self.cfg.pool_mode)
            tokens = tokens.unflatten(0, (b, k))  # (B, K, T', D)
            for j in range(k):
                pad = valid[:, j, None].expand(b, tokens.shape[2])  # (B, T')
                history.append(TokenSegment(tokens[:, j], pad, torch.zeros_like(pad).long()))
        return [*history, *parts]

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"num_frames={c.num_frames}, frame_stride={c.frame_stride}, "
                f"mode={c.frames_mode!r}")
