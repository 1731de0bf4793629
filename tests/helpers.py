"""Shared test helpers: small configs and fake batches."""

from __future__ import annotations

import torch

from memvla.config_utils import apply_overrides
from memvla.presets import WORD_VOCAB, get_preset


def small_config(name: str, extra: list[str] | None = None):
    """The preset at its real widths with as few layers as show every kind of layer (one
    joint + one cross-attention layer where it has both), one vision layer, one camera,
    two Euler steps and a small vocabulary: what every preset is tested at on the CPU."""
    cfg = get_preset(name)
    if name != "tiny":
        depth = cfg.model.self_attn_every_n_layers
        cfg = apply_overrides(cfg, [
            f"model.text.depth={depth}", f"model.expert.depth={depth}", "model.vision.depth=1",
            f"model.text.vocab_size={WORD_VOCAB}", "model.num_steps=2",
            f'cameras=["{cfg.cameras[0]}"]'])
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
    if name == "tiny":
        return apply_overrides(cfg, extra) if extra else cfg
    kv = cfg.model.text.kv_heads if cfg.model.text.kv_heads in (1, 2, 4) else 2
    overrides = _NARROW["text"] + _NARROW["expert"] + _NARROW["vision"] + [
        f"model.text.kv_heads={kv}", f"model.expert.kv_heads={kv}",
        f"model.text.depth={depth}", f"model.expert.depth={depth}",
        "model.vision.image_size=" + str(cfg.model.vision.patch_size * 4 * 2),
        "model.chunk_size=6", "n_action_steps=6", "model.num_steps=4",
        f'cameras=["{cfg.cameras[0]}"]',
    ]
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
