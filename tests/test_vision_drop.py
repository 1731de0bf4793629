"""Dropping pruned tokens inside the vision tower (``model.pruner.tower_layer``): the fast
path against its masked twin, the group order against the pixel shuffle, training against
inference inside both families (the parallel one's SigLIP tower, a timm tower with prefix
tokens read at an earlier block, and OpenVLA's fused pair), keeping everything against the
unpruned model, the work actually saved, and actionable errors."""

import pytest
import torch
from helpers import model_inputs, narrow_config, params_without_gradient

from memvla.layers.connector import pixel_shuffle
from memvla.layers.vision_drop import (
    TowerPreview,
    finish_kept,
    finish_masked,
    group_major_order,
    tower_head,
)
from memvla.models.flow_vla import FlowMatchingVLA
from memvla.models.parallel_vla import PATCH, ParallelVLA
from memvla.presets import get_preset


def tower_config(k=0, *extra):
    return get_preset("tiny", ["model.pruner.enabled=true", f"model.pruner.tower_layer={k}",
                               "model.num_steps=2", "model.pruner.noise_scale=0", *extra])


def model_for(cfg, seed=0):
    torch.manual_seed(seed)
    return FlowMatchingVLA(cfg.model, cfg.context, num_cameras=len(cfg.cameras))


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_group_major_order_is_the_pixel_shuffle(scale):
    x = torch.randn(2, 64, 5)  # an 8×8 grid
    order = group_major_order(8, scale)
    assert torch.equal(x[:, order].reshape(2, 64 // scale**2, -1), pixel_shuffle(x, scale))


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("scale", [1, 2])
def test_finish_kept_equals_its_masked_twin(k, scale):
    cfg = tower_config(k, f"model.connector_scale={scale}")
    encoder = model_for(cfg).image_encoder
    images = model_inputs(cfg, b=3)[0][0]
    feats = tower_head(encoder.vision, images, k)
    g = cfg.model.tokens_per_image
    keep = torch.rand(3, g, generator=torch.Generator().manual_seed(1)) > 0.6
    keep[0] = False  # a camera can lose every token (the pruner votes over all cameras)
    keep[1, :2] = True
    fast, slow = finish_kept(encoder, feats, k, keep), finish_masked(encoder, feats, k, keep)
    assert (fast[~keep] == 0).all()
    assert (fast[keep] - slow[keep]).abs().max().item() < 1e-5
    every = torch.ones(3, g, dtype=torch.bool)
    assert (finish_kept(encoder, feats, k, every) - encoder(images)).abs().max().item() < 1e-5


def test_the_remaining_layers_run_on_the_kept_patches_only():
    cfg = tower_config(1)
    encoder = model_for(cfg).image_encoder
    images = model_inputs(cfg, b=2)[0][0]
    seen = []
    layer = encoder.vision.encoder.layers[1]
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[1]))
    keep = torch.zeros(2, cfg.model.tokens_per_image, dtype=torch.bool)
    keep[0, [1, 5, 6]] = True
    keep[1, [0, 2]] = True
    finish_kept(encoder, tower_head(encoder.vision, images, 1), 1, keep)
    handle.remove()
    assert seen == [3 * cfg.model.connector_scale ** 2]  # the largest kept count × s²


@pytest.mark.parametrize("k,max_keep", [(0, 0), (1, 0), (0, 3)])
def test_training_prefix_holds_what_inference_computes(k, max_keep):
    cfg = tower_config(k, 'cameras=["top","wrist"]', f"model.pruner.max_keep={max_keep}")
    model = model_for(cfg)
    images, ids, pad, state, _ = model_inputs(cfg)
    train = model.train().embed_prefix(images, ids, pad, state)
    infer = model.eval().embed_prefix(images, ids, pad, state)
    t, i = train[0], infer[0]  # the pruned image part
    assert torch.equal(t.pad.sum(1), i.pad.sum(1))
    assert 0 < int(i.pad.sum(1).min()) < 2 * cfg.model.tokens_per_image
    if max_keep:  # training is bounded as inference is
        assert int(t.pad.sum(1).max()) <= max_keep
    for b in range(2):
        kept_t = t.embs[b][t.pad[b]]
        kept_i = i.embs[b][i.pad[b]]
        assert (kept_t - kept_i).abs().max().item() < 1e-5
        assert torch.equal(t.positions[b][t.pad[b]], i.positions[b][i.pad[b]])


def test_keeping_every_token_equals_the_unpruned_model():
    plain_cfg = get_preset("tiny", ["model.num_steps=2"])
    cfg = tower_config(1, "model.pruner.min_keep=16")
    plain, pruned = model_for(plain_cfg).eval(), model_for(cfg).eval()
    pruned.load_state_dict(plain.state_dict())
    images, ids, pad, state, _ = model_inputs(cfg)
    noise = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    want, _ = plain.sample_actions(images, ids, pad, state, noise=noise)
    got, _ = pruned.sample_actions(images, ids, pad, state, noise=noise)
    assert pruned.last_prune_stats["keep_ratio"] == 1.0
    assert (got - want).abs().max().item() < 1e-5


def test_trains_every_parameter_and_samples_as_its_uncached_twin():
    cfg = tower_config(1, "model.pruner.noise_scale=0.5")
    model = model_for(cfg)
    images, ids, pad, state, _ = model_inputs(cfg)
    actions = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    losses, _ = model(images, ids, pad, state, actions)
    losses.mean().backward()
    missing = params_without_gradient(model)
    assert not missing
    model.eval()
    noise = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    fast, _ = model.sample_actions(images, ids, pad, state, noise=noise)
    assert model.last_prune_stats["kept"] < cfg.model.tokens_per_image
    slow, _ = model.sample_actions_uncached(images, ids, pad, state, noise=noise)
    assert (fast - slow).abs().max().item() < 1e-5


# the parallel family's towers: SigLIP's layout; timm's with class and register tokens read
# at the second-to-last block; OpenVLA's fused DINOv2 + SigLIP pair (both timm)
TIMM = ["model.vision.layout=timm", "model.vision.class_token=true",
        "model.vision.reg_tokens=2", "model.vision.feature_layer=1", "model.vision.depth=3"]
PARALLEL_TOWERS = {"siglip": ("tiny-oft", []), "timm": ("tiny-oft", TIMM),
                   "fused": ("openvla-oft-7b", ["model.vision.depth=3",
                                                "model.vision_fused.depth=3"])}


def parallel_config(tower, k=0, *extra):
    name, towers = PARALLEL_TOWERS[tower]
    return narrow_config(name, 2, [*towers, "model.pruner.enabled=true",
                                   f"model.pruner.tower_layer={k}",
                                   "model.pruner.noise_scale=0", *extra])


def parallel_model(cfg, seed=0):
    torch.manual_seed(seed)
    return ParallelVLA(cfg.model, num_cameras=len(cfg.cameras))


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("tower", sorted(PARALLEL_TOWERS))
def test_parallel_towers_finish_kept_as_their_masked_twin(tower, k):
    cfg = parallel_config(tower, k)
    encoder = parallel_model(cfg).image_encoder
    images = model_inputs(cfg, b=3)[0][0]
    states = tower_head(encoder.vision, images, k)  # one per tower
    assert len(states) == (2 if tower == "fused" else 1)
    g = cfg.model.tokens_per_image
    keep = torch.rand(3, g, generator=torch.Generator().manual_seed(1)) > 0.6
    keep[0] = False
    fast, slow = finish_kept(encoder, states, k, keep), finish_masked(encoder, states, k, keep)
    assert (fast[~keep] == 0).all()
    assert (fast[keep] - slow[keep]).abs().max().item() < 1e-5
    every = torch.ones(3, g, dtype=torch.bool)
    assert (finish_kept(encoder, states, k, every) - encoder(images)).abs().max().item() < 1e-5


@pytest.mark.parametrize("tower", sorted(PARALLEL_TOWERS))
def test_parallel_training_sequence_holds_what_inference_computes(tower):
    cfg = parallel_config(tower, 1, "model.pruner.max_keep=20")
    model = parallel_model(cfg)
    images, ids, pad, state, _ = model_inputs(cfg)
    train = model.train().encode(images, ids, pad, state)
    infer = model.eval().encode(images, ids, pad, state)
    assert torch.equal(train.kept, infer.kept) and int(infer.kept.min()) > 0
    assert int(train.kept.max()) <= 20 < cfg.model.tokens_per_image
    for b in range(2):
        t, i = train.kinds[b] == PATCH, infer.kinds[b] == PATCH
        assert (train.embs[b][t] - infer.embs[b][i]).abs().max().item() < 1e-5
        assert torch.equal(train.positions[b][t], infer.positions[b][i])


def test_parallel_keeping_every_token_equals_the_unpruned_model():
    cfg = parallel_config("fused", 1, f"model.pruner.min_keep={64}")
    plain_cfg = narrow_config("openvla-oft-7b", 2, PARALLEL_TOWERS["fused"][1])
    plain, pruned = parallel_model(plain_cfg).eval(), parallel_model(cfg).eval()
    pruned.load_state_dict(plain.state_dict())
    images, ids, pad, state, _ = model_inputs(cfg)
    want, _ = plain.predict(images, ids, pad, state)
    got, _ = pruned.predict(images, ids, pad, state)
    assert int(pruned.pruner.last_kept.min()) == cfg.model.tokens_per_image == 64
    assert (got - want).abs().max().item() < 1e-5


def test_parallel_tower_trains_every_parameter():
    cfg = parallel_config("siglip", 1, "model.pruner.noise_scale=0.5")
    model = parallel_model(cfg).train()
    images, ids, pad, state, _ = model_inputs(cfg)
    actions = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    losses, _ = model(images, ids, pad, state, actions)
    losses.mean().backward()
    assert not params_without_gradient(model)


def test_preview_splits_the_cameras_or_says_why():
    cfg = tower_config(0)
    previews = TowerPreview(model_for(cfg).image_encoder, 0)
    with pytest.raises(RuntimeError, match="no camera was encoded"):
        previews.finish(torch.ones(1, 16, dtype=torch.bool), fast=True)
    previews(model_inputs(cfg, b=1)[0][0])
    previews(model_inputs(cfg, b=1)[0][0])
    with pytest.raises(ValueError, match="17 kept flags do not split into 2 cameras"):
        previews.finish(torch.ones(1, 17, dtype=torch.bool), fast=True)


@pytest.mark.parametrize("preset, extra, match", [
    ("tiny", ["model.pruner.tower_layer=2"],
     r"model.pruner.tower_layer must be below the 2 blocks .* got 2"),
    ("openvla-oft-7b", ["model.pruner.tower_layer=23"],  # DINOv2's 24 blocks, read at 23
     r"model.pruner.tower_layer must be below the 23 blocks .* got 23"),
    ("tiny-oft", ["model.pruner.tower_layer=0", "model.vision.reuse=true"],
     r"model.vision.reuse=false or model.pruner.tower_layer=null"),
    ("tiny", ["model.pruner.tower_layer=-1"], r"pruner.tower_layer must be None .* got -1"),
    ("tiny", ["model.pruner.tower_layer=0", "model.vision.reuse=true"],
     r"model.vision.reuse=false or model.pruner.tower_layer=null"),
    ("tiny", ["model.pruner.tower_layer=0", "context.kind=frames", "context.frames_mode=mem"],
     r"context.frames_mode='mem' runs over the frame history"),
])
def test_bad_tower_layer_is_actionable(preset, extra, match):
    with pytest.raises(ValueError, match=match):
        get_preset(preset, ["model.pruner.enabled=true", *extra])
