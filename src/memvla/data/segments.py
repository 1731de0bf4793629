"""Whole episodes as consecutive action-chunk segments, batched for recurrent training.

An episode of T frames is cut into S_e = ceil(T / R) segments, one every R frames (the
stride R: a policy's ``n_action_steps``, how often it predicts a chunk; R = A, the chunk
size, by default): segment s starts at frame s*R, and holds the observation at that frame
and the action chunk of frames s*R .. s*R + A - 1 (chunks overlap when R < A, as the chunks
a policy predicts every R steps do). A policy with memory reads segment 0, 1, 2, ... in
order, carrying its state (one memory update per segment, as at inference one per
predicted chunk), and back-propagates through time over them (truncated BPTT).

``EpisodeSegmentLoader`` batches B episodes of different lengths: every tensor gets the
shape (B, S, ...) with S the largest S_e in the batch. Shapes of a ``SegmentBatch``:

====================  ===================  ==============================================
observation[key]      (B, S, C, H, W)      images, float32 in [0, 1] (uint8 (B, S, H, W, C)
                                           for a dataset read with images_as="uint8")
observation[key]      (B, S, Ds)           vector features (e.g. observation.state)
action                (B, S, A, Da)        the action chunk of every segment
action_is_pad         (B, S, A) bool       True past the episode's end (those actions
                                           repeat its last action) and in padded segments
segment_is_pad        (B, S) bool          True for segments s >= S_e (all values zero)
frame_index           (B, S) int64         first frame of each segment (s*R)
episode_index         (B,) int64           the episodes' episode_index
length                (B,) int64           T of each episode
task                  list[str] (B)        the task of each episode (of its first frame)
====================  ===================  ==============================================
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memvla.data.lerobot_v3_read import LeRobotV3Dataset, to_tensor


@dataclass
class SegmentBatch:
    """A batch of episodes cut into segments (shapes in the module doc)."""

    observation: dict[str, torch.Tensor]
    action: torch.Tensor
    action_is_pad: torch.Tensor
    segment_is_pad: torch.Tensor
    frame_index: torch.Tensor
    episode_index: torch.Tensor
    length: torch.Tensor
    task: list[str]

    @property
    def num_segments(self) -> int:
        return self.segment_is_pad.shape[1]

    def segment(self, s: int) -> dict:
        """LeRobot-style batch of segment ``s``: ``{key: (B, ...)}``, ``action`` (B, A, Da),
        ``action_is_pad`` (B, A), ``segment_is_pad`` (B,), ``task`` list[str]."""
        out = {key: value[:, s] for key, value in self.observation.items()}
        out["action"] = self.action[:, s]
        out["action_is_pad"] = self.action_is_pad[:, s]
        out["segment_is_pad"] = self.segment_is_pad[:, s]
        out["task"] = self.task
        return out

    def pin_memory(self) -> SegmentBatch:
        """The batch in page-locked memory (a DataLoader with ``pin_memory=True`` calls it)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SegmentBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, fn) -> SegmentBatch:
        return SegmentBatch(
            observation={k: fn(v) for k, v in self.observation.items()},
            action=fn(self.action),
            action_is_pad=fn(self.action_is_pad),
            segment_is_pad=fn(self.segment_is_pad),
            frame_index=fn(self.frame_index),
            episode_index=fn(self.episode_index),
            length=fn(self.length),
            task=self.task,
        )


class EpisodeSegmentLoader:
    """Iterate over batches of whole episodes cut into segments.

    Args:
        dataset: a ``LeRobotV3Dataset``.
        chunk_size: A, the actions per segment (the policy's action chunk).
        stride: R, the frames from one segment to the next (the policy's
            ``n_action_steps``; None = ``chunk_size``), 1 <= R <= A.
        batch_size: B, episodes per batch (the last batch may be smaller).
        shuffle: shuffle the episodes every epoch (a new order on every ``iter()``).
        seed: seed of the shuffling; epoch k uses ``(seed, k)``.
        drop_last: drop a last batch smaller than B.
        observation_keys: features given at the start of each segment (default: every
            feature whose name starts with "observation.").
        action_key: the feature cut into action chunks.
    """

    def __init__(
        self,
        dataset: LeRobotV3Dataset,
        chunk_size: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        observation_keys: Sequence[str] | None = None,
        action_key: str = "action",
        stride: int | None = None,
    ):
        if chunk_size < 1 or batch_size < 1:
            raise ValueError(f"chunk_size and batch_size must be >= 1 ({chunk_size}, {batch_size})")
        stride = chunk_size if stride is None else stride
        if not 1 <= stride <= chunk_size:
            raise ValueError(f"stride must be in [1, chunk_size={chunk_size}], got {stride}")
        self.dataset = dataset
        self.chunk_size = int(chunk_size)
        self.stride = int(stride)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        if observation_keys is None:
            observation_keys = [k for k in dataset.features if k.startswith("observation.")]
        for key in [*observation_keys, action_key]:
            if key not in dataset.features:
                raise ValueError(f"{key!r} is not a feature of {dataset.root}")
        self.observation_keys = list(observation_keys)
        self.action_key = action_key
        self.epoch = 0

    def __len__(self) -> int:
        n = self.dataset.num_episodes
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[SegmentBatch]:
        order = np.arange(self.dataset.num_episodes)
        if self.shuffle:
            np.random.default_rng((self.seed, self.epoch)).shuffle(order)
        self.epoch += 1
        for b in range(len(self)):
            yield self.collate(order[b * self.batch_size : (b + 1) * self.batch_size])

    def collate(self, episodes: np.ndarray) -> SegmentBatch:
        """The batch of these episodes (0-based positions in the dataset)."""
        ds, a, r = self.dataset, self.chunk_size, self.stride
        episodes = np.asarray(episodes, dtype=np.int64)
        if episodes.size == 0:
            raise ValueError("EpisodeSegmentLoader.collate: no episodes given (an empty batch)")
        starts = ds.episode_starts[episodes]  # (B,)
        lengths = ds.episode_lengths[episodes]  # (B,)
        n_seg = -(-lengths // r)  # (B,) ceil(T / R)
        s_max = int(n_seg.max())
        seg = np.arange(s_max)  # (S,)
        segment_is_pad = seg[None, :] >= n_seg[:, None]  # (B, S)
        first = seg[None, :] * r  # (1, S) first step of each segment
        frame_first = np.where(segment_is_pad, 0, first)  # (B, S)
        # frame positions of every segment's observation, kept inside the episode
        obs_frames = starts[:, None] + frame_first  # (B, S)
        steps = first[:, :, None] + np.arange(a)  # (1, S, A) step within the episode
        action_is_pad = steps >= lengths[:, None, None]  # (B, S, A)
        act_frames = starts[:, None, None] + np.minimum(steps, lengths[:, None, None] - 1)

        observation = {}
        for key in self.observation_keys:
            values = ds.get_numpy(key, obs_frames)  # (B, S, ...)
            values[segment_is_pad] = 0
            observation[key] = to_tensor(values, key in ds.image_keys, ds.images_as)
        actions = ds.get_numpy(self.action_key, act_frames)  # (B, S, A, Da)
        actions[segment_is_pad] = 0
        return SegmentBatch(
            observation=observation,
            action=torch.from_numpy(actions),
            action_is_pad=torch.from_numpy(action_is_pad),
            segment_is_pad=torch.from_numpy(segment_is_pad),
            frame_index=torch.from_numpy(frame_first.astype(np.int64)),
            episode_index=torch.from_numpy(ds.episode_index[episodes].copy()),
            length=torch.from_numpy(lengths.copy()),
            task=[ds.task_at(int(s)) for s in starts],
        )
