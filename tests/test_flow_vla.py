"""The flow-matching VLA: cached sampling equals recomputing the prefix at every Euler
step; the two-pass training forward equals SmolVLA / π0 joint attention layer by layer."""

import pytest
import torch
from helpers import model_inputs as shared_inputs
from helpers import narrow_config

from memvla.layers.attention import merge_heads, scaled_attention, split_heads
from memvla.layers.masks import block_mask
from memvla.layers.norm import rms_norm
from memvla.layers.rope import apply_rope
from memvla.layers.tokens import TokenSegment
from memvla.models.flow_vla import FlowMatchingVLA


def model_inputs(cfg, b=2, seed=0):
    return shared_inputs(cfg, b, seed)[:4]  # a padded task in the middle of the prefix


@pytest.mark.parametrize("name", ["tiny", "smolvla-450m", "pi0-3b"])
def test_cached_sampling_equals_recomputed_prefix(name):
    cfg = narrow_config(name)
    model = FlowMatchingVLA(cfg.model).eval()
    images, ids, pad, state = model_inputs(cfg)
    noise = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    fast, _ = model.sample_actions(images, ids, pad, state, noise=noise)
    slow, _ = model.sample_actions_uncached(images, ids, pad, state, noise=noise)
    assert fast.shape == noise.shape
    assert (fast - slow).abs().max().item() <= 1e-5


def _expert_norm(norm, x, cond):
    """The expert's norm, plain (a gate of 1) or π0.5's adaptive one, written out."""
    if cond is None:
        return norm(x), 1.0
    scale, shift, gate = norm.dense(cond)[:, None].chunk(3, -1)
    return rms_norm(x, None, norm.eps) * (1 + scale) + shift, gate


def joint_reference(model: FlowMatchingVLA, prefix: TokenSegment, suffix: TokenSegment,
                    cond=None):
    """SmolVLA / π0 / π0.5 training forward, written as in those designs: one pass over
    [prefix; suffix], joint attention with concatenated q/k/v in joint layers, the expert
    cross-attending to the backbone's rotated keys in the others (π0.5: the expert's norms
    scaled, shifted and gated by the time's condition)."""
    cfg = model.cfg
    vlm = model.vlm_with_expert.text_model
    exp = model.vlm_with_expert.lm_expert
    np_ = prefix.embs.shape[1]
    pad = torch.cat([prefix.pad, suffix.pad], 1)
    flags = torch.cat([prefix.flags, suffix.flags], 1)
    mask = block_mask(flags, pad)  # (B, N, N)
    pos = torch.cumsum(pad.long(), 1) - 1  # (B, N)
    cos, sin = vlm.rope(pos)
    s_pos = pos[:, np_:]
    cross_cos, cross_sin = exp.rope(s_pos - s_pos.min(dim=1, keepdim=True).values)
    xp, xs = prefix.embs, suffix.embs
    for i, (lp, ls) in enumerate(zip(vlm.layers, exp.layers, strict=True)):
        hp, (hs, gate) = lp.input_layernorm(xp), _expert_norm(ls.input_layernorm, xs, cond)
        qp, kp, vp = lp.self_attn.project(hp, cos[:, :np_], sin[:, :np_])
        if cfg.is_joint_layer(i):
            qs, ks, vs = ls.self_attn.project(hs, cos[:, np_:], sin[:, np_:])
            out = scaled_attention(torch.cat([qp, qs], 2), torch.cat([kp, ks], 2),
                                   torch.cat([vp, vs], 2), mask)
            ap, as_ = merge_heads(out[:, :, :np_]), merge_heads(out[:, :, np_:])
        else:
            ap = merge_heads(scaled_attention(qp, kp, vp, mask[:, :np_, :np_]))
            qs = apply_rope(split_heads(ls.self_attn.q_proj(hs), ls.self_attn.heads),
                            cross_cos, cross_sin)
            ks = split_heads(ls.self_attn.k_proj(merge_heads(kp)), ls.self_attn.kv_heads)
            vs = split_heads(ls.self_attn.v_proj(merge_heads(vp)), ls.self_attn.kv_heads)
            as_ = merge_heads(scaled_attention(qs, ks, vs, mask[:, np_:, :np_]))
        xp = xp + lp.self_attn.o_proj(ap)
        xp = xp + lp.mlp(lp.post_attention_layernorm(xp))
        xs = xs + ls.self_attn.o_proj(as_) * gate
        hs, gate = _expert_norm(ls.post_attention_layernorm, xs, cond)
        xs = xs + ls.mlp(hs) * gate
    return _expert_norm(exp.norm, xs, cond)[0]


@pytest.mark.parametrize("name", ["tiny", "smolvla-450m", "pi0-3b", "pi05-3b"])
def test_two_pass_forward_equals_joint_attention(name):
    cfg = narrow_config(name, depth=3)
    model = FlowMatchingVLA(cfg.model).eval()
    images, ids, pad, state = model_inputs(cfg)
    b, a = 2, cfg.model.chunk_size
    x_t = torch.randn(b, a, cfg.model.max_action_dim)
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        prefix = TokenSegment.cat(model.embed_prefix(images, ids, pad, state))
        suffix, cond = model.embed_suffix(state, x_t, t)
        ref = joint_reference(model, prefix, suffix, cond)
        cache, _ = model.prefill(images, ids, pad, state)
        got = model.vlm_with_expert.expert(suffix, cache, cond)
    assert (got - ref).abs().max().item() <= 1e-5


def test_suffix_block_structure():
    smol = narrow_config("smolvla-450m").model
    pi0 = narrow_config("pi0-3b").model
    pi05 = narrow_config("pi05-3b").model
    x = torch.zeros(1, smol.chunk_size, smol.max_action_dim)
    for cfg, want_first, want_rest in [(smol, [1], 1), (pi0, [1, 1], 0), (pi05, [1], 0)]:
        model = FlowMatchingVLA(cfg)
        suf, _ = model.embed_suffix(torch.zeros(1, cfg.max_state_dim), x, torch.ones(1))
        flags = suf.flags[0].tolist()
        assert flags[: len(want_first)] == want_first
        assert set(flags[len(want_first):]) == {want_rest}


def test_training_loss_is_the_flow_matching_loss_of_the_given_noise_and_time():
    from memvla.layers.flow_matching import interpolate

    cfg = narrow_config("tiny")
    model = FlowMatchingVLA(cfg.model)
    images, ids, pad, state = model_inputs(cfg)
    actions = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    noise, t = torch.randn_like(actions), torch.tensor([0.5, 0.1])
    losses, _ = model(images, ids, pad, state, actions, noise, t)
    # (v(x_t, t) - (noise - actions))² with x_t = t·noise + (1 - t)·actions, by hand
    cache, _ = model.prefill(images, ids, pad, state)
    v = model.velocity(cache, state, t[:, None, None] * noise + (1 - t[:, None, None]) *
                        actions, t)
    torch.testing.assert_close(losses, (v - (noise - actions)) ** 2)
    torch.testing.assert_close(interpolate(actions, noise, t),
                               t[:, None, None] * noise + (1 - t[:, None, None]) * actions)
    # without them, noise and time are drawn: another draw gives another loss
    torch.manual_seed(5)
    drawn, _ = model(images, ids, pad, state, actions)
    torch.manual_seed(5)
    again, _ = model(images, ids, pad, state, actions)
    torch.manual_seed(6)
    other, _ = model(images, ids, pad, state, actions)
    assert torch.equal(drawn, again) and not torch.allclose(drawn, other)


@pytest.mark.parametrize("name", ["tiny", "smolvla-450m"])
def test_prefill_into_a_non_empty_cache_continues_the_sequence(name):
    # two prefills into one cache == one prefill of both parts, cut where a block starts
    # (the state token): positions and block ids go on from the cached ones
    from memvla.layers.kv_cache import KVCache

    cfg = narrow_config(name)
    model = FlowMatchingVLA(cfg.model).eval()
    images, ids, pad, state = model_inputs(cfg)
    parts = model.embed_prefix(images, ids, pad, state)
    assert parts[-1].flags[0, 0] == 1  # the state token opens a block of its own
    first, second = TokenSegment.cat(parts[:-1]), TokenSegment.cat(parts[-1:])
    vwe = model.vlm_with_expert
    whole_cache = KVCache(cfg.model.text.depth)
    whole = vwe.prefill(TokenSegment.cat(parts), whole_cache)
    cache = KVCache(cfg.model.text.depth)
    h1 = vwe.prefill(first, cache)
    h2 = vwe.prefill(second, cache)
    real = torch.cat([first.pad, second.pad], 1)
    got = torch.cat([h1, h2], 1)
    torch.testing.assert_close(got[real], whole[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.key_pos, whole_cache.key_pos)
    assert torch.equal(cache.key_block, whole_cache.key_block)
    for layer in range(cfg.model.text.depth):  # the real keys/values (padding: never read)
        for a, b in zip(cache.get(layer), whole_cache.get(layer), strict=True):
            torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real],
                                       atol=1e-5, rtol=1e-5)
