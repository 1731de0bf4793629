"""Recurrent memory tokens on the flow VLA: masks of both layouts, streaming inference ==
episode training forward, reset, truncated BPTT, bounded memory, bad configs."""


import pytest
import torch
from helpers import episode_batch, narrow_config, write_episode

from memvla.config_utils import apply_overrides
from memvla.data.segments import SegmentBatch
from memvla.layers.kv_cache import KVCache
from memvla.layers.memory_tokens import (
    MemoryGate,
    clip_rms,
    clip_rms_reference,
    gated_write,
    memory_noise,
)
from memvla.layers.tokens import TokenSegment
from memvla.models.flow_vla import VLMWithExpert
from memvla.policies import make_policy

M = 3


def memory_config(layout="smolvla", extra=()):
    return narrow_config("tiny", extra=["context.kind=memory_tokens",
                                        f"context.num_tokens={M}", f"context.layout={layout}",
                                        *extra])


def prefix_of(policy, batch, memory):
    images, ids, pad, state = policy.encode_observation(batch)
    return TokenSegment.cat(policy.model.embed_prefix(images, ids, pad, state, memory))


@pytest.mark.parametrize("layout", ["smolvla", "rmt"])
def test_memory_attention_masks(layout):
    policy = make_policy(memory_config(layout))
    batch = episode_batch(policy.config).segment(0)
    memory = policy.model.initial_state(2)
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
        read = model.initial_state(2) if s == 0 else memories[s - 1]
        chunk = policy.predict_action_chunk(obs, noise=noise)
        assert (policy.memory - memories[s]).abs().max().item() <= 1e-5
        ref, _ = model.sample_actions(*policy.encode_observation(obs), noise=noise,
                                      context_state=read)
        want = policy.normalizer.unnormalize("action", ref[..., : policy.config.action_dim])
        assert (chunk - want).abs().max().item() <= 1e-5
    policy.reset()
    assert policy.memory is None


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
        norms.append(policy.memory.norm(dim=-1).max().item())
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
        norms.append(policy.memory.norm(dim=-1).max().item())
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


def test_a_closed_gate_carries_the_memory_and_an_open_one_replaces_it():
    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    assert torch.equal(gated_write(old, new, torch.full_like(old, 1e4)), old)
    assert torch.equal(gated_write(old, new, torch.full_like(old, -1e4)), new)
    half = gated_write(old, new, torch.zeros_like(old))
    torch.testing.assert_close(half, (old + new) / 2)
    gate = MemoryGate(8)
    torch.nn.init.constant_(gate.proj.bias, 1e4)  # closed
    torch.testing.assert_close(gate(old, new), old)
    # in a policy: a closed gate keeps the initial memory through a chunk
    policy = make_policy(memory_config(extra=["context.memory_update=gated"])).eval()
    torch.nn.init.constant_(policy.model.context.gate.proj.bias, 1e4)
    batch = episode_batch(policy.config, b=1).segment(0)
    first = policy.model.initial_state(1)
    obs = {k: batch[k] for k in ("observation.images.top", "observation.state", "task")}
    policy.predict_action_chunk(obs)
    torch.testing.assert_close(policy.context_state, first)
    noisy = memory_noise(old, 0.1, torch.Generator().manual_seed(1))
    ratio = (noisy - old).pow(2).mean(-1).sqrt() / old.pow(2).mean(-1).sqrt()
    assert 0.03 < float(ratio.mean()) < 0.3 and torch.equal(memory_noise(old, 0.0), old)


def test_scale_matching_matches_its_reference_and_the_prefix_rms():
    from memvla.layers.memory_tokens import match_scale, match_scale_reference

    g = torch.Generator().manual_seed(0)
    memory = torch.randn(2, 3, 16, generator=g) * torch.tensor([0.01, 1.0, 50.0])[None, :, None]
    prefix = 3 * torch.randn(2, 5, 16, generator=g)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[0, 4] = False
    prefix[0, 4] = 1000.0  # padding: not part of the reference scale
    out = match_scale(memory, prefix, valid)
    torch.testing.assert_close(out, match_scale_reference(memory, prefix, valid))
    target = torch.stack([prefix[0, :4].pow(2).mean().sqrt(), prefix[1].pow(2).mean().sqrt()])
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), target[:, None].expand(2, 3))
    assert torch.allclose(torch.cosine_similarity(out, memory, -1), torch.ones(2, 3))


def test_the_delta_rule_matches_its_reference_and_overwrites_a_key():
    from memvla.layers.associative_memory import (
        AssociativeMemory,
        associative_read,
        delta_write,
        delta_write_reference,
    )

    g = torch.Generator().manual_seed(0)
    b, m, d, k = 2, 3, 6, 4
    assoc = torch.randn(b, d, k, generator=g)
    keys = torch.nn.functional.normalize(torch.randn(b, m, k, generator=g), dim=-1)
    values, beta = torch.randn(b, m, d, generator=g), torch.rand(b, m, generator=g)
    torch.testing.assert_close(delta_write(assoc, keys, values, beta),
                               delta_write_reference(assoc, keys, values, beta))
    # with strength 1 a key reads back the value last stored under it, whatever was there
    key = keys[:, :1].expand(b, 2, k)  # the same key twice
    stored = delta_write(assoc, key, values[:, :2], torch.ones(b, 2))
    torch.testing.assert_close(torch.einsum("bdk,bk->bd", stored, key[:, 0]), values[:, 1])
    torch.testing.assert_close(associative_read(stored, key[0, :1])[0], values[:1, 1])
    mem = AssociativeMemory(m, d, k)
    empty = mem.initial(b, values)
    assert empty.shape == (b, d, k) and not empty.any()
    assert not mem.read(empty).any() and mem.write(empty, values).shape == (b, d, k)


def test_bad_memory_configs_and_batches():
    with pytest.raises(ValueError, match="context.num_tokens must be > 0"):
        memory_config(extra=["context.num_tokens=0"])
    with pytest.raises(ValueError, match=r"context.layout must be one of \('smolvla', 'rmt'\)"):
        memory_config(layout="middle")
    with pytest.raises(ValueError, match=r"context.memory_update must be one of \('replace', "
                       r"'gated', 'associative'\), got 'add'"):
        memory_config(extra=["context.memory_update=add"])
    with pytest.raises(ValueError, match=r"context.memory_noise is a share of the memory's RMS, "
                       r">= 0; got -0.1"):
        memory_config(extra=["context.memory_noise=-0.1"])
    with pytest.raises(ValueError, match=r"context.memory_scale must be one of \('raw', "
                       r"'match'\), got 'rms'"):
        memory_config(extra=["context.memory_scale=rms"])
    with pytest.raises(ValueError, match=r"context.memory_key_dim must be > 0, got 0"):
        memory_config(extra=["context.memory_update=associative", "context.memory_key_dim=0"])
    with pytest.raises(ValueError, match=r"context.write must be one of \('norm', 'clip'\), "
                       r"got 'layernorm'"):
        memory_config(extra=["context.write=layernorm"])
    with pytest.raises(ValueError, match=r"context.max_rms must be > 0, got 0.0"):
        memory_config(extra=["context.max_rms=0"])
    policy = make_policy(memory_config())
    ep = episode_batch(policy.config, s=2)
    ep.frame_index[0, 1] = 3
    with pytest.raises(ValueError, match=r"starts at frame 3, not at 8: the policy predicts a "
                       r"chunk every n_action_steps=8 frames"):
        policy(ep)
    assert not make_policy(narrow_config("tiny")).is_recurrent
    with pytest.raises(ValueError, match=r"context.num_tokens is an option of "
                       r"context.kind='memory_tokens', not of 'none'"):
        apply_overrides(memory_config(), ["context.kind=none"])  # its options stay set


def test_segment_curriculum():
    from memvla.training.config import TrainConfig

    tc = TrainConfig(curriculum_segments=2, curriculum_every=10)
    assert [tc.max_segments(s) for s in (0, 9, 10, 25)] == [2, 2, 3, 4]
    assert TrainConfig().max_segments(100) is None
    policy = make_policy(memory_config())
    _, info = policy(episode_batch(policy.config, s=3), max_segments=2)
    assert info["segments"] == 2 and info["valid_steps"] == 2 * 2 * 8


def _episode_grads(policy, ep, **kw):
    policy.zero_grad(set_to_none=True)
    images = ep.observation["observation.images.top"].clone().requires_grad_(True)
    ep = SegmentBatch({**ep.observation, "observation.images.top": images}, ep.action,
                      ep.action_is_pad, ep.segment_is_pad, ep.frame_index, ep.episode_index,
                      ep.length, ep.task)
    torch.manual_seed(1)
    loss, info = policy(ep, **kw)
    loss.backward()
    return loss.item(), images.grad.clone(), info


def test_bptt_depth_beyond_the_segments_of_a_batch_is_the_whole_episode():
    # episodes of 3 and 1 segments: a depth past the batch's segments (varied episode
    # lengths, or a curriculum that cuts them) trains on the whole episode, not an error
    policy = make_policy(memory_config())
    ep = episode_batch(policy.config, s=3, lengths=[24, 5])
    whole = _episode_grads(policy, ep, bptt_depth=-1)
    for k in (2, 3, 5):
        loss, grad, info = _episode_grads(policy, ep, bptt_depth=k)
        assert loss == whole[0] and torch.equal(grad, whole[1]) and info["segments"] == 3
    # with the curriculum (2 segments) and k > 0
    short = _episode_grads(policy, ep, bptt_depth=-1, max_segments=2)
    loss, grad, info = _episode_grads(policy, ep, bptt_depth=4, max_segments=2)
    assert loss == short[0] and torch.equal(grad, short[1]) and info["segments"] == 2
    assert grad[:, 2].abs().sum() == 0 and grad[0, 0].abs().sum() > 0
    # k = 1 detaches before segment 2 (2 % 2 == 0): its loss no longer reaches 0 and 1
    only_last = episode_batch(policy.config, s=3, lengths=[24, 5])
    only_last.action_is_pad[:, :2] = True
    _, grad, _ = _episode_grads(policy, only_last, bptt_depth=1)
    assert grad[0, :2].abs().sum() == 0 and grad[0, 2].abs().sum() > 0
    _, grad, _ = _episode_grads(policy, only_last, bptt_depth=2)
    assert grad[0, 0].abs().sum() > 0


def test_a_memory_policy_replanning_every_n_steps_trains_as_it_runs(tmp_path):
    # n_action_steps = 3 < chunk_size = 8: at inference the policy predicts (and writes its
    # memory) every 3 frames; training must cut the episode the same way
    from memvla.data.segments import EpisodeSegmentLoader

    torch.manual_seed(0)
    policy = make_policy(memory_config(extra=["n_action_steps=3"])).eval()
    a, n, length = 8, 3, 13
    ds = write_episode(tmp_path / "ds", policy.config, length)
    ep = EpisodeSegmentLoader(ds, a, 1, shuffle=False, stride=n).collate([0])
    assert ep.frame_index.tolist() == [[0, 3, 6, 9, 12]]
    assert ep.action_is_pad[0].sum(1).tolist() == [0, 0, 1, 4, 7]  # chunks overlap
    assert torch.equal(ep.action[0, 1, :5], ep.action[0, 0, 3:])
    memories, memory = [], None
    for s in range(ep.num_segments):
        _, _, memory = policy._segment_losses(ep.segment(s), memory)
        memories.append(memory)
    policy.reset()
    writes = 0
    for t in range(length):
        item = ds[t]
        obs = {"observation.images.top": item["observation.images.top"][None],
               "observation.state": item["observation.state"][None], "task": [item["task"]]}
        predicts = policy.queued_actions == 0
        policy.select_action(obs)
        if predicts:
            assert (policy.memory - memories[writes]).abs().max().item() <= 1e-5, t
            writes += 1
    assert writes == ep.num_segments == 5
    with pytest.raises(ValueError, match=r"starts at frame 8, not at 3: the policy predicts a "
                       r"chunk every n_action_steps=3 frames.*stride=3"):
        policy(EpisodeSegmentLoader(ds, a, 1, shuffle=False).collate([0]))


def test_the_rmt_action_expert_reads_the_write_tokens(monkeypatch):
    # rmt layout: no prefix token sees the write tokens, the action expert does
    from memvla.layers import memory_tokens

    torch.manual_seed(0)
    policy = make_policy(memory_config("rmt")).eval()
    seg = episode_batch(policy.config).segment(0)
    inputs = policy.encode_observation(seg)
    noise = torch.randn(2, policy.config.model.chunk_size, policy.config.model.max_action_dim)
    memory = policy.model.initial_state(2)
    base, _ = policy.model.sample_actions(*inputs, noise=noise, context_state=memory)
    real = memory_tokens.insert_memory

    def other_write(parts, mem, layout):
        out = real(parts, mem, layout)
        last = out[-1]
        return [*out[:-1], TokenSegment(last.embs + 1.0, last.pad, last.flags)]

    monkeypatch.setattr(memory_tokens, "insert_memory", other_write)
    changed, _ = policy.model.sample_actions(*inputs, noise=noise, context_state=memory)
    assert (changed - base).abs().max().item() > 1e-4  # the suffix attends the write tokens
    # ... while the prefix does not: its read-token and image hidden states are unchanged
    prefix = prefix_of(policy, seg, memory)
    cache = KVCache(policy.config.model.text.depth)
    h_changed = policy.model.vlm_with_expert.prefill(prefix, cache)
    monkeypatch.setattr(memory_tokens, "insert_memory", real)
    prefix = prefix_of(policy, seg, memory)
    h_base = policy.model.vlm_with_expert.prefill(prefix, KVCache(cache.num_layers))
    real_tokens = prefix.pad[:, :-M]  # padding queries see every key; never read
    torch.testing.assert_close(h_changed[:, :-M][real_tokens], h_base[:, :-M][real_tokens])


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


def test_uint8_segments_train_as_float_ones(tmp_path):
    from memvla.data.lerobot_v3 import LeRobotV3Dataset
    from memvla.data.segments import EpisodeSegmentLoader

    policy = make_policy(memory_config())
    root = tmp_path / "ds"
    floats = write_episode(root, policy.config, 13)
    raw = LeRobotV3Dataset(root, images_as="uint8")
    f = EpisodeSegmentLoader(floats, 8, 1, shuffle=False).collate([0])
    u = EpisodeSegmentLoader(raw, 8, 1, shuffle=False).collate([0])
    assert u.observation["observation.images.top"].dtype == torch.uint8
    assert u.observation["observation.images.top"].shape[-1] == 3  # (B, S, H, W, C)
    torch.manual_seed(0)
    loss_f, _ = policy(f)
    torch.manual_seed(0)
    loss_u, _ = policy(u)
    torch.testing.assert_close(loss_u, loss_f)
    with pytest.raises(ValueError, match=r"images_as must be one of \('float', 'uint8'\)"):
        LeRobotV3Dataset(root, images_as="half")


@pytest.mark.parametrize("preset", ["tiny", "tiny-oft"])
def test_memory_written_while_a_chunk_executes_trains_as_it_runs(tmp_path, preset):
    # context.observe_every = 4 with chunks every 8 steps: the memory is also written from
    # the frame 4 steps into each chunk (a write pass), in training as at inference
    from memvla.data.segments import EpisodeSegmentLoader

    torch.manual_seed(0)
    policy = make_policy(narrow_config(preset, extra=[
        "context.kind=memory_tokens", f"context.num_tokens={M}", "context.observe_every=4",
        "n_action_steps=8"])).eval()
    every, length = 4, 20
    ds = write_episode(tmp_path / "ds", policy.config, length)
    ep = EpisodeSegmentLoader(ds, 8, 1, shuffle=False,
                              stride=policy.config.segment_stride).collate([0])
    assert ep.frame_index.tolist() == [[0, 4, 8, 12, 16]]
    memories, memory, losses = [], None, []
    for s in range(ep.num_segments):
        if s % 2:  # frames 4 and 12: a write pass, no chunk
            memory = policy._segment_write(ep.segment(s), memory)
        else:
            loss, valid, memory = policy._segment_losses(ep.segment(s), memory)
            losses.append((loss * valid[..., None]).sum() / (valid.sum() * 3))
        memories.append(memory)
    assert not torch.allclose(memories[1], memories[0]), "the write pass changed the memory"
    policy.reset()
    for t in range(length):
        item = ds[t]
        policy.select_action({"observation.images.top": item["observation.images.top"][None],
                              "observation.state": item["observation.state"][None],
                              "task": [item["task"]]})
        if t % every == 0:
            assert (policy.memory - memories[t // every]).abs().max().item() <= 1e-5, t
    loss, info = policy(ep)
    assert info["valid_steps"] == 8 + 8 + 4  # the chunks at frames 0, 8, 16 only
    if preset == "tiny-oft":  # deterministic: the loss is that of the three chunks
        want = (losses[0] * 8 + losses[1] * 8 + losses[2] * 4) / 20
        assert abs(loss.item() - want.item()) <= 1e-5
        ep.observation["observation.images.top"][:, 1] = 0  # the written frame matters
        assert abs(policy(ep)[0].item() - loss.item()) > 1e-6
    with pytest.raises(ValueError, match=r"starts at frame 8, not at 4: the policy predicts a "
                       r"chunk every n_action_steps=8 frames and writes its state every "
                       r"context.observe_every=4"):
        policy(EpisodeSegmentLoader(ds, 8, 1, shuffle=False).collate([0]))


def test_observe_every_gets_actionable_errors():
    with pytest.raises(ValueError, match=r"context.observe_every \(3\) must divide "
                       r"policy.n_action_steps \(8\)"):
        memory_config(extra=["context.observe_every=3"])
    with pytest.raises(ValueError, match=r"context.observe_every is a number of environment "
                       r"steps >= 1 .* got 0"):
        memory_config(extra=["context.observe_every=0"])
    with pytest.raises(ValueError, match=r"context.observe_every is an option of "
                       r"context.kind=.*not of 'frames'"):
        narrow_config("tiny", extra=["context.kind=frames", "context.observe_every=4"])
