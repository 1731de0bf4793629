"""Experience across episodes in the prefix (``context.kind=experience``): the unseen-names
task, what a policy retrieves (never its own episode in training), masked items equal no
items, switching by confidence at threshold 0 / infinity equals never / always retrieving,
the fast path's shared-prefix sampling equals sampling draw by draw, stores built from the
expert and extended, training with a store, bad options named."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import narrow_config, write_episode

from memvla.configs import ContextConfig
from memvla.envs import make, make_expert
from memvla.envs.unseen_names import nonce_words
from memvla.policies import make_policy
from memvla.policies.inputs import check_observation
from memvla.retrieval import ExperienceSource, ExperienceStore, ObservationEmbedder
from memvla.retrieval.record import store_from_dataset, store_from_expert, word_resets

KIND = ["context.kind=experience", "context.store_chunk=4", "context.store_topk=2",
        "n_action_steps=4"]


def _run(env, reset=None, seed=0):
    obs, _ = env.reset(seed=seed, options=reset)
    expert = make_expert(env)
    for _ in range(env.unwrapped.max_episode_steps):
        obs, _, terminated, truncated, _ = env.step(expert.act(obs))
        if terminated or truncated:
            break
    return env.unwrapped


def test_unseen_names_words_meanings_expert_and_decoys():
    train, test = nonce_words("train", 200), nonce_words("test", 20)
    assert not set(train) & set(test) and len(set(train)) == 200
    assert nonce_words("train", 5) == train[:5]  # a pool's first words do not depend on count
    env = make("unseen-names", image_size=32, names="test")
    targets = [env.words.index(w) % 3 for w in env.words]
    assert np.bincount(targets).tolist() == [7, 7, 6]  # every object named as often
    done = _run(env, {"name": test[4]})
    assert done.success and env.unwrapped.target == 1 and done.instruction == f"touch the {test[4]}"
    assert not _run(env, {"name": test[4], "decoy": 2}).success
    with pytest.raises(ValueError, match=r"option 'name' must be a word of the 'test' pool"):
        env.reset(seed=0, options={"name": train[0]})
    with pytest.raises(ValueError, match=r"option 'n_objects' must be an integer in \[2, 5\]"):
        make("unseen-names", n_objects=6)


def test_stores_from_the_expert_hold_outcomes_and_extend():
    options = {"names": "test", "n_test_names": 3, "image_size": 32}
    resets = word_resets("unseen-names", 2, options)
    assert [r["name"] for r in resets] == [w for w in nonce_words("test", 3) for _ in (0, 1)]
    ok = store_from_expert("unseen-names", resets, 4, 4, options, progress=False)
    bad = store_from_expert("unseen-names", [{"decoy": 1}] * 2, 8, 4, {"image_size": 32},
                            progress=False)
    assert ok.success.all() and not bad.success.any()
    assert ok.episode.unique().tolist() == list(range(6))
    n = len(ok)
    ok.extend(bad)  # the first 4 of its 8 actions; episode ids after the store's own
    assert len(ok) == n + len(bad) and ok.episode[n:].unique().tolist() == [6, 7]
    torch.testing.assert_close(ok.actions[n:], bad.actions[:, :4])
    with pytest.raises(ValueError, match=r"cannot add items of 4 × 3 actions .* to a store "
                       r"of 8 × 3"):
        bad.extend(ok)
    with pytest.raises(ValueError, match="has no word pool"):
        word_resets("reach-color", 1)


def test_a_source_returns_the_nearest_items_but_never_the_samples_own_episode():
    spec = ObservationEmbedder(text_dim=8, grid=1, image_weight=0).spec()
    store = ExperienceStore(spec, chunk=2, action_dim=1)
    emb = F.normalize(torch.randn(12, spec["dim"]), dim=-1)
    store.add(emb, torch.arange(24.0).view(12, 2, 1), torch.arange(12) % 2 == 0,
              torch.arange(12) // 3)
    source = ExperienceSource(store, exclude_own=True)
    images, tasks = [torch.rand(2, 3, 8, 8)], ["touch the dax", "touch the wug"]
    query = source.embed(images, tasks)
    got = source.retrieve(images, tasks, 4, episodes=torch.tensor([0, 2]))
    for b, own in enumerate((0, 2)):
        order = (store.embeddings @ query[b]).argsort(descending=True)
        want = [i for i in order.tolist() if i // 3 != own][:4]
        assert store.actions[want].tolist() == got["actions"][b].tolist()
        assert got["valid"][b].all() and (got["score"][b][:-1] >= got["score"][b][1:]).all()
    everything = ExperienceSource(store).retrieve(images, tasks, 12, torch.tensor([0, 2]))
    assert everything["valid"].all()  # without exclude_own the own episode is found too
    few = ExperienceSource(ExperienceStore(spec, 2, 1)).retrieve(images, tasks, 3)
    assert not few["valid"].any()  # an empty store: no items


def _policy_with_store(tmp_path, preset="tiny", extra=()):
    torch.manual_seed(0)
    cfg = narrow_config(preset, extra=[*KIND, *extra])
    policy = make_policy(cfg).eval()
    write_episode(tmp_path / "ds", cfg, 13)
    store = store_from_dataset(tmp_path / "ds", 4, 4, progress=False)
    return policy, store


def _obs(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, h, w = cfg.image_shape
    return {"observation.images.top": torch.randint(0, 256, (b, h, w, 3), generator=g,
                                                    dtype=torch.uint8),
            "observation.state": torch.rand(b, cfg.state_dim, generator=g),
            "task": ["touch the dax", "touch the wug"][:b]}


@pytest.mark.parametrize("preset", ["tiny", "tiny-oft"])
def test_masked_items_equal_no_items_and_thresholds_zero_and_infinity(preset, tmp_path):
    policy, store = _policy_with_store(tmp_path, preset, ["model.num_steps=2"]
                                       if preset == "tiny" else [])
    cfg, m = policy.config, policy.config.model
    obs, noise = _obs(cfg), torch.randn(2, m.chunk_size, m.max_action_dim)
    alone = policy.predict_action_chunk(obs, noise=noise)  # no store: no items
    policy.attach_experience(store)
    always = policy.predict_action_chunk(obs, noise=noise)
    assert policy.last_retrieval["retrieved"].all()
    assert (always - alone).abs().max() > 1e-4  # the items change the chunk
    # the items of the retrieving sample, masked for the other: each as if alone
    images, _, tasks = check_observation(obs, cfg)
    state = policy._items(images, tasks, torch.tensor([True, False]))
    inputs = policy.encode_observation(obs)
    if cfg.family == "flow":
        x, _ = policy.model.sample_actions(*inputs, noise=noise, context_state=state)
    else:
        x, _ = policy.model.predict(*inputs, context_state=state)
    x = policy.normalizer.unnormalize("action", x[..., : cfg.action_dim])
    torch.testing.assert_close(x[0], always[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(x[1], alone[1], atol=1e-5, rtol=0)
    for threshold, want, share in ((0.0, alone, 0.0), (float("inf"), always, 1.0)):
        policy.config.context.retrieve_below = threshold
        if cfg.family != "flow" and threshold > 0:
            break  # a regressed chunk has no sample spread: see the next test
        got = policy.predict_action_chunk(obs, noise=noise)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert policy.last_retrieval["retrieved"].float().mean().item() == share


def test_switching_keeps_the_fast_chunk_where_the_policy_is_sure(tmp_path):
    policy, store = _policy_with_store(tmp_path, extra=["model.num_steps=2"])
    cfg, m = policy.config, policy.config.model
    obs, noise = _obs(cfg), torch.randn(2, m.chunk_size, m.max_action_dim)
    alone = policy.predict_action_chunk(obs, noise=noise)
    policy.attach_experience(store)
    always = policy.predict_action_chunk(obs, noise=noise)
    confidence = policy._fast_path(obs, policy.encode_observation(obs), noise)[1]  # (2,)
    assert ((confidence >= 0) & (confidence <= 1)).all()
    policy.config.context.retrieve_below = float(confidence.mean())  # one below, one above
    got = policy.predict_action_chunk(obs, noise=noise)
    use = policy.last_retrieval["retrieved"]
    assert use.tolist() == (confidence < confidence.mean()).tolist() and use.sum() == 1
    for b in range(2):
        torch.testing.assert_close(got[b], (always if use[b] else alone)[b], atol=1e-5, rtol=0)
    policy.config.context.confidence = "entropy"
    with pytest.raises(ValueError, match="reads the token pruner's votes; this policy has no "
                       "pruner"):
        policy.predict_action_chunk(obs, noise=noise)


def test_shared_prefix_sampling_equals_sampling_each_draw():
    torch.manual_seed(0)
    policy = make_policy(narrow_config("tiny", extra=["model.num_steps=3"])).eval()
    cfg, m = policy.config, policy.config.model
    obs = _obs(cfg)
    noise = torch.randn(2, 3, m.chunk_size, m.max_action_dim)  # (B, K, A, Da')
    inputs = policy.encode_observation(obs)
    many = policy.model.sample_many(*inputs, noise)
    for k in range(3):
        one, _ = policy.model.sample_actions(*inputs, noise=noise[:, k])
        torch.testing.assert_close(many[:, k], one, atol=1e-5, rtol=0)


def test_training_retrieves_other_episodes_and_every_parameter_learns(tmp_path):
    from memvla.data.lerobot_v3 import LeRobotV3Dataset
    from memvla.policies.frames import FrameCollate, frame_delta_indices

    policy, _ = _policy_with_store(tmp_path)
    cfg = policy.config
    write_episode(tmp_path / "ds2", cfg, 13, seed=1)
    ds = LeRobotV3Dataset(tmp_path / "ds", delta_indices=frame_delta_indices(cfg))
    batch = FrameCollate(cfg)([ds[0], ds[5]])
    with pytest.raises(ValueError, match=r"none is attached: call policy.attach_experience"):
        policy(batch)
    store = store_from_dataset(tmp_path / "ds", 4, 4, progress=False)
    store_from_dataset(tmp_path / "ds2", 4, 4, store=store, progress=False)
    policy.attach_experience(store, exclude_own=True)
    state = policy._experience_for_batch(batch)  # episode 0's frames: only episode 1's items
    want = store.actions[store.episode == 1]
    for b in range(2):
        for a in policy.normalizer.unnormalize("action", state["actions"][b, :, :, :3]):
            assert any(torch.allclose(a, w, atol=1e-5) for w in want)
    policy.train()
    loss, _ = policy(batch)
    loss.backward()
    enc = [p.grad for p in policy.model.context.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in enc)
    del batch["episode_index"]
    with pytest.raises(ValueError, match=r"missing key 'episode_index'"):
        policy(batch)


def test_memvla_train_builds_its_store_and_a_bad_store_is_refused(tmp_path):
    from memvla.training.loop import create_run, make_run_config, train

    cfg = narrow_config("tiny", extra=KIND)
    write_episode(tmp_path / "ds", cfg, 13)
    rc = make_run_config("tiny", str(tmp_path / "ds"), 2, [
        *[f"policy.{o}" for o in KIND], "policy.model.num_steps=2", "train.num_workers=0",
        "train.batch_size=4"])
    create_run(tmp_path / "run", rc)
    summary = train(tmp_path / "run", progress=False)
    assert summary["step"] == 2 and all(np.isfinite(summary["losses"]))
    other = make_policy(narrow_config("tiny", extra=["context.kind=experience"]))
    store = store_from_dataset(tmp_path / "ds", 2, 2, progress=False)
    with pytest.raises(ValueError, match=r"items of 2 × 3 actions embedded from 1 camera\(s\); "
                       r"this policy reads 8 × 3"):
        other.attach_experience(store)
    plain = make_policy(narrow_config("tiny"))
    with pytest.raises(ValueError, match="feeds context.kind='experience'; this policy's "
                       "context.kind is 'none'"):
        plain.attach_experience(store)


@pytest.mark.parametrize("option, message", [
    ({"store_dropout": 1.0}, r"context.store_dropout is a share of training samples in "
                             r"\[0, 1\), got 1.0"),
    ({"retrieve_below": -1}, r"context.retrieve_below is a confidence threshold >= 0"),
    ({"confidence": "loss"}, r"context.confidence must be one of \('spread', 'entropy'\), "
                             r"got 'loss'"),
    ({"confidence_samples": 1}, r"context.confidence_samples must be >= 2"),
    ({"store_topk": 0}, r"context.store_topk must be > 0, got 0"),
])
def test_bad_experience_options_are_named(option, message):
    with pytest.raises(ValueError, match=message):
        ContextConfig(kind="experience", **option)
    with pytest.raises(ValueError, match=r"is an option of context.kind='experience', not of "
                       r"'none'"):
        ContextConfig(store_topk=2)


def test_memvla_store_builds_and_adds_to_a_store(tmp_path, capsys):
    from memvla.cli import main

    out = tmp_path / "store"
    args = ["store", str(out), "--task", "unseen-names", "--opt", "names=test", "--opt",
            "n_test_names=2", "--opt", "image_size=32", "--chunk", "4", "--no-progress"]
    assert main([*args, "--each-word", "2"]) == 0
    assert main([*args, "--episodes", "3", "--decoy", "1"]) == 0
    store = ExperienceStore.load(out)
    assert store.episode.unique().numel() == 7
    assert int(store.success.sum()) == int((store.episode < 4).sum())  # the decoys failed
    assert main(["store", str(out)]) == 2
    assert "give one of --dataset DIR or --task TASK" in capsys.readouterr().err
    assert main(args) == 2  # neither --episodes nor --each-word
    assert "give --episodes N or --each-word N" in capsys.readouterr().err
