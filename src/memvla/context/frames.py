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

Voxel pruning (``context.voxel_size``, ``tokens`` and ``pooled``): the ring also keeps each
frame's memory-token points (the policy gives them with the frame, from its depth, pose and
intrinsics; in training the dataset's history of those features), and of the history's
tokens only the newest per voxel enter the prefix (:mod:`memvla.layers.voxel`); the counts
of the last prefix are in :attr:`FramesContext.last_memory`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..configs import ContextConfig
from ..layers.pooling import pool_grid, pooled_side
from ..layers.temporal_vision import space_time_encode
from ..layers.tokens import TokenSegment
from ..layers.voxel import VoxelPruner
from .base import TemporalContext


class FramesContext(TemporalContext):
    kind = "frames"

    def __init__(self, cfg: ContextConfig, width: int):
        super().__init__()
        self.cfg = cfg
        self.ring = cfg.num_frames * cfg.frame_stride  # R
        self.voxel = None if cfg.voxel_size is None else VoxelPruner(cfg.voxel_size)
        self.last_memory: dict[str, Tensor] = {}  # history tokens of the last prefix (B,)

    @property
    def stateful(self) -> bool:
        return True

    def memory_grid(self, tokens_per_image: int) -> int:
        """The side of a past frame's token grid in the prefix (pooled or not)."""
        side = math.isqrt(tokens_per_image)
        return pooled_side(side, self.cfg.pool_stride) if self.cfg.frames_mode == "pooled" \
            else side

    # -- inference: the frames seen so far ------------------------------------------------
    def _recorded(self, images: list[Tensor], geometry: dict | None) -> list[Tensor]:
        """What the ring holds per frame: every camera's image, and with voxel pruning the
        frame's memory-token points (B, T', 3) and their validity (B, T')."""
        if self.voxel is None:
            return list(images)
        if geometry is None:
            raise ValueError("context.voxel_size: no camera geometry was given with the frame "
                             "(observation.depth / pose / intrinsics)")
        return [*images, geometry["points"], geometry["valid"]]

    def observe(self, state, images: list[Tensor], written=None, geometry=None):
        """Record this step's frame of every camera (B, C, H, W) in the ring (and its
        geometry, for voxel pruning)."""
        parts = self._recorded(images, geometry)
        if state is None:  # the episode's first frame fills the ring
            frames = [x[:, None].repeat_interleave(self.ring, 1) for x in parts]
            return {"frames": frames,  # per camera (B, R, C, H, W), then the points
                    "count": torch.ones(images[0].shape[0], dtype=torch.long,
                                        device=images[0].device)}  # (B,)
        slot = state["count"] % self.ring  # (B,)
        rows = torch.arange(slot.shape[0], device=slot.device)  # (B,)
        for ring, x in zip(state["frames"], parts, strict=True):
            ring[rows, slot] = x.to(ring.dtype)  # in place: the ring is the policy's
        return {"frames": state["frames"], "count": state["count"] + 1}

    def read(self, state, images: list[Tensor], geometry=None) -> dict:
        """The history of the current step: ``images`` per camera (B, K, C, H, W), oldest
        first, as given, and ``valid`` (B, K): which frames exist (the others are the
        episode's first frame); with voxel pruning their ``points`` (B, K, T', 3) and
        ``points_valid`` (B, K, T')."""
        b, dev = images[0].shape[0], images[0].device
        offsets = torch.tensor(self.cfg.history_offsets, device=dev)  # (K,)
        if state is None:  # the first step: only the current frame exists
            history = [x[:, None].repeat_interleave(len(offsets), 1)
                       for x in self._recorded(images, geometry)]  # (B, K, ...)
            valid = torch.zeros(b, len(offsets), dtype=torch.bool, device=dev)  # (B, K)
        else:
            frame = state["count"][:, None] + offsets[None]  # (B, K) frame index t - k·stride
            slots = frame.clamp(min=0) % self.ring  # (B, K)
            rows = torch.arange(b, device=dev)[:, None]  # (B, 1)
            history = [ring[rows, slots] for ring in state["frames"]]  # (B, K, ...)
            valid = frame >= 0  # (B, K)
        out = {"images": history[: len(images)], "valid": valid}
        if self.voxel is not None:
            out["points"], out["points_valid"] = history[len(images):]
        return out

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
            keep = self._keep(state, valid, tokens)  # (B, K, T')
            for j in range(k):
                history.append(TokenSegment(tokens[:, j], keep[:, j],
                                            torch.zeros_like(keep[:, j]).long()))
        return [*history, *parts]

    def _keep(self, state, valid: Tensor, tokens: Tensor) -> Tensor:
        """Which history tokens (B, K, T', D) enter the prefix (B, K, T'): those of the
        frames that exist, and with voxel pruning the newest per voxel of them. Records
        the counts in :attr:`last_memory`."""
        b, k, n = tokens.shape[:3]
        present = valid[:, :, None].expand(b, k, n)  # (B, K, T')
        keep = present if self.voxel is None else self.voxel.frames(
            state["points"], state["points_valid"], present)  # (B, K, T')
        self.last_memory = {"tokens": present.sum((1, 2)), "kept": keep.sum((1, 2))}  # (B,)
        return keep

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"num_frames={c.num_frames}, frame_stride={c.frame_stride}, "
                f"mode={c.frames_mode!r}")
