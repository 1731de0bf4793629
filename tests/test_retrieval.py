"""The experience store: exact nearest neighbours on a hand-built store (faiss and the
torch fallback), save/load answers the same, bad stores and queries get clear errors, a
failed write leaves the old store readable; filling it from a dataset and from rollouts."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memvla.retrieval import ExperienceStore, ObservationEmbedder, store_from_dataset
from memvla.retrieval import store as store_module

SPEC = {"name": "test", "dim": 4}


def hand_built(index: str = "exact") -> ExperienceStore:
    store = ExperienceStore(SPEC, chunk=2, action_dim=1, index=index)
    emb = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                    [1, 1, 0, 0], [0, 0, 1, 1]]), dim=-1)
    actions = torch.arange(10.0).view(5, 2, 1)
    store.add(emb, actions, torch.tensor([1, 0, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 2]))
    return store


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_search_returns_the_exact_nearest_neighbours(backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setattr(store_module, "_faiss", lambda: None)
    store = hand_built()
    q = F.normalize(torch.tensor([[1.0, 0.2, 0, 0], [0.1, 0, 0.9, 1]]), dim=-1)
    idx, scores = store.search(q, 3)
    want = (q @ store.embeddings.T).topk(3, dim=1)
    assert idx.tolist() == want.indices.tolist()
    torch.testing.assert_close(scores, want.values)
    assert idx[0].tolist() == [0, 3, 1] and idx[1].tolist() == [4, 2, 0]
    got = store.items(idx[:, 0])
    assert got["actions"][:, :, 0].tolist() == [[0.0, 1.0], [8.0, 9.0]]
    assert got["success"].tolist() == [True, False] and got["episode"].tolist() == [0, 2]
    # items added later are found too
    store.add(F.normalize(torch.tensor([[1.0, 0.21, 0, 0]]), dim=-1), torch.zeros(1, 2, 1),
              torch.tensor([1]), torch.tensor([3]))
    assert store.search(q[:1], 1)[0].item() == 5


def test_hnsw_finds_well_separated_neighbours():
    torch.manual_seed(0)
    store = ExperienceStore({"name": "test", "dim": 16}, chunk=1, action_dim=1, index="hnsw")
    emb = F.normalize(torch.randn(500, 16), dim=-1)
    store.add(emb, torch.zeros(500, 1, 1), torch.ones(500), torch.arange(500))
    idx, _ = store.search(emb[:20], 1)
    assert idx[:, 0].tolist() == list(range(20))


def test_a_saved_store_answers_the_same(tmp_path):
    store = hand_built()
    store.save(tmp_path / "s")
    loaded = ExperienceStore.load(tmp_path / "s", embedder=SPEC)
    q = F.normalize(torch.randn(3, 4), dim=-1)
    assert torch.equal(store.search(q, 4)[0], loaded.search(q, 4)[0])
    for k in ("embeddings", "actions", "success", "episode"):
        assert torch.equal(getattr(store, k), getattr(loaded, k))


def test_bad_stores_and_queries_are_named(tmp_path):
    store = hand_built()
    with pytest.raises(ValueError, match=r"queries must be \(Q, 4\).*got \(2, 3\)"):
        store.search(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\].*got 6"):
        store.search(torch.zeros(1, 4), 6)
    with pytest.raises(ValueError, match=r"actions must be \(1, 2, 1\), got \(1, 3, 1\)"):
        store.add(torch.zeros(1, 4), torch.zeros(1, 3, 1), torch.ones(1), torch.zeros(1))
    store.save(tmp_path / "s")
    other = {"name": "test", "dim": 8}
    with pytest.raises(ValueError, match="built with another embedder: dim is 4 there, 8 here"):
        ExperienceStore.load(tmp_path / "s", embedder=other)
    (tmp_path / "s" / "experience.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="experience.safetensors: corrupt"):
        ExperienceStore.load(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="is .* an experience store"):
        ExperienceStore.load(tmp_path / "nothing")


def test_an_interrupted_write_leaves_the_old_store_readable(tmp_path, monkeypatch):
    store = hand_built()
    store.save(tmp_path / "s")
    bigger = hand_built()
    bigger.add(torch.zeros(1, 4), torch.zeros(1, 2, 1), torch.ones(1), torch.zeros(1))

    def fail(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "write_file", fail)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(tmp_path / "s")
    assert len(ExperienceStore.load(tmp_path / "s")) == 5


def test_the_embedder_is_fixed_and_names_what_it_is():
    emb = ObservationEmbedder(cameras=1)
    images = [torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)]
    tasks = ["touch the red block", "touch the red block", "touch the dax"]
    a = emb(images, tasks)
    assert a.shape == (3, emb.dim) and torch.allclose(a.norm(dim=-1), torch.ones(3))
    assert torch.equal(a, emb(images, tasks))  # deterministic, no weights
    same_image = [images[0][[0, 0]]]
    b = emb(same_image, ["touch the dax", "touch the wug"])
    c = emb(same_image, ["touch the dax", "touch the dax"])
    assert (b[0] @ b[1]) < (c[0] @ c[1])  # the instruction matters
    assert emb.spec()["dim"] == 256 + 3 * 64 and emb.spec()["name"] == "hash-pool-v1"


def test_a_store_from_a_dataset_and_from_rollouts(tmp_path):
    from memvla.data.record import generate_dataset
    from memvla.evaluate import evaluate
    from memvla.policies import make_policy
    from memvla.presets import get_preset
    from memvla.retrieval import RolloutRecorder

    generate_dataset("remember-color", 3, tmp_path / "d", seed=0,
                     options={"image_size": 32}, progress=False)
    store = store_from_dataset(tmp_path / "d", chunk=4, progress=False)
    info = json.loads((tmp_path / "d" / "meta" / "info.json").read_text())
    from memvla.data.lerobot_v3 import LeRobotV3Dataset

    ds = LeRobotV3Dataset(tmp_path / "d")
    lengths = [hi - lo for lo, hi in (ds.episode_range(e) for e in range(3))]
    assert len(store) == sum(-(-n // 4) for n in lengths) and info["total_episodes"] == 3
    lo, hi = ds.episode_range(1)
    first = int((store.episode == 1).nonzero()[0])
    want = ds.get_numpy("action", np.arange(lo, lo + 4))
    assert np.allclose(store.actions[first].numpy(), want) and store.success.all()

    cfg = get_preset("tiny")
    from memvla.config_utils import apply_overrides

    cfg = apply_overrides(cfg, ["image_shape=[3,32,32]", "model.vision.image_size=32"])
    policy = make_policy(cfg).eval()
    recorder = RolloutRecorder(store, ObservationEmbedder(cameras=1), cfg.image_keys)
    before = len(store)
    results, _ = evaluate("remember-color", 2, policy, batch=2, seed=5,
                          task_options={"image_size": 32}, progress=False, recorder=recorder)
    added = len(store) - before
    assert added > 0 and not recorder.pending
    new = slice(before, len(store))
    assert set(store.episode[new].tolist()) == {3, 4}  # numbered after the dataset's
    assert store.success[new].sum().item() <= added


def test_eval_records_rollouts_into_a_store_and_refuses_another_shape(tmp_path):
    from memvla.cli import main
    from memvla.config_utils import apply_overrides
    from memvla.policies import make_policy
    from memvla.presets import get_preset

    cfg = apply_overrides(get_preset("tiny"), ["image_shape=[3,32,32]",
                                               "model.vision.image_size=32"])
    ckpt = make_policy(cfg).save_pretrained(tmp_path / "ckpt")
    args = ["eval", "--checkpoint", str(ckpt), "--task", "remember-color", "--episodes", "2",
            "--batch", "2", "--opt", "image_size=32", "--record", "0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "e1"), "--record-to", str(tmp_path / "s")]) == 0
    first = len(ExperienceStore.load(tmp_path / "s"))
    assert main([*args, "--out", str(tmp_path / "e2"), "--record-to", str(tmp_path / "s")]) == 0
    store = ExperienceStore.load(tmp_path / "s")
    assert len(store) == 2 * first and store.episode.unique().tolist() == [0, 1, 2, 3]
    other = apply_overrides(cfg, ["n_action_steps=4"])
    ckpt4 = make_policy(other).save_pretrained(tmp_path / "ckpt4")
    args4 = [a if a != str(ckpt) else str(ckpt4) for a in args]
    assert main([*args4, "--out", str(tmp_path / "e3"), "--record-to", str(tmp_path / "s")]) == 2


def test_confidence_measures():
    from helpers import fake_batch

    from memvla.config_utils import apply_overrides
    from memvla.policies import make_policy
    from memvla.policies.confidence import confidence_of, sample_spread, vote_entropy
    from memvla.presets import get_preset

    cfg = apply_overrides(get_preset("tiny"), ["model.num_steps=2"])
    policy = make_policy(cfg).eval()
    obs = fake_batch(cfg, b=3, with_actions=False)
    g = torch.Generator().manual_seed(0)
    spread = sample_spread(policy, obs, samples=4, generator=g)
    assert spread.shape == (3,) and (spread > 0).all()
    assert policy.context_state is None  # the carried state is read, not changed
    # the same from K separate chunks with the same noise draws
    m = cfg.model
    noise = torch.randn(3 * 4, m.chunk_size, m.max_action_dim,
                        generator=torch.Generator().manual_seed(0)).view(3, 4, m.chunk_size, -1)
    inputs = policy.encode_observation(obs)
    chunks = torch.stack([policy.model.sample_actions(*inputs, noise=noise[:, k])[0]
                          for k in range(4)], 1)[..., : cfg.action_dim]  # (B, K, A, Da)
    torch.testing.assert_close(spread, chunks.std(1).mean((1, 2)), atol=1e-5, rtol=1e-4)
    votes = torch.tensor([[16, 0, 0, 0], [4, 4, 4, 4], [8, 8, 0, 0]])
    h = vote_entropy(votes)
    torch.testing.assert_close(h, torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(confidence_of(h, "entropy"), torch.tensor([1.0, 0.0, 0.5]))
    assert confidence_of(torch.tensor([0.0, 2.0]), "spread").tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="samples >= 2"):
        sample_spread(policy, obs, samples=1)
