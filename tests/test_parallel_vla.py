"""The parallel-decoding VLA (OpenVLA-OFT family) with and without LightVLA's token pruner:
the sequence layout against its slow twin, zeroed placeholders, bidirectional attention,
the action positions read at training equal those read at inference, batched pruned
inference equals per-sample inference, num_patches mismatches, gradients, save/load, and
``memvla train`` / ``memvla eval`` with ``tiny-oft``."""

import json

import numpy as np
import pytest
import torch
from helpers import fake_batch

from memvla.cli import main
from memvla.config_utils import apply_overrides, from_dict, to_dict
from memvla.configs import PolicyConfig
from memvla.models.parallel_vla import (
    ACTION,
    PAD,
    PATCH,
    PROMPT,
    ParallelVLA,
    build_sequence,
    build_sequence_ref,
)
from memvla.policies import ParallelVLAPolicy, load_policy, make_policy
from memvla.presets import get_preset

PRUNE = ["model.pruner.enabled=true"]


def _policy(extra=None, seed=0):
    torch.manual_seed(seed)
    return make_policy(get_preset("tiny-oft", extra))


def _inputs(policy, b=2, seed=0, uniform_first=False):
    obs = fake_batch(policy.config, b=b, with_actions=False, seed=seed)
    if uniform_first:  # a flat image: every patch alike, the pruner keeps few
        obs["observation.images.top"][0] = 90
    return obs, policy.encode_observation(obs)


@pytest.mark.parametrize("extra", [[], PRUNE], ids=["plain", "pruned"])
def test_forward_shapes_gradients_and_round_trip(extra, tmp_path):
    policy = _policy(extra)
    cfg = policy.config
    loss, info = policy(fake_batch(cfg))
    assert torch.isfinite(loss) and info["valid_steps"] == 2 * cfg.model.chunk_size - 2
    assert ("pruner_kept" in info) == bool(extra)
    loss.backward()
    unused = policy.model.unused_parameter_names()
    assert unused == set()  # tiny-oft has no LM head
    for n, p in policy.model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all()
    policy.eval()
    obs, _ = _inputs(policy)
    chunk = policy.predict_action_chunk(obs)
    assert chunk.shape == (2, cfg.model.chunk_size, cfg.action_dim) and torch.isfinite(chunk).all()
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt", device="cpu").eval()
    assert isinstance(loaded, ParallelVLAPolicy) and loaded.config == cfg
    assert torch.equal(loaded.predict_action_chunk(obs), chunk)
    assert policy.memory is None and not policy.is_recurrent


def test_sequence_matches_its_slow_twin_with_gaps_and_padding():
    g = torch.Generator().manual_seed(0)
    b, p_all, d, k = 3, 10, 8, 6
    valid = torch.rand(b, 7, generator=g) > 0.4  # (B, P') pruned slots
    pos = torch.sort(torch.rand(b, 7, generator=g).argsort(1)[:, :7] + 1, 1).values
    prompt_pad = torch.zeros(b, 5, dtype=torch.bool)
    for i, n in enumerate((5, 2, 0)):
        prompt_pad[i, :n] = True
    args = (torch.randn(b, 1, d, generator=g), torch.randn(b, 7, d, generator=g), valid, pos,
            p_all, torch.randn(b, 1, d, generator=g), torch.randn(b, 5, d, generator=g),
            prompt_pad, k, torch.randn(b, 1, d, generator=g))
    seq = build_sequence(*args)
    for i, (embs, positions, kinds) in enumerate(build_sequence_ref(*args)):
        real = seq.valid[i]
        assert torch.equal(seq.embs[i][real], embs)
        assert torch.equal(seq.positions[i][real], positions)
        assert torch.equal(seq.kinds[i][real], kinds)
        assert (seq.kinds[i][~real] == PAD).all()
        # the tokens after the patches count on from 1 + P (the unpruned patch count)
        assert positions[kinds == PROMPT].tolist() == list(range(p_all + 2, p_all + 2 + (
            kinds == PROMPT).sum().item()))
    assert (seq.kinds[:, seq.action_slice] == ACTION).all()


@pytest.mark.parametrize("extra", [[], PRUNE], ids=["plain", "pruned"])
def test_placeholders_are_zero_and_read_at_the_same_positions_in_training_and_inference(extra):
    policy = _policy(extra)
    model = policy.model
    _, inputs = _inputs(policy, uniform_first=True)
    model.train()
    seq_t = model.encode(*inputs)
    model.eval()
    seq_e = model.encode(*inputs)
    for seq in (seq_t, seq_e):
        assert (seq.embs[:, seq.action_slice] == 0).all()
        assert (seq.kinds[:, seq.action_slice] == ACTION).all()
        assert seq.action_slice.stop == seq.embs.shape[1] - 1  # STOP follows the actions
    assert torch.equal(seq_t.action_positions, seq_e.action_positions)
    n_patches = model.cfg.tokens_per_image
    if extra:  # inference is shorter: the read indices moved with the pruned length
        short = n_patches - int(seq_e.kept.max())
        assert short > 0 and seq_e.embs.shape[1] == seq_t.embs.shape[1] - short
        assert seq_e.action_start == seq_t.action_start - short
        assert seq_e.kept[0] < seq_e.kept[1]
    else:
        assert torch.equal(seq_t.positions, seq_e.positions)
    # the positions of everything after the patches do not depend on pruning
    after_t = seq_t.positions[:, 1 + n_patches:]
    after_e = seq_e.positions[:, seq_e.embs.shape[1] - after_t.shape[1]:]
    assert torch.equal(after_t, after_e)


def test_attention_is_bidirectional_and_padding_is_masked():
    policy = _policy()
    model = policy.model.eval()
    _, inputs = _inputs(policy)
    seq = model.encode(*inputs)
    base = model.hidden_states(seq)  # (B, N, D)
    last_prompt = int((seq.kinds[0] == PROMPT).nonzero().max())
    pad_slot = int((seq.kinds[0] == PAD).nonzero().min())
    later = seq.embs.clone()
    later[0, last_prompt] += 1.0
    seq.embs = later
    changed = model.hidden_states(seq)
    first_patch = int((seq.kinds[0] == PATCH).nonzero().min())
    assert not torch.allclose(changed[0, first_patch], base[0, first_patch])
    assert torch.equal(changed[1], base[1])  # other samples untouched
    padded = later.clone()
    padded[0, pad_slot] += 100.0
    seq.embs = padded
    again = model.hidden_states(seq)
    real = seq.valid[0]
    assert torch.allclose(again[0][real], changed[0][real], atol=1e-6)


def test_batched_pruned_inference_equals_each_sample_alone():
    policy = _policy(PRUNE).eval()
    obs, inputs = _inputs(policy, uniform_first=True)
    kept = policy.model.encode(*inputs).kept
    assert kept[0] != kept[1], kept
    both = policy.predict_action_chunk(obs)
    for i in range(2):
        one = {k: (v[i:i + 1] if torch.is_tensor(v) else v[i:i + 1]) for k, v in obs.items()}
        alone = policy.predict_action_chunk(one)
        assert torch.allclose(both[i:i + 1], alone, atol=1e-5), (both[i] - alone[0]).abs().max()


def test_pruner_num_patches_mismatch_says_what_to_set():
    base = get_preset("tiny-oft", PRUNE)
    n = base.model.tokens_per_image
    with pytest.raises(ValueError, match=f"set model.pruner.num_patches={2 * n}"):
        apply_overrides(base, ['cameras=["top", "wrist"]', f"model.pruner.num_patches={n}"])
    model = ParallelVLA(base.model, num_cameras=1)  # built for one camera, fed two
    policy = make_policy(base)
    _, (images, ids, pad, state) = _inputs(policy)
    with pytest.raises(ValueError, match=f"set model.pruner.num_patches={2 * n}"):
        model.encode(images + images, ids, pad, state)
    two = make_policy(apply_overrides(base, ['cameras=["top", "wrist"]']))
    assert two.model.pruner.num_patches == 2 * n  # 0 = derived from the cameras


def test_every_prompt_token_is_kept_with_or_without_a_tokenizer_bos():
    # the model puts its own BOS first; a tokenizer's BOS is dropped from the prompt, and a
    # tokenizer without one loses no real token
    policy = _policy()
    obs, (images, ids, pad, state) = _inputs(policy)
    raw, raw_pad = policy.tokenizer(obs["task"])
    assert torch.equal(ids, raw[:, 1:]) and torch.equal(pad, raw_pad[:, 1:])
    seq = policy.model.encode(images, ids, pad, state)
    prompt = seq.kinds == PROMPT
    assert torch.equal(prompt.sum(1), raw_pad.sum(1) - 1)  # every real token but BOS
    bos = policy.model.decoder.embed(torch.tensor([[policy.config.model.bos_token_id]]))
    assert torch.equal(seq.embs[:, 0], bos[:, 0].expand(2, -1))

    words = policy.tokenizer

    class NoBos:  # a tokenizer that adds no BOS (e.g. GPT-2 style)
        bos_id = None

        def __call__(self, texts):
            i, p = words(texts)
            return i[:, 1:], p[:, 1:]

    policy.tokenizer = NoBos()
    _, (_, ids2, pad2, _) = _inputs(policy)
    assert torch.equal(ids2, ids) and torch.equal(pad2, pad)  # nothing more dropped
    seq2 = policy.model.encode(images, ids2, pad2, state)
    assert torch.equal((seq2.kinds == PROMPT).sum(1), pad2.sum(1))
    mixed = torch.stack([raw[0], raw[1].roll(-1)])
    from memvla.policies.parallel_policy import drop_bos

    with pytest.raises(ValueError, match=r"BOS \(id 1\) before 1 of 2 prompts"):
        drop_bos(mixed, raw_pad, 1)


def test_predict_prunes_as_at_inference_even_in_train_mode():
    policy = _policy(PRUNE + ["model.pruner.noise_scale=1.0"]).train()
    obs, inputs = _inputs(policy, uniform_first=True)
    chunk, _ = policy.model.predict(*inputs)
    assert policy.model.pruner.training  # the mode is restored
    assert int(policy.model.pruner.last_kept.max()) < policy.model.pruner.num_patches
    policy.eval()
    torch.testing.assert_close(policy.model.predict(*inputs)[0], chunk)


def test_training_progress_drives_the_pruner_noise():
    policy = _policy(PRUNE + ["model.pruner.noise_scale=2.0"])
    policy.set_training_progress(0.25)
    assert policy.model.pruner.noise_scale == pytest.approx(1.5)
    _policy().set_training_progress(0.5)  # no pruner: a no-op


def test_config_family_round_trip_and_mismatch():
    cfg = get_preset("tiny-oft", PRUNE)
    assert from_dict(PolicyConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    flow = to_dict(get_preset("tiny"))
    del flow["family"]  # configs saved before families existed
    assert from_dict(PolicyConfig, flow).family == "flow"
    with pytest.raises(ValueError, match="needs a ParallelVLAConfig"):
        PolicyConfig(family="parallel", model=get_preset("tiny").model)
    assert apply_overrides(cfg, ["context.kind=memory_tokens"]).context.recurrent  # μVLA


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Built-in-task-shaped data (64×64 'top' camera, 3-d state and action) whose actions
    follow the brightness of the image, so a few steps of training lower the loss."""
    from memvla.data.lerobot_v3 import LeRobotV3Writer

    root = tmp_path_factory.mktemp("ds") / "oft"
    rng = np.random.default_rng(0)
    w = LeRobotV3Writer(root, fps=10)
    for _ in range(16):
        t, c = 12, rng.uniform(0, 1)
        image = np.clip(c * 255 + rng.integers(-10, 10, (t, 64, 64, 3)), 0, 255)
        w.add_episode({
            "observation.images.top": image.astype(np.uint8),
            "observation.state": rng.uniform(0, 1, (t, 3)).astype(np.float32),
            "action": np.full((t, 3), 1.0 - 2.0 * c, np.float32)}, task="touch the red ball")
    w.finalize()
    return root


def test_train_tiny_oft_lowers_the_loss_and_evaluates(dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny-oft", "--dataset", str(dataset), "--steps", "30",
                 "--out", str(run), "--no-progress", "train.batch_size=8",
                 "train.num_workers=0", "train.warmup_steps=0",
                 "policy.model.pruner.enabled=true"]) == 0
    losses = json.loads((run / "last_summary.json").read_text())["losses"]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert main(["eval", "--checkpoint", str(run), "--task", "reach-color", "--episodes", "2",
                 "--batch", "2", "--record", "0", "--out", str(tmp_path / "eval"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["episodes"] == 2


def test_regression_loss_is_l1_or_squared_error():
    """The same weights and batch: ``l1`` gives |pred − target| per element, ``mse`` its
    square; a bad value is refused with the choices."""
    l1, mse = _policy(["model.regression_loss=l1"]), _policy(["model.regression_loss=mse"])
    mse.load_state_dict(l1.state_dict())
    images, ids, pad, state = l1.encode_observation(fake_batch(l1.config, with_actions=False))
    target = torch.randn(2, l1.model.cfg.chunk_size, l1.model.cfg.max_action_dim)
    with torch.no_grad():
        a, _ = l1.model(images, ids, pad, state, target)  # (B, A, Da')
        b, _ = mse.model(images, ids, pad, state, target)
    assert torch.allclose(b, a ** 2, atol=1e-6) and not torch.allclose(a, b)
    assert get_preset("tiny-oft").model.regression_loss == "mse"  # see the preset
    assert get_preset("openvla-oft-7b").model.regression_loss == "l1"  # OFT's recipe
    with pytest.raises(ValueError, match=r"model.regression_loss must be one of \('l1', 'mse'\), "
                                         r"got 'huber'"):
        get_preset("tiny-oft", ["model.regression_loss=huber"])
