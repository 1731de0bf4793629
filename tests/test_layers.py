"""Building blocks: masks (cumsum rule), attention fast vs slow twin, RoPE, KV cache,
pixel shuffle, RMSNorm, flow-matching helpers."""

import math

import pytest
import torch

from memvla.layers.attention import Attention, scaled_attention, scaled_attention_ref
from memvla.layers.connector import pixel_shuffle, pixel_shuffle_ref
from memvla.layers.flow_matching import (
    euler_sample,
    interpolate,
    sample_time,
    sinusoidal_time_embedding,
    target_velocity,
)
from memvla.layers.kv_cache import KVCache
from memvla.layers.masks import block_mask, block_mask_between, block_mask_ref, positions_from_pad
from memvla.layers.norm import rms_norm
from memvla.layers.rope import apply_rope, rope_cos_sin

T, F_ = True, False


def test_block_mask_prefix_lm_hand_written():
    # [img, img, lang] bidirectional, then state (new block), then 2 causal actions
    flags = torch.tensor([[0, 0, 0, 1, 1, 1]])
    want = torch.tensor([[
        [T, T, T, F_, F_, F_],
        [T, T, T, F_, F_, F_],
        [T, T, T, F_, F_, F_],
        [T, T, T, T, F_, F_],
        [T, T, T, T, T, F_],
        [T, T, T, T, T, T],
    ]])
    assert torch.equal(block_mask(flags), want)


def test_block_mask_all_zero_is_full_and_all_one_is_causal():
    n = 5
    assert block_mask(torch.zeros(1, n, dtype=torch.long)).all()
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None]
    assert torch.equal(block_mask(torch.ones(1, n, dtype=torch.long)), causal)


def test_block_mask_with_padding_hand_written():
    # lang padded in the middle: [tok, tok, PAD, state]
    flags = torch.tensor([[0, 0, 0, 1]])
    pad = torch.tensor([[T, T, F_, T]])
    want = torch.tensor([[
        [T, T, F_, F_],
        [T, T, F_, F_],
        [F_, F_, F_, F_],
        [T, T, F_, T],
    ]])
    assert torch.equal(block_mask(flags, pad), want)


def test_block_mask_matches_loop_twin_on_random_flags():
    g = torch.Generator().manual_seed(0)
    flags = torch.randint(0, 2, (3, 9), generator=g)
    pad = torch.rand(3, 9, generator=g) > 0.2
    assert torch.equal(block_mask(flags, pad), block_mask_ref(flags, pad))


def test_block_mask_between_equals_rows_of_full_mask():
    flags = torch.tensor([[0, 0, 1, 1, 0, 0]])
    pad = torch.tensor([[T, F_, T, T, T, T]])
    full = block_mask(flags, pad)
    blocks = torch.cumsum(flags, 1)
    part = block_mask_between(blocks[:, 3:], pad[:, 3:], blocks, pad)
    assert torch.equal(part, full[:, 3:])


def test_block_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="pad must have the shape"):
        block_mask(torch.zeros(1, 3), torch.ones(1, 4, dtype=torch.bool))


def test_positions_skip_padding():
    pad = torch.tensor([[T, T, F_, T]])
    assert positions_from_pad(pad).tolist() == [[0, 1, 1, 2]]


@pytest.mark.parametrize("gqa", [True, False], ids=["enable_gqa", "repeated_heads"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_attention_fast_matches_slow_twin(heads, kv_heads, gqa, monkeypatch):
    from memvla.layers import attention

    monkeypatch.setattr(attention, "SDPA_HAS_GQA", gqa)  # torch < 2.5 has no enable_gqa
    g = torch.Generator().manual_seed(1)
    b, n, l, d = 2, 5, 7, 8
    q = torch.randn(b, heads, n, d, generator=g, requires_grad=True)
    k = torch.randn(b, kv_heads, l, d, generator=g, requires_grad=True)
    v = torch.randn(b, kv_heads, l, d, generator=g, requires_grad=True)
    mask = torch.rand(b, n, l, generator=g) > 0.4
    mask[0, 0] = False  # a query that sees nothing must not give NaN
    fast = scaled_attention(q, k, v, mask)
    slow = scaled_attention_ref(q, k, v, mask)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    gf = torch.autograd.grad(fast.square().sum(), (q, k, v))
    gs = torch.autograd.grad(slow.square().sum(), (q, k, v))
    for a, c in zip(gf, gs, strict=True):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_attention_rejects_wrong_mask_shape():
    q = torch.randn(1, 2, 3, 4)
    k = v = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"mask must be \(B, N, L\)"):
        scaled_attention(q, k, v, torch.ones(1, 3, 4, dtype=torch.bool))


def test_rope_is_relative_and_allows_gaps():
    g = torch.Generator().manual_seed(2)
    d = 16
    q = torch.randn(1, 1, 1, d, generator=g)
    k = torch.randn(1, 1, 1, d, generator=g)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), d, 10_000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), d, 10_000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    # the score depends only on the distance, whatever the absolute positions (gaps allowed)
    torch.testing.assert_close(score(3, 1), score(103, 101))
    torch.testing.assert_close(score(50, 7), score(43, 0))
    assert not torch.allclose(score(3, 1), score(3, 2))
    # rotation preserves the norm
    c, s = rope_cos_sin(torch.tensor([[0, 5, 9]]), d, 10_000.0)
    x = torch.randn(1, 2, 3, d, generator=g)
    torch.testing.assert_close(apply_rope(x, c, s).norm(dim=-1), x.norm(dim=-1))


def test_kv_cache_append_crop_window_reset_detach():
    cache = KVCache(2)
    assert cache.is_empty and len(cache) == 0
    for step in range(3):
        n = 2
        pad = torch.ones(1, n, dtype=torch.bool)
        cache.append_tokens(pad, torch.full((1, n), step), torch.arange(n)[None] + 2 * step)
        for layer in range(2):
            k = torch.full((1, 1, n, 4), float(step), requires_grad=True)
            full_k, full_v = cache.append(layer, k, k * 2)
        assert full_k.shape == (1, 1, 2 * (step + 1), 4)
    assert len(cache) == 6
    cache.keep_last(4)
    assert len(cache) == 4 and cache.get(0)[0][0, 0, :, 0].tolist() == [1, 1, 2, 2]
    assert cache.key_pos.tolist() == [[2, 3, 4, 5]]
    cache.crop(2)
    assert len(cache) == 2 and cache.get(1)[1][0, 0, :, 0].tolist() == [2, 2]
    assert cache.get(0)[0].requires_grad
    cache.detach()
    assert not cache.get(0)[0].requires_grad
    cache.reset()
    assert cache.is_empty
    with pytest.raises(RuntimeError, match="empty"):
        cache.get(0)


def test_attention_module_cache_equals_full_sequence():
    torch.manual_seed(3)
    attn = Attention(dim=32, heads=4, kv_heads=2, head_dim=8)
    x = torch.randn(2, 6, 32)
    pos = torch.arange(6).expand(2, 6)
    cos, sin = rope_cos_sin(pos, 8, 10_000.0)
    mask = block_mask(torch.ones(2, 6, dtype=torch.long))
    full = attn(x, cos, sin, mask)
    cache = KVCache(1)
    first = attn(x[:, :4], cos[:, :4], sin[:, :4], mask[:, :4, :4], cache=cache)
    second = attn(x[:, 4:], cos[:, 4:], sin[:, 4:], mask[:, 4:], cache=cache)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_pixel_shuffle_matches_loop_twin(scale):
    x = torch.randn(2, 64, 5)
    y = pixel_shuffle(x, scale)
    assert y.shape == (2, 64 // scale**2, 5 * scale**2)
    assert torch.equal(y, pixel_shuffle_ref(x, scale))


def test_pixel_shuffle_rejects_non_square_grid():
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.randn(1, 12, 3), 2)


def test_rms_norm_llama_and_gemma_variants():
    x = torch.randn(3, 8)
    w = torch.randn(8)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref * w)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, unit_offset=True), ref * (1 + w))


def test_flow_matching_time_convention():
    torch.manual_seed(0)
    t = sample_time(20_000)
    assert t.min() >= 0.001 and t.max() <= 1.0
    # exactly time_min + (1 - time_min) · Beta(α, β): the same draws, mapped
    torch.manual_seed(3)
    mapped = sample_time(1000, 1.5, 1.0, time_min=0.25)
    torch.manual_seed(3)
    beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0)).sample((1000,))
    torch.testing.assert_close(mapped, 0.25 + 0.75 * beta)
    assert mapped.min() >= 0.25
    # Beta(1.5, 1) has mean 0.6
    assert abs(t.mean().item() - (0.001 + 0.999 * 0.6)) < 0.01
    a, n = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    assert torch.equal(interpolate(a, n, torch.ones(4)), n)  # t = 1 is noise
    assert torch.equal(interpolate(a, n, torch.zeros(4)), a)  # t = 0 is data
    # with the exact velocity the Euler integration lands on the data from the noise
    out = euler_sample(lambda x, t: target_velocity(a, n), n, steps=10)
    torch.testing.assert_close(out, a, atol=1e-5, rtol=1e-5)


def test_sinusoidal_time_embedding():
    t = torch.tensor([0.0, 0.5, 1.0])
    e = sinusoidal_time_embedding(t, 8, 4e-3, 4.0)
    assert e.shape == (3, 8)
    torch.testing.assert_close(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    # the slowest frequency (period 4) at t = 1: sin(2π/4) = 1
    assert math.isclose(e[2, 3].item(), 1.0, abs_tol=1e-6)
