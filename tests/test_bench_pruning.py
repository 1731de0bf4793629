"""The pruning benchmarks run end to end at their smallest settings: the collapse trace,
the pruned SmolVLA-width stack of several cameras, and vision reuse's timed calls."""

import argparse
import json

import torch

from memvla.cli import main


def bench_args(module, argv):
    from memvla.policies import policy_device

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.device = policy_device("cpu")
    return args


def test_pruning_collapse_traces_every_variant(tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert main(["bench", "pruning-collapse", "--episodes", "6", "--steps", "2", "--every",
                 "1", "--out", str(tmp_path / "w"), "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert set(res["traces"]) == {"unpruned", "released", "no-gradient", "dropped", "centred",
                                  "default"}
    for rows in res["traces"].values():
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert all(1 <= r["kept_min"] <= r["kept"] <= r["of"] == 16 for r in rows)
        assert all(-1 <= r["cos"] <= 1 for r in rows)
    assert "kept of 16 visual tokens" in capsys.readouterr().out


def test_pruning_cost_builds_the_pruned_stack_for_every_camera():
    from memvla.bench import pruning

    args = bench_args(pruning, ["--depth", "1", "--vision-depth", "1", "--cameras", "2",
                                "--connector-scale", "4", "--keep", "0.25"])
    base, full, pruned, p, k = pruning.build_models(args)
    assert p == 2 * base.model.tokens_per_image and k == round(0.25 * p)
    images, ids, pad, state = pruning.model_inputs(base, pruning.SHORT_PROMPT, 1, 0,
                                                   args.device)
    with torch.inference_mode():
        cut, _ = pruned.prefill(images, ids, pad, state)
        whole, _ = full.prefill(images, ids, pad, state)
    assert len(whole) - len(cut) == p - k


def test_pruning_cost_drops_patches_inside_the_tower():
    from memvla.bench import pruning

    args = bench_args(pruning, ["--depth", "1", "--vision-depth", "2", "--tower-layer", "1",
                                "--keep", "0.25"])
    base, full, pruned, p, k = pruning.build_models(args)
    assert pruned.cfg.pruner.tower_layer == 1 and full.cfg.pruner.tower_layer is None
    images, ids, pad, state = pruning.model_inputs(base, pruning.SHORT_PROMPT, 1, 0,
                                                   args.device)
    seen = []
    layer = pruned.vlm_with_expert.vlm.model.vision_model.encoder.layers[1]
    layer.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[1]))
    with torch.inference_mode():
        cut, _ = pruned.prefill(images, ids, pad, state)
    per_camera = base.model.vision.grid ** 2
    assert len(seen) == args.cameras and max(seen) < per_camera  # kept groups only
    assert len(cut) == len(full.prefill(images, ids, pad, state)[0]) - (p - k)


def test_pruning_success_variants_are_chosen_by_name():
    import pytest

    from memvla.bench import pruning

    args = bench_args(pruning, ["--success", "--tower-layer", "0",
                                "--variants", "flow-pruned,flow-tower,oft-tower"])
    chosen = pruning.chosen_variants(args)
    assert [v.name for v in chosen] == ["flow-pruned", "flow-tower", "oft-tower"]
    assert "policy.model.pruner.tower_layer=0" in chosen[1].overrides
    assert "policy.model.pruner.tower_layer=0" in chosen[2].overrides
    assert chosen[2].preset == "tiny-oft"
    args = bench_args(pruning, ["--success", "--variants", "flow,flow-tower"])
    with pytest.raises(ValueError, match=r"unknown \['flow-tower'\].*need --tower-layer"):
        pruning.chosen_variants(args)


def test_vision_reuse_times_every_call():
    from memvla.bench import vision_reuse

    args = bench_args(vision_reuse, ["--depth", "1", "--vision-depth", "1"])
    base, models, k, p = vision_reuse._models(args, 0.25)
    prev, cur = vision_reuse._frames(base, 0.5, 0, args.device)
    from memvla.layers.vision_reuse import full_forward

    vit = models["full"].vlm_with_expert.vlm.model.vision_model
    ids = torch.ones(1, 4, dtype=torch.long)
    pad = torch.ones(1, 4, dtype=torch.bool)
    state = torch.zeros(1, base.model.max_state_dim)
    noise = torch.zeros(1, base.model.chunk_size, base.model.max_action_dim)
    with torch.inference_mode():
        caches = {cam: full_forward(vit, img)[1] for cam, img in enumerate(prev)}
        calls = vision_reuse._calls(models, vit, caches, cur, ids, pad, state, noise)
        assert set(calls) == {"tower full", "tower reuse", *(f"{w} {n}" for w in (
            "prefill", "chunk") for n in ("full", "reuse", "pruned", "pruned+reuse"))}
        x, _ = calls["chunk full"]()
        y, _ = calls["chunk reuse"]()
        assert x.shape == y.shape and torch.isfinite(y).all()
        assert models["reuse"].vision_reuse.changed[-1] > 0.3  # about half the patches moved
