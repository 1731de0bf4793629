"""Recurrent memory tokens on the flow VLA: masks of both layouts, streaming inference ==
episode training forward, reset, truncated BPTT, bounded memory, bad configs."""

import re

import pytest
import torch
from helpers import narrow_config

from memvla.config_utils import apply_overrides
from memvla.data.segments import SegmentBatch
from memvla.layers.kv_cache import KVCache
from memvla.layers.memory_tokens import clip_rms, clip_rms_reference
from memvla.layers.tokens import TokenSegment
from memvla.models.flow_vla import VLMWithExpert
from memvla.policies import make_policy

M = 3


def memory_config(layout="smolvla", extra=()):
    return narrow_config("tiny", extra=["context.kind=memory_tokens",
                                        f"context.num_tokens={M}", f"context.layout={layout}",
                                        *extra])


def episode_batch(cfg, b=2, s=3, seed=0, lengths=None) -> SegmentBatch:
    g = torch.Generator().manual_seed(seed)
    a, c, h, w = cfg.model.chunk_size, *cfg.image_shape
    lengths = torch.tensor(lengths or [s * a] * b)
    n_seg = (lengths + a - 1) // a
    seg_pad = torch.arange(s)[None] >= n_seg[:, None]  # (B, S)
    steps = torch.arange(s)[:, None] * a + torch.arange(a)  # (S, A)
    return SegmentBatch(
        observation={"observation.images.top": torch.rand(b, s, c, h, w, generator=g),
                     "observation.state": torch.randn(b, s, cfg.state_dim, generator=g)},
        action=torch.randn(b, s, a, cfg.action_dim, generator=g),
        action_is_pad=steps[None] >= lengths[:, None, None],
        segment_is_pad=seg_pad,
        frame_index=torch.where(seg_pad, 0, torch.arange(s)[None] * a),
        episode_index=torch.arange(b), length=lengths,
        task=["remember the colour and touch it later"] * b)


def prefix_of(policy, batch, memory):
    images, ids, pad, state = policy.encode_observation(batch)
    return TokenSegment.cat(policy.model.embed_prefix(images, ids, pad, state, memory))


@pytest.mark.parametrize("layout", ["smolvla", "rmt"])
def test_memory_attention_masks(layout):
    policy = make_policy(memory_config(layout))
    batch = episode_batch(policy.config).segment(0)
    memory = policy.model.initial_memory(2)
    prefix = prefix_of(policy, batch, memory)
    _, _, mask = VLMWithExpert.prefix_layout(prefix, KVCache(1))
    real = prefix.pad[0]
    n = prefix.length
    m = mask[0]
    state = n - 1 if layout == "smolvla" else n - 1 - M  # the state token's index
    if layout == "smolvla":
        mem = slice(0, M)
        assert m[mem][:, real].all(), "memory tokens see every real prefix token"
        assert m[:, mem][real].all(), "every real prefix token sees the memory"
        assert not m[M:state, state].any(), "images/language do not see the state"
    else:
        read, write = slice(0, M), slice(n - M, n)
        assert m[:, read][real].all(), "read tokens are seen by every real token"
        assert not m[read, state].any(), "read tokens do not see the state"
        assert m[write][:, real].all(), "write tokens see the whole prefix"
        assert not m[: n - M, write].any(), "no prefix token sees the write tokens"
    assert not m[:, ~real].any(), "nobody attends padding"


@pytest.mark.parametrize(("layout", "write"), [("smolvla", "norm"), ("rmt", "norm"),
                                               ("smolvla", "clip")])
def test_streaming_inference_equals_episode_forward(layout, write):
    torch.manual_seed(0)
    policy = make_policy(memory_config(layout, [f"context.write={write}"])).eval()
    ep = episode_batch(policy.config, s=4)
    model = policy.model
    # training path: carry the memory through the segments as forward_episode does
    memories, memory = [], None
    for s in range(ep.num_segments):
        _, _, memory = policy._segment_losses(ep.segment(s), memory)
        memories.append(memory)
    # inference path: one predict_action_chunk per segment, memory held by the policy
    policy.reset()
    for s in range(ep.num_segments):
        seg = ep.segment(s)
        obs = {k: seg[k] for k in ("observation.images.top", "observation.state", "task")}
        noise = torch.randn(2, policy.config.model.chunk_size, policy.config.model.max_action_dim)
        read = model.initial_memory(2) if s == 0 else memories[s - 1]
        chunk = policy.predict_action_chunk(obs, noise=noise)
        assert (policy._memory - memories[s]).abs().max().item() <= 1e-5
        ref, _ = model.sample_actions(*policy.encode_observation(obs), noise=noise, memory=read)
        want = policy.normalizer.unnormalize("action", ref[..., : policy.config.action_dim])
        assert (chunk - want).abs().max().item() <= 1e-5
    policy.reset()
    assert policy._memory is None


def test_reset_clears_memory_and_first_chunk_repeats():
    policy = make_policy(memory_config()).eval()
    seg = episode_batch(policy.config).segment(0)
    obs = {k: seg[k] for k in ("observation.images.top", "observation.state", "task")}
    noise = torch.randn(2, policy.config.model.chunk_size, policy.config.model.max_action_dim)
    first = policy.predict_action_chunk(obs, noise=noise)
    second = policy.predict_action_chunk(obs, noise=noise)
    assert not torch.allclose(first, second), "the memory changed the second chunk"
    policy.reset()
    assert torch.equal(policy.predict_action_chunk(obs, noise=noise), first)


@pytest.mark.parametrize("k,flows", [(0, False), (1, True), (-1, True)])
def test_truncated_bptt_gradient_flow(k, flows):
    policy = make_policy(memory_config())
    ep = episode_batch(policy.config, s=2)
    ep.action_is_pad[:, 0] = True  # only segment 1 has a loss
    images = ep.observation["observation.images.top"].requires_grad_(True)
    loss, _ = policy(ep, bptt_depth=k)
    loss.backward()
    g0 = images.grad[:, 0].abs().sum().item()  # gradient reaching segment 0's input
    g1 = images.grad[:, 1].abs().sum().item()
    assert g1 > 0
    assert (g0 > 0) == flows


def test_every_parameter_gets_a_gradient_through_episodes():
    policy = make_policy(memory_config(extra=["context.write=norm"]))
    loss, info = policy(episode_batch(policy.config, s=3, lengths=[24, 13]))
    assert info["segments"] == 3
    loss.backward()
    unused = policy.model.unused_parameter_names()
    assert unused == set()  # tiny has no LM head; memory reads the last layer's output
    for n, p in policy.model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_memory_written_before_the_final_norm_trains_every_other_parameter():
    policy = make_policy(memory_config(extra=["context.write=clip"]))
    loss, _ = policy(episode_batch(policy.config, s=3, lengths=[24, 13]))
    loss.backward()
    unused = policy.model.unused_parameter_names()
    assert unused == {"vlm_with_expert.vlm.model.text_model.norm.weight"}
    for n, p in policy.model.named_parameters():
        if n not in unused:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_memory_stays_bounded_over_a_long_episode():
    policy = make_policy(memory_config(extra=["model.num_steps=1", "context.write=norm"])).eval()
    seg = episode_batch(policy.config, b=1).segment(0)
    obs = {k: seg[k] for k in ("observation.images.top", "observation.state", "task")}
    w = policy.model.vlm_with_expert.text_model.norm.weight.detach()
    bound = (w.abs().max() * w.numel() ** 0.5).item()  # |RMSNorm(x) ⊙ w| <= max|w|·√D
    assert policy.model.memory_norm_bound() == pytest.approx(bound)
    bound *= 1.001
    norms = []
    for _ in range(300):
        policy.predict_action_chunk(obs)
        norms.append(policy._memory.norm(dim=-1).max().item())
    assert max(norms) <= bound
    assert norms[-1] > 0.1 * norms[9]


def test_clipped_memory_stays_within_its_bound():
    policy = make_policy(memory_config(extra=["model.num_steps=1", "context.write=clip",
                                              "context.max_rms=0.5"])).eval()
    seg = episode_batch(policy.config, b=1).segment(0)
    obs = {k: seg[k] for k in ("observation.images.top", "observation.state", "task")}
    bound = 0.5 * policy.model.cfg.text.width ** 0.5 * 1.001  # clip_rms: RMS <= max_rms
    norms = []
    for _ in range(50):
        policy.predict_action_chunk(obs)
        norms.append(policy._memory.norm(dim=-1).max().item())
    assert max(norms) <= bound and max(norms) > 0.9 * bound  # the clip is what holds it


def test_clip_rms_matches_its_reference_and_clips_only_past_the_bound():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 4, 16, generator=g) * torch.tensor([0.5, 1.0, 3.0, 9.0])[None, :, None]
    out = clip_rms(m, 2.0)
    torch.testing.assert_close(out, clip_rms_reference(m, 2.0))
    rms = m.pow(2).mean(-1).sqrt()  # (3, 4)
    out_rms = out.pow(2).mean(-1).sqrt()
    inside = rms <= 2.0
    torch.testing.assert_close(out[inside], m[inside])  # inside the bound: unchanged
    torch.testing.assert_close(out_rms[~inside], torch.full_like(out_rms[~inside], 2.0))
    assert inside.any() and (~inside).any()


def test_bad_memory_configs_and_batches():
    with pytest.raises(ValueError, match="context.num_tokens must be > 0"):
        memory_config(extra=["context.num_tokens=0"])
    with pytest.raises(ValueError, match=r"context.layout must be one of \('smolvla', 'rmt'\)"):
        memory_config(layout="middle")
    with pytest.raises(ValueError, match=r"context.write must be one of \('norm', 'clip'\), "
                       r"got 'layernorm'"):
        memory_config(extra=["context.write=layernorm"])
    with pytest.raises(ValueError, match=r"context.max_rms must be > 0, got 0.0"):
        memory_config(extra=["context.max_rms=0"])
    policy = make_policy(memory_config())
    ep = episode_batch(policy.config, s=2)
    with pytest.raises(ValueError, match=r"bptt_depth \(5\) is larger than the number of "
                       r"segments \(2\)"):
        policy(ep, bptt_depth=5)
    ep.frame_index[0, 1] = 3
    with pytest.raises(ValueError, match=r"starts at frame 3, not at 8: episodes must be cut "
                       r"at multiples of chunk_size=8"):
        policy(ep)
    cfg = apply_overrides(memory_config(), ["context.kind=none"])
    assert not make_policy(cfg).is_recurrent


def test_segment_curriculum():
    from memvla.training.config import TrainConfig

    tc = TrainConfig(curriculum_segments=2, curriculum_every=10)
    assert [tc.max_segments(s) for s in (0, 9, 10, 25)] == [2, 2, 3, 4]
    assert TrainConfig().max_segments(100) is None
    policy = make_policy(memory_config())
    _, info = policy(episode_batch(policy.config, s=3), max_segments=2)
    assert info["segments"] == 2 and info["valid_steps"] == 2 * 2 * 8


def test_cue_sensitivity_sees_a_memory_that_depends_on_the_cue():
    from memvla.bench.memory import cue_sensitivity

    opts = {"image_size": 32, "delay": 3, "palette_size": 3, "layout": "fixed"}
    cfg = memory_config(extra=["model.num_steps=1", "model.vision.image_size=32",
                               "image_shape=[3,32,32]"])
    torch.manual_seed(0)
    policy = make_policy(cfg).eval()
    res = cue_sensitivity(policy, opts, episodes=2)
    assert res["after_cue"] > 1e-3  # untrained: the written memory reads the whole image
    # a memory that ignores its input (what training drove it to in our runs) reads ~0
    with torch.no_grad():
        for p in policy.model.vlm_with_expert.text_model.layers.parameters():
            p.zero_()
    assert cue_sensitivity(policy, opts, episodes=2)["after_cue"] < 1e-6
    with pytest.raises(ValueError, match="needs a memory policy"):
        cue_sensitivity(make_policy(apply_overrides(cfg, ["context.kind=none"])), opts)


def test_long_episode_bench_reports_paired_latency_and_the_norm_bound():
    from memvla.bench.memory import long_episode

    res = long_episode(steps=48, repeats=2)  # default write: clip at max_rms 16
    assert res["chunk_every"] == 8 and res["paired_ratio"] > 0
    assert res["norm_bound"] == pytest.approx(16.0 * 64 ** 0.5)
    assert 0 < res["max_norm"] <= res["norm_bound"] * 1.001
    res = long_episode(steps=48, repeats=2, overrides=("context.write=norm",))
    assert res["norm_bound"] == pytest.approx(8.0)  # final-norm weight 1 at init: RMS 1
    assert res["max_norm"] <= 8.0 * 1.001
    assert abs(res["norm_ratio"] - 1.0) < 1e-3


CUE_COLOURS = torch.eye(3)  # red, green, blue cue squares
CUE_TARGETS = torch.tensor([[1.0, 0.0, 0.0], [-0.5, 0.8, 0.0], [-0.5, -0.8, 0.0]])


def cue_episodes(cue: torch.Tensor, a: int = 8) -> SegmentBatch:
    """Two segments: the first shows a coloured square and asks for no motion, the second a
    grey frame and asks for the cue's target, which only the memory can know."""
    b = cue.shape[0]
    img = torch.full((b, 2, 3, 32, 32), 0.5)
    img[:, 0, :, 8:24, 8:24] = CUE_COLOURS[cue][:, :, None, None]
    act = torch.zeros(b, 2, a, 3)
    act[:, 1] = CUE_TARGETS[cue][:, None]
    return SegmentBatch(observation={"observation.images.top": img,
                                     "observation.state": torch.zeros(b, 2, 3)},
                        action=act, action_is_pad=torch.zeros(b, 2, a, dtype=torch.bool),
                        segment_is_pad=torch.zeros(b, 2, dtype=torch.bool),
                        frame_index=torch.tensor([[0, a]]).repeat(b, 1),
                        episode_index=torch.arange(b), length=torch.full((b,), 2 * a),
                        task=["remember the color"] * b)


def test_memory_learns_a_cue_it_must_carry_to_the_next_chunk():
    torch.manual_seed(0)
    cfg = apply_overrides(memory_config(), [
        "model.text.depth=2", "model.expert.depth=2", "model.vision.image_size=32",
        "image_shape=[3,32,32]", "model.num_steps=4"])
    policy = make_policy(cfg)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    for _ in range(100):
        loss, _ = policy(cue_episodes(torch.randint(0, 3, (16,))), bptt_depth=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    cue = torch.arange(3).repeat(8)
    episodes = cue_episodes(cue)
    for s in range(2):  # streaming inference: the memory carries the cue to chunk 2
        obs = {k: v[:, s] for k, v in episodes.observation.items()} | {"task": episodes.task}
        chunk = policy.predict_action_chunk(obs)  # (B, A, 3)
    choice = (chunk.mean(1)[:, None] - CUE_TARGETS[None]).norm(dim=-1).argmin(-1)  # (B,)
    assert (choice == cue).float().mean() >= 0.9  # chance: 1/3


@pytest.mark.parametrize(("flags", "message"), [
    (["--min-swaps", "4"], r"--min-swaps must be in \[0, --swaps=3\], got 4"),
    (["--delay", "10", "--min-delay", "12"], r"--min-delay must be in \[0, --delay=10\], got 12"),
])
def test_bench_memory_rejects_bad_training_ranges_before_timing(flags, message, capsys):
    from memvla.cli import main

    assert main(["bench", "memory", "--success", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_bench_memory_sweep_settings_from_the_command_line():
    import argparse

    from memvla.bench.memory import add_arguments, sweep_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--min-delay", "10", "--opt", "cue_steps=2",
                              "--set", "policy.context.write=norm"])
    rc = sweep_settings(args, "remember-color")
    assert rc.task_options(False)["delay"] == 30 and rc.task_options(False)["cue_steps"] == 2
    assert rc.task_options(False, data=True)["delay"] == 10
    assert rc.task_options(False, data=True)["max_delay"] == 30
    assert rc.task_options(False, longer=True)["delay"] == 90
    assert rc.overrides == ["policy.context.write=norm"]
    sg = sweep_settings(args, "shell-game")
    assert sg.task_options(True)["n_swaps"] == 3 and sg.task_options(True)["memoryless"]
    assert (sg.task_options(False, data=True)["n_swaps"],
            sg.task_options(False, data=True)["max_swaps"]) == (0, 3)
    assert sg.task_options(False, longer=True)["n_swaps"] == 9
    assert "max_swaps" not in sg.task_options(False, longer=True)
    default = sweep_settings(parser.parse_args([]), "remember-color")  # delays 0..30
    assert default.data_options == {"delay": 0, "max_delay": 30}
