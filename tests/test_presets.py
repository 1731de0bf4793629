"""Tests every registered preset gets automatically: parameter count on the meta device;
at real widths and reduced depth: shapes, no NaN, gradients, save/load round trip."""

import pytest
import torch
from helpers import fake_batch, small_config

from memvla.policies import load_policy, make_policy
from memvla.presets import PRESETS, count_parameters, get_preset

# published sizes (SmolVLA paper / blog: 450M; pi0: PaliGemma 3B + 300M expert, ~3.3B;
# OpenVLA 7.5B (7.54B), to which OFT adds its proprio projector and action head, ~0.17B)
# RoboMamba: CLIP ViT-L/14 (0.30B) + Mamba-2.8B (2.77B) = 3.07B)
PUBLISHED = {"smolvla-450m": (450e6, 0.03), "pi0-3b": (3.3e9, 0.03),
             "openvla-oft-7b": (7.5e9, 0.03), "robomamba-2.8b": (3.07e9, 0.03)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count(name):
    n = count_parameters(get_preset(name))
    assert n > 0
    if name in PUBLISHED:
        target, tol = PUBLISHED[name]
        assert abs(n - target) / target <= tol, f"{name}: {n:,} vs published {target:,.0f}"


@pytest.mark.parametrize("extra, added", [
    (["context.kind=memory_tokens", "context.num_tokens=5"], 5 * 64),  # M × D
    (["model.pruner.enabled=true", "model.pruner.action_context=prev_chunk"], 8 * 64 + 64),
])
def test_parameter_counts_include_the_context_and_the_pruner(extra, added):
    cfg = get_preset("tiny", extra)
    assert count_parameters(cfg) - count_parameters(get_preset("tiny")) == added
    assert count_parameters(cfg) == sum(p.numel() for p in make_policy(cfg).parameters())


def test_tiny_is_tiny():
    assert count_parameters(get_preset("tiny")) < 1_000_000
    assert count_parameters(get_preset("tiny-oft")) < 1_000_000


def test_published_shapes():
    s = get_preset("smolvla-450m").model
    assert (s.text.width, s.text.heads, s.text.kv_heads, s.text.head_dim) == (960, 15, 5, 64)
    assert (s.expert.width, s.expert.mlp_dim, s.tokens_per_image) == (720, 2048, 64)
    assert s.text.depth == 16 and s.self_attn_every_n_layers == 2
    p = get_preset("pi0-3b").model
    assert (p.text.width, p.text.depth, p.text.mlp_dim, p.text.heads, p.text.kv_heads,
            p.text.head_dim) == (2048, 18, 16384, 8, 1, 256)
    assert (p.expert.width, p.expert.depth, p.expert.mlp_dim) == (1024, 18, 4096)
    assert p.tokens_per_image == 256 and p.vision.width == 1152 and p.vision.depth == 27
    o = get_preset("openvla-oft-7b").model
    assert (o.text.width, o.text.depth, o.text.heads, o.text.mlp_dim, o.text.vocab_size) == (
        4096, 32, 32, 11008, 32064)
    assert o.tokens_per_image == 256 and (o.chunk_size, o.max_action_dim) == (8, 7)
    assert o.num_action_tokens == 56 and o.vision_width == 1152 + 1024


def test_unknown_preset_did_you_mean():
    with pytest.raises(ValueError, match="Did you mean 'smolvla-450m'"):
        get_preset("smolvla-450")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_forward_backward_and_round_trip(name, tmp_path):
    cfg = small_config(name)
    policy = make_policy(cfg)
    batch = fake_batch(cfg)
    loss, info = policy(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert info["valid_steps"] == 2 * cfg.model.chunk_size - 2
    loss.backward()
    unused = policy.model.unused_parameter_names()
    for n, p in policy.model.named_parameters():
        if n in unused:
            assert p.grad is None, f"{n} was declared unused but got a gradient"
        else:
            assert p.grad is not None, f"{n} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{n} has a non-finite gradient"
    nonzero = sum(int(p.grad.abs().sum() > 0) for n, p in policy.model.named_parameters()
                  if n not in unused)
    assert nonzero == len([n for n, _ in policy.model.named_parameters() if n not in unused])

    obs = fake_batch(cfg, with_actions=False)
    torch.manual_seed(7)
    chunk = policy.predict_action_chunk(obs)
    assert chunk.shape == (2, cfg.model.chunk_size, cfg.action_dim)
    assert torch.isfinite(chunk).all()

    policy.save_pretrained(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt", device="cpu")
    assert type(loaded) is type(policy)
    torch.manual_seed(7)
    again = loaded.predict_action_chunk(obs)
    assert torch.equal(chunk, again)
