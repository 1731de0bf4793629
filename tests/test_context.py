"""The temporal-context interface: state trees (detach, select, batch), the registry, and
what every kind must do behind a policy: step-by-step inference with carried state equals
the episode training forward, ``reset()`` clears the state, the state changes from one
step to the next, a save/load round trip gives the same actions."""

import pytest
import torch
from helpers import narrow_config

from memvla.config_utils import apply_overrides
from memvla.configs import ContextConfig
from memvla.context import (
    CONTEXTS,
    TemporalContext,
    detach_state,
    make_context,
    map_state,
    select_state,
    state_batch,
    state_leaves,
)
from memvla.data.segments import SegmentBatch
from memvla.policies import load_policy, make_policy

KINDS = {"none": [], "memory_tokens": ["context.kind=memory_tokens", "context.num_tokens=3"]}


def test_every_registered_kind_is_tested_here():
    assert set(KINDS) == set(CONTEXTS)


def test_state_trees_detach_select_and_batch():
    a = torch.randn(2, 3, requires_grad=True)
    state = {"memory": a * 2, "frames": [torch.zeros(2, 4), torch.ones(2, 1, 5)], "t": 7}
    assert state_batch(state) == 2 and state_batch(None) is None
    assert len(state_leaves(state)) == 3
    d = detach_state(state)
    assert not d["memory"].requires_grad and d["t"] == 7 and detach_state(None) is None
    new = map_state(lambda x: x + 10, state)
    assert new["t"] == 7 and torch.equal(new["frames"][1], state["frames"][1] + 10)
    keep = torch.tensor([True, False])
    picked = select_state(keep, state, new)
    assert torch.equal(picked["frames"][1][0], state["frames"][1][0])
    assert torch.equal(picked["frames"][1][1], new["frames"][1][1])
    assert torch.equal(picked["memory"][1], new["memory"][1])
    assert select_state(keep, None, new) is new  # a fresh episode takes the new state


def test_registry_and_state_checks():
    assert type(make_context(ContextConfig(), 16)) is TemporalContext
    ctx = make_context(ContextConfig(kind="memory_tokens", num_tokens=2), 16)
    assert ctx.recurrent and ctx.initial_state(3).shape == (3, 2, 16)
    with pytest.raises(ValueError, match=r"observation batch size 2 differs from the 3 episodes "
                       r"whose memory_tokens state this policy holds; call reset\(\) first"):
        ctx.check_state(ctx.initial_state(3), 2)
    with pytest.raises(ValueError, match=r"context.kind must be one of \('none', "
                       r"'memory_tokens'\), got 'tape'"):
        ContextConfig(kind="tape")


def _episode(cfg, s=3, b=2, seed=0) -> SegmentBatch:
    g = torch.Generator().manual_seed(seed)
    a, (c, h, w) = cfg.model.chunk_size, cfg.image_shape
    return SegmentBatch(
        observation={"observation.images.top": torch.rand(b, s, c, h, w, generator=g),
                     "observation.state": torch.randn(b, s, cfg.state_dim, generator=g)},
        action=torch.randn(b, s, a, cfg.action_dim, generator=g),
        action_is_pad=torch.zeros(b, s, a, dtype=torch.bool),
        segment_is_pad=torch.zeros(b, s, dtype=torch.bool),
        frame_index=(torch.arange(s) * a).expand(b, s), episode_index=torch.arange(b),
        length=torch.full((b,), s * a), task=["remember the colour and touch it later"] * b)


def _obs(seg: dict) -> dict:
    return {k: seg[k] for k in ("observation.images.top", "observation.state", "task")}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_kind_streams_as_it_trains_resets_changes_and_round_trips(kind, tmp_path):
    torch.manual_seed(0)
    cfg = narrow_config("tiny", extra=["model.num_steps=2", *KINDS[kind]])
    policy = make_policy(cfg).eval()
    ep = _episode(cfg)
    m = cfg.model
    noises = [torch.randn(2, m.chunk_size, m.max_action_dim) for _ in range(ep.num_segments)]
    # training path: the states forward_episode carries from segment to segment
    states, carried = [], None
    for s in range(ep.num_segments):
        _, _, carried = policy._segment_losses(ep.segment(s), carried)
        states.append(carried)
    # inference path: one chunk per segment, the state held by the policy
    chunks = []
    for s in range(ep.num_segments):
        chunks.append(policy.predict_action_chunk(_obs(ep.segment(s)), noise=noises[s]))
        if policy.is_recurrent:
            assert max((a - b).abs().max().item() for a, b in zip(
                state_leaves(policy.context_state), state_leaves(states[s]), strict=True)) <= 1e-5
    if policy.is_recurrent:  # a state that never changes is a bug
        assert not torch.allclose(state_leaves(states[0])[0], state_leaves(states[1])[0])
    else:
        assert policy.context_state is None and all(s is None for s in states)
    policy.reset()
    assert policy.context_state is None
    again = policy.predict_action_chunk(_obs(ep.segment(0)), noise=noises[0])
    assert torch.equal(again, chunks[0])
    # a save/load round trip gives the same actions, step after step
    loaded = load_policy(policy.save_pretrained(tmp_path / "p"), device="cpu").eval()
    policy.reset()
    for s in range(ep.num_segments):
        want = policy.predict_action_chunk(_obs(ep.segment(s)), noise=noises[s])
        got = loaded.predict_action_chunk(_obs(ep.segment(s)), noise=noises[s])
        torch.testing.assert_close(got, want)


def test_checkpoints_of_earlier_versions_load_under_todays_names(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = narrow_config("tiny", extra=KINDS["memory_tokens"])
    policy = make_policy(cfg)
    d = policy.save_pretrained(tmp_path / "p")
    weights = load_file(d / "model.safetensors")
    weights["memory_tokens.init"] = weights.pop("context.tokens.init")  # the earlier name
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    loaded = load_policy(d, device="cpu")
    assert torch.equal(loaded.model.context.tokens.init, policy.model.context.tokens.init)


def test_a_recurrent_model_needs_its_state():
    cfg = narrow_config("tiny", extra=KINDS["memory_tokens"])
    policy = make_policy(cfg)
    seg = _episode(cfg).segment(0)
    images, ids, pad, state = policy.encode_observation(_obs(seg))
    with pytest.raises(ValueError, match=r"context.kind='memory_tokens' needs its state"):
        policy.model.prefill(images, ids, pad, state)
    plain = make_policy(apply_overrides(cfg, ["context.kind=none"]))
    assert plain.model.initial_state(2) is None
