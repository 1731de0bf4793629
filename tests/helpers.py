"""Shared test helpers: small configs and fake batches."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from memvla.config_utils import apply_overrides
from memvla.presets import WORD_VOCAB, get_preset


def small_config(name: str, extra: list[str] | None = None):
    """The preset at its real widths with as few layers as show every kind of layer (one
    joint + one cross-attention layer where it has both), one vision layer per tower, one
    camera, two Euler steps and a small vocabulary: what every preset is tested at on the
    CPU. The parallel family keeps two decoder layers (with one, the zeroed placeholders'
    queries are zero and q/k get no gradient) and sees 8×8 patches and 16 prompt tokens;
    its 7B decoder is narrowed to 4 heads of the real head size (a 4096-wide pair of
    layers plus head is 0.6B parameters, too slow to save and reload in every test run).
    ``tiny*`` presets are used as they are."""
    cfg = get_preset(name)
    if cfg.family == "parallel" and not name.startswith("tiny"):
        size = cfg.model.vision.patch_size * 8
        # one block, and the one after it that a timm tower reading an earlier block stores
        depth = 1 + cfg.model.vision.feature_layer
        overrides = ["model.text.depth=2", f"model.vision.depth={depth}",
                     f"model.vision.image_size={size}", "tokenizer.max_length=16",
                     f"model.text.vocab_size={WORD_VOCAB}", f'cameras=["{cfg.cameras[0]}"]',
                     "model.text.width=512", "model.text.heads=4", "model.text.kv_heads=4",
                     "model.text.mlp_dim=1024", "model.head_hidden=512"]
        if cfg.model.vision_fused is not None:
            fused_depth = 1 + cfg.model.vision_fused.feature_layer
            overrides += [f"model.vision_fused.depth={fused_depth}",
                          f"model.vision_fused.image_size={size}"]
        cfg = apply_overrides(cfg, overrides)
    elif not name.startswith("tiny"):
        depth = cfg.model.self_attn_every_n_layers
        mamba = (["model.text.width=256", "model.vision.image_size=112"]
                 if cfg.model.backbone == "mamba" else [])  # a Mamba block's cost is its width
        cfg = apply_overrides(cfg, [
            f"model.text.depth={depth}", f"model.expert.depth={depth}", "model.vision.depth=1",
            f"model.text.vocab_size={WORD_VOCAB}", "model.num_steps=2",
            f'cameras=["{cfg.cameras[0]}"]', *mamba])
    return apply_overrides(cfg, extra) if extra else cfg


# Narrow stand-ins with the structural switches of each preset (state token place, action
# attention, joint/cross layers, Gemma norm and activation, connector): for equivalence tests
# that must run many forwards.
_NARROW = {
    "text": ["model.text.width=64", "model.text.heads=4", "model.text.head_dim=16",
             "model.text.mlp_dim=96", f"model.text.vocab_size={WORD_VOCAB}"],
    "expert": ["model.expert.width=48", "model.expert.heads=4", "model.expert.head_dim=16",
               "model.expert.mlp_dim=64"],
    "vision": ["model.vision.width=32", "model.vision.heads=2", "model.vision.mlp_dim=64",
               "model.vision.depth=1"],
}


def narrow_config(name: str, depth: int = 3, extra: list[str] | None = None):
    cfg = get_preset(name)
    if name.startswith("tiny"):
        return apply_overrides(cfg, extra) if extra else cfg
    kv = cfg.model.text.kv_heads if cfg.model.text.kv_heads in (1, 2, 4) else 2
    if cfg.family == "parallel":
        size = cfg.model.vision.patch_size * 8
        overrides = _NARROW["text"] + _NARROW["vision"] + [
            f"model.text.kv_heads={kv}", f"model.text.depth={depth}",
            f"model.vision.image_size={size}", "model.chunk_size=6", "n_action_steps=6",
            "model.head_hidden=64", f'cameras=["{cfg.cameras[0]}"]']
        if cfg.model.vision_fused is not None:
            overrides += [o.replace("model.vision.", "model.vision_fused.")
                          for o in _NARROW["vision"]] + [f"model.vision_fused.image_size={size}"]
        return apply_overrides(cfg, overrides + (extra or []))
    overrides = _NARROW["text"] + _NARROW["expert"] + _NARROW["vision"] + [
        f"model.text.kv_heads={kv}", f"model.expert.kv_heads={kv}",
        f"model.text.depth={depth}", f"model.expert.depth={depth}",
        "model.vision.image_size=" + str(cfg.model.vision.patch_size * 4 * 2),
        "model.chunk_size=6", "n_action_steps=6", "model.num_steps=4",
        f'cameras=["{cfg.cameras[0]}"]',
    ]
    if cfg.model.expert.cond_dim:  # π0.5: the norms' condition is the expert's width
        overrides.append("model.expert.cond_dim=48")
    return apply_overrides(cfg, overrides + (extra or []))


def fake_batch(cfg, b: int = 2, with_actions: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c, h, w = cfg.image_shape
    batch = {k: torch.randint(0, 256, (b, h, w, c), dtype=torch.uint8, generator=g)
             for k in cfg.image_keys}
    batch["observation.state"] = torch.randn(b, cfg.state_dim, generator=g)
    batch["task"] = ["touch the red ball", "remember the colour and touch it later"][:b]
    batch["task"] += ["go left"] * (b - len(batch["task"]))
    if with_actions:
        batch["action"] = torch.randn(b, cfg.model.chunk_size, cfg.action_dim, generator=g)
        pad = torch.zeros(b, cfg.model.chunk_size, dtype=torch.bool)
        pad[0, -2:] = True
        batch["action_is_pad"] = pad
    return batch


def params_without_gradient(model) -> list[str]:
    """Names of ``model``'s parameters that the last backward did not reach (those its
    ``unused_parameter_names`` declares unused aside)."""
    unused = model.unused_parameter_names()
    return [n for n, p in model.named_parameters()
            if n not in unused and (p.grad is None or not p.grad.abs().sum() > 0)]


def model_inputs(cfg, b: int = 2, seed: int = 0, pad_from: int | None = None):
    """Random model inputs of a flow config: images per camera in [-1, 1], language ids
    with sample 0 padded from ``pad_from`` (default: half way), state, and a previous
    action chunk -> (images, ids, pad, state, prev)."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    s = m.vision.image_size
    images = [torch.rand(b, 3, s, s, generator=g) * 2 - 1 for _ in cfg.cameras]
    n = cfg.tokenizer.max_length
    ids = torch.randint(4, 200, (b, n), generator=g)
    pad = torch.ones(b, n, dtype=torch.bool)
    pad[0, n // 2 if pad_from is None else pad_from:] = False
    state = torch.randn(b, m.max_state_dim, generator=g)
    prev = torch.randn(b, m.chunk_size, m.max_action_dim, generator=g)
    return images, ids, pad, state, prev


def episode_batch(cfg, b: int = 2, s: int = 3, seed: int = 0, lengths=None,
                  task: str = "remember the colour and touch it later"):
    """A random SegmentBatch of ``b`` episodes cut into ``s`` chunk-long segments; episodes
    of ``lengths`` frames (default: all ``s`` segments) are padded past their end."""
    from memvla.data.segments import SegmentBatch

    g = torch.Generator().manual_seed(seed)
    a, c, h, w = cfg.model.chunk_size, *cfg.image_shape
    lengths = torch.tensor(lengths or [s * a] * b)
    n_seg = (lengths + a - 1) // a
    seg_pad = torch.arange(s)[None] >= n_seg[:, None]  # (B, S)
    steps = torch.arange(s)[:, None] * a + torch.arange(a)  # (S, A)
    return SegmentBatch(
        observation={"observation.images.top": torch.rand(b, s, c, h, w, generator=g),
                     "observation.state": torch.randn(b, s, cfg.state_dim, generator=g)},
        action=torch.randn(b, s, a, cfg.action_dim, generator=g),
        action_is_pad=steps[None] >= lengths[:, None, None],
        segment_is_pad=seg_pad,
        frame_index=torch.where(seg_pad, 0, torch.arange(s)[None] * a),
        episode_index=torch.arange(b), length=lengths, task=[task] * b)


def write_episode(root, cfg, length: int, seed: int = 0):
    """One random episode of ``length`` frames fitting ``cfg`` as a LeRobot v3.0 dataset at
    ``root`` -> the dataset."""
    import numpy as np

    from memvla.data.lerobot_v3 import LeRobotV3Dataset, LeRobotV3Writer

    rng = np.random.default_rng(seed)
    c, h, w = cfg.image_shape
    frames = {"observation.images.top": rng.integers(0, 256, (length, h, w, c), np.uint8),
              "observation.state": rng.normal(size=(length, cfg.state_dim)).astype(np.float32),
              "action": rng.normal(size=(length, cfg.action_dim)).astype(np.float32)}
    with LeRobotV3Writer(root, fps=10) as writer:
        writer.add_episode(frames, task="remember the colour and touch it later")
    return LeRobotV3Dataset(root)


ROOT = Path(__file__).resolve().parents[1]
LEROBOT_PYTHON = Path(os.environ.get("MEMVLA_LEROBOT_PYTHON",
                                     ROOT / ".venv-lerobot" / "bin" / "python"))


def run_in_lerobot_env(script: str, *args) -> None:
    """Run ``tests/lerobot/<script>`` in the LeRobot environment (``scripts/lerobot-env``;
    the test is skipped without one); a failure shows the script's stderr."""
    if not LEROBOT_PYTHON.is_file():
        pytest.skip(f"no LeRobot environment at {LEROBOT_PYTHON} (run scripts/lerobot-env)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([str(LEROBOT_PYTHON), str(ROOT / "tests/lerobot" / script),
                           *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
