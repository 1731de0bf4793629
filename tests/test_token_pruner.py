"""LightVLA's token pruner: the worked example of the source notes, straight-through
training, noise schedule, batched inference against the per-sample twin, masked task keys,
the collapse with a short prompt and its fix, and the pruner inside the flow-matching VLA
(explicit positions, KV cache, action contexts, policy API, actionable errors)."""

import pytest
import torch
from helpers import episode_batch, fake_batch, params_without_gradient
from helpers import model_inputs as shared_inputs

from memvla.configs import PrunerConfig
from memvla.layers.kv_cache import KVCache
from memvla.layers.token_pruner import (
    PruneOutput,
    TokenPruner,
    gather_kept,
    keep_mask,
    plain_rms_norm,
    prune_reference,
    straight_through_weights,
    task_queries,
    task_queries_ref,
)
from memvla.layers.tokens import TokenSegment
from memvla.models.flow_vla import FlowMatchingVLA
from memvla.policies import load_policy, make_policy
from memvla.presets import get_preset


def random_inputs(b=3, p=48, t=6, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(b, p, d, generator=g)
    task = torch.randn(b, t, d, generator=g)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, t // 2:] = False  # a padded prompt
    positions = torch.arange(p).expand(b, p) + torch.arange(b)[:, None] * 3
    return patches, positions, task, valid


def pruner(num_patches=0, **kw) -> TokenPruner:
    return TokenPruner(PrunerConfig(enabled=True, **kw), num_patches)


# -- the mechanism ------------------------------------------------------------------------------
def test_worked_example_keeps_patches_0_2_3():
    # section 7 of the LightVLA notes: sky P0 ≈ P1 vote for P0; robot and cup vote for themselves
    score = torch.tensor([[[0.40, 0.35, 0.20, 0.15],
                           [0.40, 0.35, 0.20, 0.15],
                           [0.15, 0.20, 0.50, 0.15],
                           [0.15, 0.20, 0.15, 0.50]]])
    mask = keep_mask(score)
    assert mask.tolist() == [[True, False, True, True]]
    patches = torch.arange(4.0)[None, :, None].expand(1, 4, 4)  # P_i = i
    tokens, valid, pos, kept = gather_kept(patches, torch.tensor([[1, 2, 3, 4]]), mask)
    assert tokens[0, :, 0].tolist() == [0.0, 2.0, 3.0] and valid.all()
    assert pos.tolist() == [[1, 3, 4]] and kept.tolist() == [3]  # original positions
    # training keeps the length: P1 becomes a copy of P0
    w = straight_through_weights(score)
    assert (w @ patches)[0, :, 0].tolist() == [0.0, 0.0, 2.0, 3.0]


def test_straight_through_forward_is_hard_gradient_is_softmax():
    g = torch.Generator().manual_seed(1)
    score = torch.randn(2, 5, 5, generator=g, requires_grad=True)
    up = torch.randn(2, 5, 5, generator=g)
    w = straight_through_weights(score)
    assert torch.equal(w, torch.nn.functional.one_hot(score.argmax(-1), 5).float())
    (w * up).sum().backward()
    ref = score.detach().clone().requires_grad_(True)
    (ref.softmax(-1) * up).sum().backward()
    assert torch.allclose(score.grad, ref.grad, atol=1e-7)


@pytest.mark.parametrize("noise", ["uniform", "gumbel"])
def test_noise_scale_zero_is_deterministic(noise):
    patches, positions, task, valid = random_inputs()
    m = pruner(noise=noise, noise_scale=0.0).train()
    a, b = m(patches, positions, task, valid), m(patches, positions, task, valid)
    assert torch.equal(a.tokens, b.tokens)
    m = pruner(noise=noise, noise_scale=5.0).train()
    a, b = m(patches, positions, task, valid), m(patches, positions, task, valid)
    assert not torch.equal(a.tokens, b.tokens)  # the noise changes the votes


def test_set_progress_decays_linearly():
    m = pruner(noise_scale=2.0)
    assert m.noise_scale == 2.0
    for frac, want in [(0.0, 2.0), (0.25, 1.5), (0.5, 1.0), (1.0, 0.0)]:
        m.set_progress(frac)
        assert m.noise_scale == pytest.approx(want)
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\]"):
        m.set_progress(1.5)


def test_task_queries_equal_their_reference():
    patches, _, task, valid = random_inputs()
    valid[2] = False  # no valid task key at all
    p, t = plain_rms_norm(patches), plain_rms_norm(task)
    for query in ("lightvla", "residual"):
        got, ref = task_queries(p, t, valid, query), task_queries_ref(p, t, valid, query)
        assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("kw", [{}, {"center": True}, {"query": "residual", "temperature": 0.5},
                                {"query": "residual", "residual_scale": 3.0, "center": True},
                                {"min_keep": 12}, {"max_keep": 4}, {"min_keep": 6, "max_keep": 6}])
def test_batched_inference_equals_per_sample_and_reference(kw):
    patches, positions, task, valid = random_inputs()
    kw = {"center": False, **kw}
    m = pruner(**kw).eval()
    out = m(patches, positions, task, valid)
    assert isinstance(out, PruneOutput)
    ref = prune_reference(patches, positions, task, valid, **kw)
    for got, want in zip((out.tokens, out.valid, out.positions, out.kept), ref, strict=True):
        assert torch.equal(got, want)
    if len(kw) == 1:
        assert len(set(out.kept.tolist())) > 1  # different counts: the batch is padded
    for i in range(patches.shape[0]):
        one = m(patches[i:i + 1], positions[i:i + 1], task[i:i + 1], valid[i:i + 1])
        k = int(out.kept[i])
        assert int(one.kept) == k and one.tokens.shape[1] == k
        assert torch.equal(one.tokens[0], out.tokens[i, :k])
        assert torch.equal(one.positions[0], out.positions[i, :k])
        assert not out.valid[i, k:].any() and (out.tokens[i, k:] == 0).all()
        kept_pos = out.positions[i, :k]
        assert (kept_pos[1:] > kept_pos[:-1]).all()  # original order
    if "max_keep" in kw:
        assert (out.kept <= kw["max_keep"]).all()
    if "min_keep" in kw:
        assert (out.kept >= kw["min_keep"]).all()


def test_training_keeps_the_sequence_length():
    patches, positions, task, valid = random_inputs()
    for duplicates in ("keep", "drop"):
        out = pruner(duplicates=duplicates).train()(patches, positions, task, valid)
        assert out.tokens.shape == patches.shape and torch.equal(out.positions, positions)
        assert set(out.stats) == {"kept", "keep_ratio", "query_std", "top_vote_share"}
        assert out.valid.all() if duplicates == "keep" else not out.valid.all()


@pytest.mark.parametrize("center,max_keep", [(False, 0), (True, 0), (True, 5)])
def test_training_without_duplicates_attends_what_inference_keeps(center, max_keep):
    patches, positions, task, valid = random_inputs()
    patches.requires_grad_(True)
    task.requires_grad_(True)
    m = pruner(noise_scale=0.0, center=center, query="residual", max_keep=max_keep)
    train = m.train()(patches, positions, task, valid)
    infer = m.eval()(patches, positions, task, valid)
    assert torch.equal(train.valid.sum(1), infer.kept) and torch.equal(train.kept, infer.kept)
    uncapped = pruner(noise_scale=0.0, center=center, query="residual").eval()(
        patches, positions, task, valid).kept
    if max_keep:  # the cap binds here, in training as at inference
        assert (uncapped > max_keep).all() and (train.kept == max_keep).all()
    tokens, ok, pos, _ = gather_kept(train.tokens, train.positions, train.valid)
    assert torch.equal(tokens, infer.tokens) and torch.equal(pos, infer.positions)
    assert (train.tokens[~train.valid] == 0).all()
    # the straight-through gradient reaches the scores (here: the task tokens) and patches
    (train.tokens * torch.randn_like(train.tokens)).sum().backward()
    assert task.grad.abs().sum() > 0 and patches.grad.abs().sum() > 0
    # pruner.gradient=none: the hard selection alone, the scores get no gradient
    task.grad = patches.grad = None
    m = pruner(noise_scale=0.0, center=center, query="residual", gradient="none").train()
    (m(patches, positions, task, valid).tokens * torch.randn_like(train.tokens)).sum().backward()
    assert task.grad is None and patches.grad.abs().sum() > 0  # only through the copies
    # as released, every slot is a copy of its vote: a twice-voted patch is there twice
    kept = pruner(noise_scale=0.0, center=center, query="residual", duplicates="keep").train()(
        patches, positions, task, valid)
    assert kept.valid.all() and kept.tokens.shape == train.tokens.shape


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_padding_in_the_task_keys_changes_nothing(mode):
    patches, positions, task, valid = random_inputs()
    junk = torch.randn(3, 5, task.shape[2]) * 100  # padding / placeholder embeddings
    task2 = torch.cat([task, junk], 1)
    valid2 = torch.cat([valid, torch.zeros(3, 5, dtype=torch.bool)], 1)
    m = pruner(noise_scale=0.0).train(mode == "train")
    a, b = m(patches, positions, task, valid), m(patches, positions, task2, valid2)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-6) and torch.equal(a.kept, b.kept)
    c = m(patches, positions, task2, torch.ones_like(valid2))  # unmasked: it does matter
    assert not torch.equal(a.kept, c.kept) or not torch.allclose(a.tokens, c.tokens)


def test_short_prompt_collapses_and_residual_query_fixes_it():
    patches, positions, task, valid = random_inputs(b=4, p=256, t=3, d=64, seed=3)
    valid[:] = True
    collapsed = pruner(query="lightvla").eval()(patches, positions, task, valid)
    fixed = pruner(query="residual").eval()(patches, positions, task, valid)
    assert collapsed.kept.max() <= 8  # every patch votes for the same few winners
    assert fixed.kept.min() >= 4 * collapsed.kept.max()  # far more than the 3 task tokens
    assert fixed.kept.max() < 256  # ... and it still prunes
    assert collapsed.stats["top_vote_share"] > fixed.stats["top_vote_share"]
    assert collapsed.stats["query_std"] < fixed.stats["query_std"]
    # the scale is the knob: more of the patch itself keeps more patches
    kept = [pruner(query="residual", residual_scale=r).eval()(
        patches, positions, task, valid).stats["kept"] for r in (0.5, 1.0, 2.0, 8.0)]
    assert kept == sorted(kept) and kept[-1] > 2 * kept[0]


@pytest.mark.parametrize("query", ["lightvla", "residual"])
def test_centring_holds_the_count_when_training_aligns_the_patches(query):
    # trained visual tokens share a large component (mean cosine 0.8-0.9 between patches)
    patches, positions, task, valid = random_inputs(b=4, p=64, t=6, d=64, seed=4)
    shared = 6.0 * torch.randn(4, 1, 64, generator=torch.Generator().manual_seed(5))
    aligned = patches + shared  # (B, P, D)
    n = plain_rms_norm(aligned)
    assert (n @ n.transpose(1, 2) / 64).mean() > 0.8
    kept = {c: pruner(query=query, center=c).eval()(aligned, positions, task, valid).kept
            for c in (False, True)}
    assert kept[False].float().mean() < 0.5 * kept[True].float().mean()  # collapsed
    # centred, a shared component changes nothing at all
    plain = pruner(query=query, center=True).eval()(patches, positions, task, valid)
    assert torch.equal(kept[True], plain.kept)


def test_errors_are_actionable():
    patches, positions, task, valid = random_inputs(p=128)
    with pytest.raises(ValueError, match=r"pruner.num_patches is 64 .* give 128; set "
                       r"model.pruner.num_patches=128"):
        pruner(64)(patches, positions, task, valid)
    with pytest.raises(ValueError, match="task_valid must be a bool"):
        pruner()(patches, positions, task, valid.long())
    with pytest.raises(ValueError, match="max_keep"):
        PrunerConfig(min_keep=8, max_keep=4)
    with pytest.raises(ValueError, match=r"pruner.duplicates must be one of \('drop', 'keep'\), "
                       r"got 'merge'"):
        PrunerConfig(duplicates="merge")
    with pytest.raises(ValueError, match=r"pruner.gradient must be one of \('straight_through', "
                       r"'none'\), got 'soft'"):
        PrunerConfig(gradient="soft")
    with pytest.raises(ValueError, match="model.pruner.center: expected bool, got 'yes please'"):
        get_preset("tiny", ["model.pruner.center=yes please"])
    with pytest.raises(ValueError, match=r"num_patches=16 \(or 0"):
        get_preset("tiny", ["model.pruner.enabled=true", "model.pruner.num_patches=32"])
    with pytest.raises(ValueError, match=r"num_patches is 20 .* 1 camera\(s\) × 16 tokens = "
                       r"16 visual tokens; set model.pruner.num_patches=16"):
        get_preset("tiny", ["model.pruner.enabled=true", "model.pruner.num_patches=20"])


def test_segment_positions_and_cache_next_position():
    x = torch.zeros(1, 2, 4)
    a = TokenSegment.full(x, 0, 0)
    b = TokenSegment(x, torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.long),
                     positions=torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="explicit positions on 1 of 2 parts"):
        TokenSegment.cat([a, b])
    cache = KVCache(1)
    pad = torch.tensor([[True, True, False, True, False]])
    cache.append_tokens(pad, torch.zeros(1, 5, dtype=torch.long), torch.cumsum(pad, 1) - 1)
    assert torch.equal(cache.next_position(), pad.sum(1, keepdim=True))  # no gaps: same
    cache.reset()
    cache.append_tokens(pad, torch.zeros(1, 5, dtype=torch.long), torch.tensor([[0, 5, 9, 7, 8]]))
    assert cache.next_position().tolist() == [[8]]  # largest real position + 1


# -- inside the flow-matching VLA ----------------------------------------------------------------
CONTEXTS = ["none", "placeholders", "keys", "prev_chunk", "state"]


def pruned_config(*extra):
    return get_preset("tiny", ["model.pruner.enabled=true", "model.num_steps=2", *extra])


def model_inputs(cfg, b=2, seed=0):
    return shared_inputs(cfg, b, seed, pad_from=3)  # a 3-token task beside a long one


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_flow_vla_with_pruner_trains_and_samples(ctx):
    cfg = pruned_config(f"model.pruner.action_context={ctx}", "model.pruner.noise_scale=0.5")
    torch.manual_seed(0)
    model = FlowMatchingVLA(cfg.model)
    images, ids, pad, state, prev = model_inputs(cfg)
    actions = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    losses, _ = model(images, ids, pad, state, actions, prev_actions=prev)
    losses.mean().backward()
    assert model.last_prune_stats["keep_ratio"] <= 1.0
    missing = params_without_gradient(model)
    assert not missing
    model.eval()
    noise = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    both, _ = model.sample_actions(images, ids, pad, state, noise=noise, prev_actions=prev)
    kept = model.last_prune_stats["kept"]
    assert kept < model.cfg.tokens_per_image
    slow, _ = model.sample_actions_uncached(images, ids, pad, state, noise=noise,
                                            prev_actions=prev)
    assert (both - slow).abs().max().item() < 1e-5
    for i in range(2):
        one, _ = model.sample_actions([im[i:i + 1] for im in images], ids[i:i + 1],
                                      pad[i:i + 1], state[i:i + 1], noise=noise[i:i + 1],
                                      prev_actions=prev[i:i + 1])
        assert (one - both[i:i + 1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("memory", [None, "smolvla", "rmt"])
def test_keeping_every_patch_equals_the_unpruned_model(memory):
    """Explicit positions, the pruned image part and the cache's next position give the
    unpruned numerics when nothing is dropped (and the suffix positions do not move when
    something is)."""
    ctx = [] if memory is None else ["context.kind=memory_tokens", f"context.layout={memory}"]
    plain_cfg = get_preset("tiny", ["model.num_steps=2", *ctx])
    cfg = pruned_config("model.pruner.min_keep=16", *ctx)
    torch.manual_seed(0)
    plain = FlowMatchingVLA(plain_cfg.model, plain_cfg.context).eval()
    pruned = FlowMatchingVLA(cfg.model, cfg.context).eval()
    pruned.load_state_dict(plain.state_dict())
    images, ids, pad, state, _ = model_inputs(cfg)
    mem = plain.initial_state(2)
    noise = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    want, want_mem = plain.sample_actions(images, ids, pad, state, noise=noise, context_state=mem)
    got, got_mem = pruned.sample_actions(images, ids, pad, state, noise=noise, context_state=mem)
    assert pruned.last_prune_stats["keep_ratio"] == 1.0
    assert (got - want).abs().max().item() < 1e-5
    if memory is not None:
        assert (got_mem - want_mem).abs().max().item() < 1e-5
    full, _ = plain.prefill(images, ids, pad, state, mem)
    pruned.pruner.cfg = PrunerConfig(enabled=True, max_keep=3)
    cut, _ = pruned.prefill(images, ids, pad, state, mem)
    assert len(cut) < len(full)
    assert torch.equal(cut.next_position(), full.next_position())


def test_placeholders_equal_keys():
    """Option A (placeholders in the prefix, masked from the backbone) computes what
    option B (keys for the pruner only) does, with more cached slots."""
    cfg_a = pruned_config("model.pruner.action_context=placeholders")
    cfg_b = pruned_config("model.pruner.action_context=keys")
    torch.manual_seed(0)
    a = FlowMatchingVLA(cfg_a.model).eval()
    b = FlowMatchingVLA(cfg_b.model).eval()
    b.load_state_dict(a.state_dict())
    images, ids, pad, state, _ = model_inputs(cfg_a)
    noise = torch.randn(2, cfg_a.model.chunk_size, cfg_a.model.max_action_dim)
    xa, _ = a.sample_actions(images, ids, pad, state, noise=noise)
    xb, _ = b.sample_actions(images, ids, pad, state, noise=noise)
    assert (xa - xb).abs().max().item() < 1e-5
    assert a.last_prune_stats == b.last_prune_stats


def test_policy_reports_stats_decays_noise_and_keeps_the_previous_chunk(tmp_path):
    policy = make_policy(pruned_config("model.pruner.action_context=prev_chunk"))
    batch = fake_batch(policy.config)
    loss, info = policy(batch)
    loss.backward()
    assert {"pruner_kept", "pruner_keep_ratio", "pruner_query_std",
            "pruner_top_vote_share"} <= set(info)
    policy.set_training_progress(0.75)
    assert policy.model.pruner.noise_scale == pytest.approx(0.25)
    policy.eval()
    obs = fake_batch(policy.config, with_actions=False)
    assert policy._prev_chunk is None
    first = policy.predict_action_chunk(obs, noise=torch.zeros(2, 8, 8))
    prev, valid = policy._prev_chunk
    assert prev.shape == (2, policy.config.n_action_steps, 8) and valid.all()
    second = policy.predict_action_chunk(obs, noise=torch.zeros(2, 8, 8))
    assert first.shape == second.shape
    with pytest.raises(ValueError, match="call reset"):
        policy.predict_action_chunk(fake_batch(policy.config, b=1, with_actions=False))
    policy.reset()
    assert policy._prev_chunk is None
    # load_policy returns a train-mode policy: sampling prunes as at inference anyway
    loaded = load_policy(policy.save_pretrained(tmp_path / "ckpt"), device="cpu")
    assert loaded.config == policy.config
    assert torch.equal(loaded.predict_action_chunk(obs, noise=torch.zeros(2, 8, 8)), first)
    batch["prev_action"] = torch.randn(2, 8, policy.config.action_dim)
    policy.train()
    loss, _ = policy(batch)
    assert torch.isfinite(loss)


def test_flow_vla_patch_count_mismatch_is_actionable():
    cfg = pruned_config()
    cfg.model.pruner.num_patches = 32  # edited after validation, as a stale config would be
    model = FlowMatchingVLA(cfg.model)
    images, ids, pad, state, _ = model_inputs(cfg)
    with pytest.raises(ValueError, match=r"num_patches is 32 .* the images give 16; set "
                                         r"model.pruner.num_patches=16"):
        model.prefill(images, ids, pad, state)


def test_episode_training_reads_the_previous_segment_as_prev_chunk(monkeypatch):
    cfg = pruned_config("model.pruner.action_context=prev_chunk", "context.kind=memory_tokens")
    policy = make_policy(cfg)
    s = 3
    ep = episode_batch(cfg, b=2, s=s, task="go left")
    seen = []
    real = policy.model.forward

    def spy(*args, **kw):
        seen.append(kw.get("prev_actions"))
        return real(*args, **kw)

    monkeypatch.setattr(policy.model, "forward", spy)
    loss, info = policy(ep)
    loss.backward()
    assert seen[0] is None and len(seen) == s  # the first chunk of an episode has none
    for i in (1, 2):
        want = policy.normalizer.normalize("action", ep.action[:, i - 1])
        assert torch.equal(seen[i][..., : cfg.action_dim], want)
    assert policy.model.pruner_key_proj.weight.grad.abs().sum() > 0
    assert "pruner_kept" in info


def test_training_loop_drives_the_noise_decay(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    import numpy as np

    from memvla.cli import main
    from memvla.data.lerobot_v3 import LeRobotV3Writer

    rng = np.random.default_rng(0)
    w = LeRobotV3Writer(tmp_path / "ds", fps=10)
    for _ in range(2):
        w.add_episode({"observation.images.top": rng.integers(0, 255, (12, 64, 64, 3),
                                                               dtype=np.uint8),
                       "observation.state": rng.normal(size=(12, 3)).astype(np.float32),
                       "action": rng.normal(size=(12, 3)).astype(np.float32)}, task="go left")
    w.finalize()
    fracs = []
    real = TokenPruner.set_progress
    monkeypatch.setattr(TokenPruner, "set_progress",
                        lambda self, frac: (fracs.append(frac), real(self, frac))[1])
    assert main(["train", "--preset", "tiny", "--dataset", str(tmp_path / "ds"), "--steps", "4",
                 "--out", str(tmp_path / "run"), "--no-progress", "train.batch_size=4",
                 "train.num_workers=0", "policy.model.pruner.enabled=true"]) == 0
    assert fracs == [0.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("ctx", ["placeholders", "keys"])
def test_training_pruner_keys_see_what_inference_sees_not_the_target(ctx, monkeypatch):
    # at inference the prefix is built before denoising: the action placeholders / keys are
    # the initial noise. Training must feed the same, not x_t (close to the target at small t)
    cfg = pruned_config(f"model.pruner.action_context={ctx}")
    model = FlowMatchingVLA(cfg.model)
    images, ids, pad, state, _ = model_inputs(cfg)
    seen = []
    real = model.prefill

    def spy(*args, **kw):
        seen.append(kw["pruner_actions"])
        return real(*args, **kw)

    monkeypatch.setattr(model, "prefill", spy)
    noise = torch.randn(2, cfg.model.chunk_size, cfg.model.max_action_dim)
    for actions in (torch.randn_like(noise), torch.randn_like(noise)):
        model(images, ids, pad, state, actions, noise, torch.tensor([0.01, 0.2]))
    assert torch.equal(seen[0], noise) and torch.equal(seen[1], noise)
    model.eval()
    model.sample_actions(images, ids, pad, state, noise=noise)
    assert torch.equal(seen[2], noise)


def test_prev_chunk_trains_its_projection_from_frames(tmp_path):
    # frame training reads the actions before each frame from the dataset, so the
    # projection of the previous chunk learns (and DDP sees every parameter used)
    import numpy as np

    from memvla.data.lerobot_v3 import LeRobotV3Dataset, LeRobotV3Writer
    from memvla.policies.frames import FrameCollate, frame_delta_indices

    cfg = pruned_config("model.pruner.action_context=prev_chunk", "n_action_steps=4")
    rng = np.random.default_rng(0)
    with LeRobotV3Writer(tmp_path / "ds", fps=10) as w:
        for length in (6, 11):
            w.add_episode({"observation.images.top":
                           rng.integers(0, 256, (length, 64, 64, 3), np.uint8),
                           "observation.state": rng.normal(size=(length, 3)).astype(np.float32),
                           "action": rng.normal(size=(length, 3)).astype(np.float32)},
                          task="go left")
    deltas = frame_delta_indices(cfg)
    assert deltas == {"action": list(range(-4, cfg.model.chunk_size))}
    ds = LeRobotV3Dataset(tmp_path / "ds", delta_indices=deltas)
    frames = [0, 2, 9]  # episode 0 at 0 and 2; episode 1 (from frame 6) at its frame 3
    batch = FrameCollate(cfg)([ds[i] for i in frames])
    assert batch["action"].shape == (3, cfg.model.chunk_size, 3)
    assert batch["prev_action"].shape == (3, 4, 3)
    assert batch["prev_action_is_pad"].tolist() == [[True] * 4, [True, True, False, False],
                                                    [True, False, False, False]]
    actions = ds.get_numpy("action", np.arange(len(ds)))
    np.testing.assert_array_equal(batch["prev_action"][2, 1:].numpy(), actions[6:9])
    np.testing.assert_array_equal(batch["action"][1, 0].numpy(), actions[2])
    policy = make_policy(cfg)
    loss, _ = policy(batch)
    loss.backward()
    assert policy.model.pruner_key_proj.weight.grad.abs().sum() > 0
    assert frame_delta_indices(pruned_config()) == {"action": list(range(8))}
    assert frame_delta_indices(pruned_config("context.kind=memory_tokens")) is None


@pytest.fixture
def count_host_syncs(monkeypatch):
    """Counts reads of tensor values by the host (.item, .tolist, bool/int/float, .cpu,
    .numpy): on a GPU each one waits for the device."""
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("kw", [{}, {"min_keep": 6, "max_keep": 20}])
def test_pruner_host_synchronisations_are_what_the_algorithm_needs(kw, count_host_syncs):
    patches, positions, task, valid = random_inputs()
    m = pruner(**kw)
    m.train()(patches, positions, task, valid)
    assert count_host_syncs == []  # training keeps the length: nothing to read
    out = m.eval()(patches, positions, task, valid)
    assert count_host_syncs == ["__int__"]  # the padded kept length, a shape
    count_host_syncs.clear()
    stats = out.stats
    assert count_host_syncs == ["tolist"] and set(stats) == {"kept", "keep_ratio",
                                                              "query_std", "top_vote_share"}
