"""MEM's space-time separable video encoder: one frame is the plain ViT, the fast path
against the loop twin, causality in time, the zero-at-present temporal embedding,
gradients, bf16 and actionable errors."""

import copy

import pytest
import torch

from memvla.layers.temporal_vision import (
    SpaceTimeVisionEncoder,
    causal_time_mask,
    space_time_attention,
    space_time_encode,
    space_time_reference,
    temporal_embedding,
)
from memvla.layers.vision import VisionTransformer


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(width=32, depth=2, heads=2, mlp_dim=64, image_size=16,
                             patch_size=8)


def frames(b=2, t=3) -> torch.Tensor:
    return torch.rand(b, t, 3, 16, 16) * 2 - 1  # (B, T, C, H, W)


@pytest.mark.parametrize("every", [1, 2])
def test_one_frame_is_the_plain_vit(every):
    vit = tiny_vit().eval()
    x = frames(t=1)
    with torch.no_grad():
        want = vit(x[:, 0])
        assert torch.equal(SpaceTimeVisionEncoder(vit, every)(x), want)
        # The loop twin runs the temporal layers even on one frame: identity up to rounding.
        torch.testing.assert_close(space_time_reference(vit, x, every), want,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("every", [1, 2])
def test_fast_matches_reference(every):
    vit = tiny_vit().eval()
    x = frames(t=3)
    with torch.no_grad():
        fast = space_time_encode(vit, x, every)
        slow = space_time_reference(vit, x, every)
    assert fast.shape == (2, vit.num_patches, 32)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_current_and_past_frames_both_matter():
    vit = tiny_vit().eval()
    enc = SpaceTimeVisionEncoder(vit, temporal_every=2)
    x = frames(t=3)
    with torch.no_grad():
        base = enc(x)
        for s in (0, 1, 2):
            y = x.clone()
            y[:, s] = -y[:, s]
            assert (enc(y) - base).abs().max() > 1e-4, f"frame {s} has no effect"


def test_causal_time_mask():
    mask = causal_time_mask(4)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(causal_time_mask(1), torch.ones(1, 1, dtype=torch.bool))


def test_time_attention_does_not_see_the_future():
    attn = tiny_vit().encoder.layers[0].self_attn
    h = torch.randn(2, 4, 4, 32)  # (B, T, P, D)
    mask = causal_time_mask(4)
    with torch.no_grad():
        base = space_time_attention(attn, h, mask)
        for s in range(3):
            g = h.clone()
            g[:, s + 1:] = torch.randn_like(g[:, s + 1:])
            out = space_time_attention(attn, g, mask)
            torch.testing.assert_close(out[:, : s + 1], base[:, : s + 1], rtol=0, atol=1e-6)
            assert (out[:, s + 1:] - base[:, s + 1:]).abs().max() > 1e-3


def test_time_attention_over_one_frame_is_the_layer_attention():
    attn = tiny_vit().encoder.layers[0].self_attn
    h = torch.randn(2, 1, 4, 32)  # (B, T, P, D)
    with torch.no_grad():
        torch.testing.assert_close(space_time_attention(attn, h, causal_time_mask(1))[:, 0],
                                   attn(h[:, 0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [32, 7])
def test_temporal_embedding(dim):
    emb = temporal_embedding(5, dim)
    assert emb.shape == (5, dim)
    assert torch.equal(emb[-1], torch.zeros(dim))
    assert (emb[:-1].abs().amax(-1) > 0).all()
    assert torch.equal(temporal_embedding(1, dim), torch.zeros(1, dim))
    half = temporal_embedding(5, dim, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half[-1], torch.zeros_like(half[-1]))


def test_gradients_reach_the_vit_and_the_past_frames():
    vit = tiny_vit()
    enc = SpaceTimeVisionEncoder(vit, temporal_every=1)
    assert {id(p) for p in enc.parameters()} == {id(p) for p in vit.parameters()}
    x = frames(t=3).requires_grad_()
    enc(x).square().mean().backward()
    for name, p in vit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert (x.grad[:, 0].abs().sum() > 0) and (x.grad[:, 1].abs().sum() > 0)


def test_bf16_runs():
    vit = tiny_vit().eval()
    half = copy.deepcopy(vit).to(torch.bfloat16)
    x = frames(t=3).to(torch.bfloat16)
    with torch.no_grad():
        out = SpaceTimeVisionEncoder(half, temporal_every=2)(x)
        ref = space_time_encode(vit, x.float(), 2)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 32)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.1)


def test_bad_inputs_error():
    vit = tiny_vit()
    with pytest.raises(ValueError, match=r"temporal_every must be an integer in 1\.\.2.*got 0"):
        SpaceTimeVisionEncoder(vit, temporal_every=0)
    with pytest.raises(ValueError, match=r"temporal_every .* got 3"):
        SpaceTimeVisionEncoder(vit, temporal_every=3)
    enc = SpaceTimeVisionEncoder(vit, temporal_every=1)
    want = r"frames must be \(B, T, 3, 16, 16\), got \(2, 3, 16, 16\)"
    with pytest.raises(ValueError, match=want):
        enc(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"frames must be .* got \(2, 3, 3, 8, 8\)"):
        enc(torch.zeros(2, 3, 3, 8, 8))
    with pytest.raises(ValueError, match=r"T >= 1 frames, got T = 0"):
        enc(torch.zeros(2, 0, 3, 16, 16))
    with pytest.raises(ValueError, match=r"temporal_every .* got 0"):
        space_time_reference(vit, torch.zeros(1, 2, 3, 16, 16), 0)
