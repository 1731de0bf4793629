"""The flow-matching VLA: cached sampling equals recomputing the prefix at every Euler
step; the two-pass training forward equals SmolVLA / π0 joint attention layer by layer."""

import pytest
import torch
from helpers import model_inputs as shared_inputs
from helpers import narrow_config

from memvla.layers.attention import merge_heads, scaled_attention, split_heads
from memvla.layers.masks import block_mask
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


def joint_reference(model: FlowMatchingVLA, prefix: TokenSegment, suffix: TokenSegment):
    """SmolVLA / π0 training forward, written as in those designs: one pass over
    [prefix; suffix], joint attention with concatenated q/k/v in joint layers, the expert
    cross-attending to the backbone's rotated keys in the others."""
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
        hp, hs = lp.input_layernorm(xp), ls.input_layernorm(xs)
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
        xs = xs + ls.self_attn.o_proj(as_)
        xs = xs + ls.mlp(ls.post_attention_layernorm(xs))
    return exp.norm(xs)


@pytest.mark.parametrize("name", ["tiny", "smolvla-450m", "pi0-3b"])
def test_two_pass_forward_equals_joint_attention(name):
    cfg = narrow_config(name, depth=3)
    model = FlowMatchingVLA(cfg.model).eval()
    images, ids, pad, state = model_inputs(cfg)
    b, a = 2, cfg.model.chunk_size
    x_t = torch.randn(b, a, cfg.model.max_action_dim)
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        prefix = TokenSegment.cat(model.embed_prefix(images, ids, pad, state))
        suffix = model.embed_suffix(state, x_t, t)
        ref = joint_reference(model, prefix, suffix)
        cache, _ = model.prefill(images, ids, pad, state)
        got = model.vlm_with_expert.expert(suffix, cache)
    assert (got - ref).abs().max().item() <= 1e-5


def test_suffix_block_structure():
    smol = narrow_config("smolvla-450m").model
    pi0 = narrow_config("pi0-3b").model
    x = torch.zeros(1, smol.chunk_size, smol.max_action_dim)
    for cfg, want_first, want_rest in [(smol, [1], 1), (pi0, [1, 1], 0)]:
        model = FlowMatchingVLA(cfg)
        suf = model.embed_suffix(torch.zeros(1, cfg.max_state_dim), x, torch.ones(1))
        flags = suf.flags[0].tolist()
        assert flags[: len(want_first)] == want_first
        assert set(flags[len(want_first):]) == {want_rest}


def test_training_loss_is_deterministic_given_noise_and_time():
    cfg = narrow_config("tiny")
    model = FlowMatchingVLA(cfg.model)
    images, ids, pad, state = model_inputs(cfg)
    actions = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    noise, t = torch.randn_like(actions), torch.tensor([0.5, 0.1])
    l1, _ = model(images, ids, pad, state, actions, noise, t)
    l2, _ = model(images, ids, pad, state, actions, noise, t)
    assert torch.equal(l1, l2) and l1.shape == actions.shape
