"""``context.hold_weight``: memory tokens taught not to move while the observation stands
still (the trained memory a fixed point of the write over a delay)."""

import pytest
import torch
from helpers import episode_batch, narrow_config

from memvla.layers.memory_tokens import hold_penalty, hold_penalty_reference
from memvla.policies import make_policy
from memvla.policies.episodes import unchanged_observation


def hold_config(weight: float, extra=()):
    return narrow_config("tiny", extra=["context.kind=memory_tokens", "context.num_tokens=3",
                                        f"context.hold_weight={weight}", *extra])


def test_hold_penalty_matches_its_reference_and_counts_only_unchanged_samples():
    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    unchanged = torch.tensor([True, False, True, False])
    total, count = hold_penalty(old, new, unchanged)
    ref_total, ref_count = hold_penalty_reference(old, new, unchanged)
    assert count == ref_count == 2
    assert torch.allclose(total.double(), ref_total.double(), rtol=1e-5)
    # a memory that does not move costs nothing; a changed observation never counts
    assert hold_penalty(old, old.clone(), unchanged)[0] == 0
    assert hold_penalty(old, new, torch.zeros(4, dtype=torch.bool)) == (0, 0)
    # the write is what is taught: no gradient reaches the old memory
    old.requires_grad_(True)
    new.requires_grad_(True)
    hold_penalty(old, new, unchanged)[0].backward()
    assert old.grad is None and new.grad[1].abs().sum() == 0 and new.grad[0].abs().sum() > 0


def test_unchanged_observation_compares_every_feature_within_the_threshold():
    img = torch.rand(3, 3, 8, 8)
    before = {"observation.images.top": img, "observation.state": torch.zeros(3, 2),
              "task": ["t"] * 3}
    after = {"observation.images.top": img.clone(), "observation.state": torch.zeros(3, 2),
             "task": ["t"] * 3}
    after["observation.images.top"][1, 0, 2, 2] += 0.5  # one pixel of sample 1
    after["observation.state"][2, 1] = 0.005  # within the threshold
    assert unchanged_observation(before, after, 0.01).tolist() == [True, False, True]
    after["observation.state"][0, 0] = 0.02
    assert unchanged_observation(before, after, 0.01).tolist() == [False, False, True]
    u8 = {"observation.images.top": torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)}
    u8_after = {"observation.images.top": torch.full((1, 3, 4, 4), 101, dtype=torch.uint8)}
    assert unchanged_observation(u8, u8_after, 0.01).tolist() == [True]  # 1/255 < 0.01
    assert unchanged_observation(u8, u8_after, 0.001).tolist() == [False]
    with pytest.raises(ValueError, match="observation"):
        unchanged_observation({"task": ["t"]}, {"task": ["t"]}, 0.01)


def _still_episodes(cfg, b=2, s=4):
    """Random episodes whose last three segments repeat the first one's observation in
    sample 0 only."""
    batch = episode_batch(cfg, b=b, s=s)
    for value in batch.observation.values():
        value[0, 1:] = value[0, :1]
    return batch


def test_hold_loss_adds_the_memory_change_over_the_still_writes_and_trains_the_write():
    torch.manual_seed(0)
    held = make_policy(hold_config(2.0, ["context.write=norm"]))  # every parameter in use
    free = make_policy(hold_config(0.0, ["context.write=norm"]))
    free.load_state_dict(held.state_dict())
    batch = _still_episodes(held.config)
    torch.manual_seed(1)
    loss, info = held(batch, bptt_depth=-1)
    torch.manual_seed(1)
    base, base_info = free(batch, bptt_depth=-1)
    assert info["held_writes"] == 3  # sample 0's segments 1, 2, 3; sample 1 always moves
    assert info["hold"] > 0 and "hold" not in base_info
    assert torch.allclose(loss, base + 2.0 * info["hold"], rtol=1e-5)
    loss.backward()
    for n, p in held.model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_hold_options_get_actionable_errors():
    with pytest.raises(ValueError, match=r"context.hold_weight weighs .* >= 0 .*got -1"):
        hold_config(-1)
    with pytest.raises(ValueError, match=r"context.hold_threshold is .* >= 0; got -0.5"):
        hold_config(0.5, ["context.hold_threshold=-0.5"])
    with pytest.raises(ValueError, match=r"context.hold_weight is an option of "
                                         r"context.kind='memory_tokens', not of 'frames'"):
        narrow_config("tiny", extra=["context.kind=frames", "context.hold_weight=1.0"])
