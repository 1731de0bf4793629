"""Vision-token reuse across frames: exact at the ends (everything / nothing changed), the
batched path against its per-patch twin (the SigLIP layout and a timm tower with class and
register tokens read at an earlier block), the policy carrying the cache through an
episode (inference only; OpenVLA's fused pair too), and actionable errors."""

import pytest
import torch
from helpers import fake_batch, narrow_config

from memvla.config_utils import apply_overrides
from memvla.layers.vision import VisionTransformer
from memvla.layers.vision_reuse import (
    VisionReuse,
    changed_patches,
    full_forward,
    reuse_forward,
    reuse_forward_ref,
)
from memvla.layers.vit_timm import TimmViT
from memvla.policies import make_policy
from memvla.presets import get_preset


def tower(seed=0, layout="siglip"):
    torch.manual_seed(seed)
    if layout == "timm":  # 3 blocks read at the second-to-last, a class and 2 registers
        return TimmViT(width=32, depth=3, heads=4, mlp_dim=64, image_size=32, patch_size=8,
                       class_token=True, reg_tokens=2, layer_scale=True,
                       feature_layer=1).eval()
    return VisionTransformer(width=32, depth=2, heads=4, mlp_dim=64, image_size=32,
                             patch_size=8).eval()


LAYOUTS = pytest.mark.parametrize("layout", ["siglip", "timm"])


def frames(seed=0):
    """(previous, current) (3, 3, 32, 32): sample 0 changes one patch, sample 1 a 2×2
    block of patches, sample 2 nothing."""
    g = torch.Generator().manual_seed(seed)
    prev = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    cur = prev.clone()
    cur[0, :, :8, :8] += 0.5
    cur[1, :, 8:24, 8:24] -= 0.5
    return prev, cur


def test_changed_patches_are_the_ones_whose_pixels_moved():
    prev, cur = frames()
    changed = changed_patches(prev, cur, 8, 0.1)  # (B, 16)
    assert changed.sum(1).tolist() == [1, 4, 0]
    assert changed[0, 0] and changed[1, [5, 6, 9, 10]].all()
    assert not changed_patches(prev, cur, 8, 0.6).any()  # a threshold above the change


@LAYOUTS
def test_full_forward_is_the_tower_and_reuse_is_exact_at_the_ends(layout):
    vit, (prev, _) = tower(layout=layout), frames()
    with torch.no_grad():
        feats, cache = full_forward(vit, prev)
        assert torch.equal(feats, vit(prev))
        again, same, changed = reuse_forward(vit, prev, cache, 0.0)  # nothing changed
        assert not changed.any() and same is cache and torch.equal(again, feats)
        other = torch.rand_like(prev) * 2 - 1  # everything changed: the full forward
        got, _, changed = reuse_forward(vit, other, cache, 0.0)
        assert changed.all() and (got - vit(other)).abs().max() < 1e-5
        first, new, changed = reuse_forward(vit, prev, None, 0.0)  # no cache yet
        assert changed.all() and torch.equal(first, feats) and len(new.keys) == 2


@LAYOUTS
def test_batched_reuse_equals_the_per_patch_reference(layout):
    vit, (prev, cur) = tower(1, layout), frames(1)
    r = vit.num_prefix
    with torch.no_grad():
        _, cache = full_forward(vit, prev)
        got, new, changed = reuse_forward(vit, cur, cache, 0.1)
        want = reuse_forward_ref(vit, cur, cache, 0.1)
        assert (got - want).abs().max() < 1e-5
        assert torch.equal(got[2], vit.head(cache.hidden[-1][2:3])[0])  # unchanged sample
        assert not torch.equal(got[1], vit.head(cache.hidden[-1][1:2])[0])
        # the unchanged patches keep their states; the changed ones are recomputed
        assert torch.equal(new.hidden[-1][0, r + 1:], cache.hidden[-1][0, r + 1:])
        assert torch.equal(new.images, cur)
        assert (got - vit(cur)).abs().max() > 0  # an approximation in between


@pytest.mark.parametrize("preset", ["tiny", "tiny-oft"])
def test_policy_reuses_within_an_episode_only_at_inference(preset):
    cfg = get_preset(preset, ["model.vision.reuse=true"])
    torch.manual_seed(0)
    policy = make_policy(cfg).eval()
    plain = make_policy(get_preset(preset)).eval()
    plain.load_state_dict(policy.state_dict())
    reuse = policy.model.vision_reuse
    obs = fake_batch(cfg, with_actions=False)
    kw = {"noise": torch.zeros(2, 8, 8)} if cfg.family == "flow" else {}
    with torch.no_grad():
        first = policy.predict_action_chunk(obs, **kw)
        assert torch.equal(first, plain.predict_action_chunk(obs, **kw))  # nothing cached
        assert reuse.changed == [1.0] and set(reuse.caches) == {(0, 0)}  # (camera, tower)
        assert torch.equal(policy.predict_action_chunk(obs, **kw), first)  # nothing moved
        assert reuse.changed[-1] == 0.0
    policy.reset()
    assert not reuse.caches
    policy.train()  # training runs the whole tower and leaves the cache alone
    torch.manual_seed(1)  # the flow loss draws its noise and times
    loss, _ = policy(fake_batch(cfg))
    torch.manual_seed(1)
    want, _ = plain.train()(fake_batch(cfg))
    assert torch.allclose(loss, want) and not reuse.caches


def test_the_fused_towers_reuse_tower_by_tower():
    cfg = narrow_config("openvla-oft-7b", 2, ["model.vision.depth=2",
                                              "model.vision_fused.depth=2",
                                              "model.vision.reuse=true"])
    torch.manual_seed(0)
    policy = make_policy(cfg).eval()
    plain = make_policy(apply_overrides(cfg, ["model.vision.reuse=false"])).eval()
    plain.load_state_dict(policy.state_dict())
    reuse = policy.model.vision_reuse
    obs = fake_batch(cfg, with_actions=False)
    with torch.no_grad():
        first = policy.predict_action_chunk(obs)
        assert (first - plain.predict_action_chunk(obs)).abs().max() < 1e-5
        assert set(reuse.caches) == {(0, 0), (0, 1)}  # camera 0, both towers
        assert torch.equal(policy.predict_action_chunk(obs), first)  # nothing moved
        assert reuse.changed[-2:] == [0.0, 0.0]


def test_errors_are_actionable():
    with pytest.raises(ValueError, match=r"vision.reuse_threshold must be >= 0 .* got -0.1"):
        get_preset("tiny", ["model.vision.reuse_threshold=-0.1"])
    with pytest.raises(ValueError, match="vision.reuse_threshold must be >= 0"):
        VisionReuse(-1.0)
    with pytest.raises(ValueError, match="context.frames_mode='mem' encodes it with its "
                                         "history"):
        make_policy(get_preset("tiny", ["model.vision.reuse=true", "context.kind=frames",
                                        "context.frames_mode=mem"]))
