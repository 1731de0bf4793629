"""StreamVLN's slow-fast context: the window schedules of the fast cache (hard reset,
sliding), streaming inside a window equals recomputing the window from scratch, the slow
memory's frames, bad options."""

import pytest
import torch
from helpers import narrow_config

from memvla.configs import ContextConfig
from memvla.context import SlowFastContext
from memvla.context.history import history_indices
from memvla.policies import make_policy

FAMILIES = ["tiny", "tiny-oft"]


def _policy(*extra, preset: str = "tiny"):
    torch.manual_seed(0)
    steps = ["model.num_steps=2"] if preset == "tiny" else []
    cfg = narrow_config(preset, extra=[*steps, "context.kind=slow_fast", *extra])
    return make_policy(cfg).eval()


def _obs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"observation.images.top": torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8,
                                                    generator=g),
            "observation.state": torch.randn(1, 3, generator=g),
            "task": ["go back to the red marker"]}


def _turns(policy, n: int) -> list[dict]:
    """The carried state after each of ``n`` predicted chunks."""
    policy.reset()
    states = []
    for t in range(n):
        policy.predict_action_chunk(_obs(t), noise=_noise(policy, zeros=True))
        states.append(policy.context_state)
    return states


def _noise(policy, zeros: bool = False):
    """The flow family's noise of one chunk; the parallel family takes none."""
    if policy.config.family != "flow":
        return None
    m = policy.config.model
    return (torch.zeros if zeros else torch.randn)(1, m.chunk_size, m.max_action_dim)


def _turns_in_cache(state) -> set[int]:
    cache = state["cache"]
    return set() if cache is None else set(cache["turn_of_key"][0].tolist())


@pytest.mark.parametrize("preset", FAMILIES)
def test_the_cache_resets_every_num_turns_turns(preset):
    states = _turns(_policy("context.num_turns=3", preset=preset), 7)
    # after turns 0, 1 the next turn sees them; after turn 2 a new window starts
    assert [_turns_in_cache(s) for s in states] == [{0}, {0, 1}, set(), {3}, {3, 4}, set(),
                                                    {6}]
    assert [s["turn"] for s in states] == list(range(1, 8))


@pytest.mark.parametrize("preset", FAMILIES)
def test_the_sliding_window_never_exceeds_its_size(preset):
    states = _turns(_policy("context.num_turns=3", "context.window=slide", preset=preset), 7)
    for t, s in enumerate(states):  # the next turn sees at most num_turns - 1 earlier ones
        assert _turns_in_cache(s) == set(range(max(0, t - 1), t + 1))
    # the full-history baseline grows
    whole = _turns(_policy("context.num_turns=0", preset=preset), 5)
    assert [_turns_in_cache(s) for s in whole] == [set(range(t + 1)) for t in range(5)]
    lengths = [s["cache"]["pad"].shape[1] for s in whole]
    assert lengths == [lengths[0] * (t + 1) for t in range(5)]


@pytest.mark.parametrize("preset", FAMILIES)
def test_streaming_inside_a_window_equals_recomputing_it_from_scratch(preset):
    policy = _policy("context.num_turns=3", "context.num_history=0", preset=preset)
    noise = _noise(policy)
    policy.reset()
    for t in range(4):  # turns 0..2 fill a window; turn 3 starts the next one
        policy.predict_action_chunk(_obs(t), noise=noise)
    streamed = [policy.predict_action_chunk(_obs(t), noise=noise) for t in (4, 5)]
    # from scratch: a fresh episode that starts at the window's first turn (3)
    policy.reset()
    fresh = [policy.predict_action_chunk(_obs(t), noise=noise) for t in (3, 4, 5)]
    for a, b in zip(streamed, fresh[1:], strict=True):
        assert (a - b).abs().max().item() <= 1e-5


def test_the_slow_memory_holds_pooled_frames_of_the_turns_before_the_window():
    ctx = SlowFastContext(ContextConfig(kind="slow_fast", num_turns=4, num_history=2), 64)
    assert [ctx.slow_turns(t) for t in (0, 3, 4, 7, 8, 12)] == [
        [], [], history_indices(4, 2), history_indices(4, 2), history_indices(8, 2),
        history_indices(12, 2)[:2]]
    policy = _policy("context.num_turns=2", "context.num_history=2")
    states = _turns(policy, 3)
    frames = states[-1]["frames"][0]  # every turn's frame, in a buffer that doubles
    assert frames.shape[1] >= 3 and frames.shape[2:] == (3, 64, 64)
    for t in range(3):
        torch.testing.assert_close(frames[:, t], policy.encode_observation(_obs(t))[0][0])
    frames = _turns(policy, 10)[-1]["frames"][0]  # past its first capacity (8)
    assert frames.shape[1] == 16
    for t in (0, 7, 8, 9):
        torch.testing.assert_close(frames[:, t], policy.encode_observation(_obs(t))[0][0])
    # at turn 2 (a new window) the prefix holds 2 pooled past frames of 16 -> 4 tokens each
    images, ids, pad, state = policy.encode_observation(_obs(2))
    parts = policy.model.embed_prefix(images, ids, pad, state, states[1])
    plain = policy.model.embed_prefix(images, ids, pad, state, policy.model.initial_state(1))
    assert sum(p.length for p in parts) - sum(p.length for p in plain) == 2 * 4


def test_bad_slow_fast_options():
    with pytest.raises(ValueError, match=r"context.num_turns must be >= 1 turn \(or 0: the "
                       r"whole episode\), got -1"):
        ContextConfig(kind="slow_fast", num_turns=-1)
    with pytest.raises(ValueError, match=r"context.window must be one of \('reset', 'slide'\)"):
        ContextConfig(kind="slow_fast", window="ring")
    with pytest.raises(ValueError, match=r"context.num_turns is an option of "
                       r"context.kind='slow_fast', not of 'frames'"):
        ContextConfig(kind="frames", num_turns=3)
