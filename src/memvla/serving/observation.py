"""A robot's observation message -> a policy batch of one, checked; and the ``--keymap``.

A message is one robot's observation without a batch axis, under memvla's (LeRobot's)
names: ``observation.images.<camera>`` as uint8 (H, W, C) (or uint8 / float in [0, 1]
(C, H, W)), ``observation.state`` (Ds,), ``task`` a string; with voxel pruning also
``observation.depth`` / ``pose`` / ``intrinsics``. A keymap renames a robot's own keys
(``image=observation.images.top``) before anything is checked. Other keys are ignored
(openpi clients often send extras). Every problem is a ``ValueError`` that names the key,
the expected and the received value, and is answered to that session only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..configs import PolicyConfig
from ..policies.inputs import DEPTH_KEY, INTRINSICS_KEY, POSE_KEY, check_observation

STATE_KEY = "observation.state"
TASK_KEY = "task"


def parse_keymap(items: list[str] | None) -> dict[str, str]:
    """``["robot_key=memvla_key", ...]`` -> ``{robot_key: memvla_key}``."""
    out: dict[str, str] = {}
    for item in items or []:
        robot, sep, ours = item.partition("=")
        if not sep or not robot or not ours:
            raise ValueError(f"--keymap: expected ROBOT_KEY=MEMVLA_KEY, got {item!r}")
        if robot in out:
            raise ValueError(f"--keymap: {robot!r} is mapped twice")
        out[robot] = ours
    if len(set(out.values())) != len(out):
        raise ValueError(f"--keymap: two robot keys map to the same memvla key: {out}")
    return out


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {tuple(value.shape)}"
    return type(value).__name__


class ObservationSpec:
    """What the served policy reads, and the conversion of one message into its input."""

    def __init__(self, config: PolicyConfig, keymap: dict[str, str] | None = None):
        self.config = config
        self.keymap = dict(keymap or {})
        self.image_keys = list(config.image_keys)
        self.geometry_keys = ([DEPTH_KEY, POSE_KEY, INTRINSICS_KEY]
                              if config.context.voxel_size is not None else [])

    def describe(self) -> dict:
        """The expected message, for the metadata the server sends on connect."""
        c, h, w = self.config.image_shape
        return {"images": {k: {"uint8_hwc": [h, w, c], "float_chw": [c, h, w]}
                           for k in self.image_keys},
                STATE_KEY: [self.config.state_dim], TASK_KEY: "str",
                "geometry": self.geometry_keys, "keymap": self.keymap}

    def rename(self, message: dict) -> dict:
        out = dict(message)
        for robot, ours in self.keymap.items():
            if robot in out:
                out[ours] = out.pop(robot)
        return out

    def to_batch(self, message: Any) -> dict:
        """The message as a checked policy batch of one: images (1, H, W, C) uint8 or
        (1, C, H, W) float, state (1, Ds) float32, task a list of one string."""
        if not isinstance(message, dict):
            raise ValueError(f"message: expected a map of observation keys, got "
                             f"{type(message).__name__}")
        bad = [k for k in message if not isinstance(k, str)]
        if bad:
            raise ValueError(f"message: expected string keys, got {bad[:3]!r}")
        msg = self.rename(message)
        batch: dict[str, Any] = {k: self._image(k, self._require(msg, k))
                                 for k in self.image_keys}
        batch[STATE_KEY] = self._state(self._require(msg, STATE_KEY))
        batch[TASK_KEY] = [self._task(self._require(msg, TASK_KEY))]
        for k in self.geometry_keys:
            batch[k] = torch.from_numpy(np.asarray(self._require(msg, k), dtype=np.float32))[None]
        check_observation(batch, self.config)  # values: finite, float images in [0, 1]
        return batch

    def _require(self, msg: dict, key: str) -> Any:
        if key not in msg:
            mapped = [r for r, o in self.keymap.items() if o == key]
            via = f" (or {mapped[0]!r}, mapped by --keymap)" if mapped else ""
            raise ValueError(f"missing key {key!r}{via}; the observation has {sorted(msg)}")
        return msg[key]

    def _image(self, key: str, value: Any) -> torch.Tensor:
        c, h, w = self.config.image_shape
        expected = (f"uint8 (H, W, C) = ({h}, {w}, {c}) or float in [0, 1] (C, H, W) = "
                    f"({c}, {h}, {w}), one image without a batch axis")
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{key}: expected {expected}, got {_describe(value)}")
        shape = tuple(value.shape)
        if value.dtype == np.uint8:
            if shape == (c, h, w) and shape != (h, w, c):
                value = value.transpose(1, 2, 0)  # (H, W, C)
            elif shape != (h, w, c):
                raise ValueError(f"{key}: expected {expected}, got uint8 array of shape {shape}")
            return torch.from_numpy(np.ascontiguousarray(value))[None]  # (1, H, W, C)
        if value.dtype.kind != "f" or shape != (c, h, w):
            raise ValueError(f"{key}: expected {expected}, got {_describe(value)}")
        return torch.from_numpy(value.astype(np.float32, copy=False))[None]  # (1, C, H, W)

    def _state(self, value: Any) -> torch.Tensor:
        d = self.config.state_dim
        if isinstance(value, list | tuple):
            value = np.asarray(value)
        if (not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf"
                or tuple(value.shape) != (d,)):
            raise ValueError(f"{STATE_KEY}: expected a numeric array of shape ({d},) (one "
                             f"robot, no batch axis), got {_describe(value)}")
        return torch.from_numpy(value.astype(np.float32))[None]  # (1, Ds)

    @staticmethod
    def _task(value: Any) -> str:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, np.ndarray) and value.dtype.kind in "US" and value.size == 1:
            value = str(value.reshape(()).item())
        if not isinstance(value, str):
            raise ValueError(f"{TASK_KEY}: expected a string (the instruction), got "
                             f"{_describe(value)}")
        return str(value)


def stack_batches(batches: list[dict]) -> dict:
    """Policy batches of one -> one batch of B: tensors concatenated along the batch axis,
    tasks joined (every batch has the same keys)."""
    if len(batches) == 1:
        return batches[0]
    out = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if k != TASK_KEY}
    out[TASK_KEY] = [t for b in batches for t in b[TASK_KEY]]
    return out
