"""Policy API: action queue, reset, normalisation, tokenizers, bad input and bad
checkpoints give clear errors."""

import json

import numpy as np
import pytest
import torch
from helpers import fake_batch, narrow_config

from memvla.config_utils import apply_overrides, from_dict, to_dict
from memvla.configs import PolicyConfig, TokenizerConfig
from memvla.data.tokenizers import HFTokenizer, WordTokenizer, make_tokenizer
from memvla.policies import batch_observation, load_policy, make_policy
from memvla.policies.processor import Normalizer, resize_with_pad

STATS = {"observation.state": {"mean": torch.tensor([1.0, 2.0, 3.0]),
                               "std": torch.tensor([2.0, 2.0, 0.5]),
                               "min": torch.tensor([-1.0, 0.0, 1.0]),
                               "max": torch.tensor([1.0, 4.0, 2.0])},
         "action": {"mean": torch.tensor([0.5, -0.5, 0.0]), "std": torch.tensor([3.0, 1.0, 2.0])}}


@pytest.fixture(scope="module")
def policy():
    return make_policy(narrow_config("tiny"), STATS)


def test_select_action_pops_a_queue_of_n_action_steps(policy, monkeypatch):
    calls = []
    real = policy.predict_action_chunk

    def counting(obs, noise=None):
        calls.append(1)
        return real(obs, noise)

    monkeypatch.setattr(policy, "predict_action_chunk", counting)
    obs = fake_batch(policy.config, b=1, with_actions=False)
    n = policy.config.n_action_steps
    torch.manual_seed(0)
    chunk = real(obs)
    torch.manual_seed(0)
    policy.reset()
    actions = [policy.select_action(obs) for _ in range(n)]
    assert len(calls) == 1
    assert torch.allclose(torch.stack(actions, 1), chunk[:, :n])
    policy.select_action(obs)
    assert len(calls) == 2
    policy.reset()
    policy.select_action(obs)
    assert len(calls) == 3


def test_unbatched_observation_helper(policy):
    obs = {"observation.images.top": np.zeros((64, 64, 3), np.uint8),
           "observation.state": np.zeros(3, np.float32), "task": "touch the red ball"}
    out = policy.predict_action_chunk(batch_observation(obs))
    assert out.shape == (1, policy.config.model.chunk_size, 3)


@pytest.mark.parametrize("mode", ["mean_std", "min_max"])
def test_normalizer_round_trip(mode):
    norm = Normalizer({"observation.state": mode}, STATS)
    x = torch.randn(4, 3)
    y = norm.normalize("observation.state", x)
    assert not torch.allclose(x, y)
    torch.testing.assert_close(norm.unnormalize("observation.state", y), x)
    if mode == "min_max":
        lo, hi = STATS["observation.state"]["min"], STATS["observation.state"]["max"]
        torch.testing.assert_close(norm.normalize("observation.state", lo[None]),
                                   -torch.ones(1, 3), atol=1e-6, rtol=0)
        torch.testing.assert_close(norm.normalize("observation.state", hi[None]),
                                   torch.ones(1, 3), atol=1e-6, rtol=0)


def test_normalizer_missing_stats_is_an_error():
    with pytest.raises(ValueError, match="no statistics for 'action'"):
        Normalizer({"action": "mean_std"}, {"observation.state": STATS["observation.state"]})


def test_policy_actions_are_unnormalised_with_saved_stats(policy, tmp_path):
    obs = fake_batch(policy.config, with_actions=False)
    torch.manual_seed(3)
    a = policy.predict_action_chunk(obs)
    policy.save_pretrained(tmp_path / "p")
    loaded = load_policy(tmp_path / "p", device="cpu")
    assert loaded.normalizer.has_stats
    torch.manual_seed(3)
    assert torch.equal(a, loaded.predict_action_chunk(obs))
    torch.manual_seed(3)
    raw = policy.model.sample_actions(*policy.encode_observation(obs))[0][..., :3]
    torch.testing.assert_close(a, raw * (STATS["action"]["std"] + 1e-8) + STATS["action"]["mean"])


def test_resize_with_pad():
    img = torch.ones(1, 3, 32, 64)
    out = resize_with_pad(img, 64, "top_left")
    assert out.shape == (1, 3, 64, 64)
    assert out[0, 0, :32].abs().sum() == 0 and out[0, 0, 32:].min() == 1
    out = resize_with_pad(img, 64, "center")
    assert out[0, 0, :16].abs().sum() == 0 and out[0, 0, 48:].abs().sum() == 0


# -- bad input --------------------------------------------------------------------------

def _bad(policy, **changes):
    batch = fake_batch(policy.config)
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            del batch[k]
        else:
            batch[k] = v
    return batch


@pytest.mark.parametrize("changes,match", [
    ({"observation__state": None}, r"missing key 'observation.state'"),
    ({"observation__images__top": None}, r"missing key 'observation.images.top'"),
    ({"task": None}, r"missing key 'task'"),
    ({"observation__images__top": torch.zeros(2, 32, 32, 3, dtype=torch.uint8)},
     r"images.top: expected uint8 images of shape \(B, 64, 64, 3\).*got \(2, 32, 32, 3\)"),
    ({"observation__images__top": torch.zeros(2, 64, 64, 4, dtype=torch.uint8)},
     r"observation.images.top: expected uint8 .*\(B, 64, 64, 3\).*got \(2, 64, 64, 4\)"),
    ({"observation__images__top": torch.zeros(2, 1, 64, 64)},
     r"observation.images.top: expected float images of shape \(B, 3, 64, 64\).*\(2, 1, 64, 64\)"),
    ({"observation__images__top": torch.full((2, 3, 64, 64), 2.0)},
     r"observation.images.top: expected float images in \[0, 1\]"),
    ({"observation__images__top": torch.full((2, 3, 64, 64), float("nan"))},
     r"observation.images.top: expected finite values"),
    ({"observation__state": torch.zeros(2, 5)},
     r"observation.state: expected shape \(2, 3\), got \(2, 5\)"),
    ({"observation__state": torch.zeros(3)},
     r"observation.state: expected shape \(2, 3\), got \(3,\)"),
    ({"observation__state": torch.tensor([[0.0, float("inf"), 0.0]] * 2)},
     r"observation.state: expected finite values"),
    ({"task": ["one"]}, r"task: expected 2 strings"),
    ({"task": "x " * 200}, r"task: expected 2 strings"),
    ({"task": ["touch " * 40, "go"]}, r"task\[0\]: \d+ tokens, more than the tokenizer limit"),
    ({"action": torch.zeros(2, 3, 3)}, r"action: expected shape \(2, 8, 3\)"),
    ({"action": torch.full((2, 8, 3), float("nan"))}, r"action: expected finite values"),
    ({"action_is_pad": torch.zeros(2, 8)}, r"action_is_pad: expected bool of shape \(2, 8\)"),
])
def test_bad_input_names_key_expected_and_received(policy, changes, match):
    with pytest.raises(ValueError, match=match):
        policy(_bad(policy, **changes))


def test_bad_input_at_inference(policy):
    obs = fake_batch(policy.config, with_actions=False)
    obs["observation.state"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"observation.state: expected shape \(2, 3\)"):
        policy.select_action(obs)


# -- checkpoints ------------------------------------------------------------------------

def test_checkpoint_with_mismatched_weights_names_keys(policy, tmp_path):
    policy.save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "config.json").read_text())
    meta["config"]["model"]["text"]["depth"] = 5
    meta["config"]["model"]["expert"]["depth"] = 5
    (tmp_path / "p" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model.safetensors: weights do not match the config: "
                       r"18 missing keys \[.*layers.4.*\], 0 unexpected"):
        load_policy(tmp_path / "p")


def test_checkpoint_with_wrong_shapes_names_the_tensor(policy, tmp_path):
    policy.save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "config.json").read_text())
    meta["config"]["model"]["max_state_dim"] = 9
    (tmp_path / "p" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"state_proj.weight has shape \(64, 8\), the config "
                       r"expects \(64, 9\)"):
        load_policy(tmp_path / "p")


def test_corrupt_or_missing_checkpoint_files(policy, tmp_path):
    d = tmp_path / "p"
    policy.save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt safetensors file"):
        load_policy(d)
    (d / "processor.safetensors").unlink()
    policy.save_pretrained(d)
    (d / "processor.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"processor.safetensors: no such file"):
        load_policy(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: corrupt JSON"):
        load_policy(d)
    with pytest.raises(FileNotFoundError, match=r"config.json: no such file"):
        load_policy(tmp_path / "nothing")


# -- configs ----------------------------------------------------------------------------

def test_config_round_trip_and_overrides():
    cfg = narrow_config("smolvla-450m")
    assert from_dict(PolicyConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    cfg2 = apply_overrides(cfg, ["model.chunk_size=10", "n_action_steps=5"])
    assert cfg2.model.chunk_size == 10 and cfg2.n_action_steps == 5
    with pytest.raises(ValueError, match="Did you mean 'chunk_size'"):
        apply_overrides(cfg, ["model.chunk_sise=10"])
    with pytest.raises(ValueError, match=r"n_action_steps \(60\) must be <= model.chunk_size"):
        apply_overrides(cfg, ["n_action_steps=60"])
    with pytest.raises(ValueError, match="model.state_token must be one of"):
        apply_overrides(cfg, ["model.state_token=middle"])
    with pytest.raises(ValueError, match=r"model.expert.depth \(3\) must equal model.text.depth"):
        apply_overrides(cfg, ["model.expert.depth=3", "model.text.depth=2"])


# -- tokenizers -------------------------------------------------------------------------

def test_word_tokenizer_words_bytes_and_padding():
    tok = WordTokenizer(max_length=12)
    ids, pad = tok(["Touch the RED ball.", "zorblax"])
    assert ids.shape == pad.shape == (2, 12)
    assert pad[0].sum() == 1 + 5  # bos + touch the red ball .
    assert pad[1].sum() == 1 + len("zorblax")  # bos + bytes of an unknown word
    assert tok.decode(ids[0][pad[0]].tolist()) == "touch the red ball ."
    assert tok.decode(ids[1][pad[1]].tolist()) == "zorblax"
    with pytest.raises(ValueError, match=r"task\[0\]: 13 tokens, more than the tokenizer limit"):
        tok(["a" * 12])


def test_hf_tokenizer_from_local_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "touch": 2, "the": 3, "red": 4, "ball": 5}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                                unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tok")
    tok = make_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "tok"), max_length=6))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 6
    ids, pad = tok(["touch the red ball", "the ball"])
    assert ids[0].tolist() == [2, 3, 4, 5, 0, 0] and pad[1].tolist() == [True, True] + [False] * 4
    with pytest.raises(ValueError, match="could not load a Hugging Face tokenizer"):
        HFTokenizer(str(tmp_path / "missing"))


# -- device and dtype ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_runs_in_the_dtype_of_its_weights(name, dtype):
    torch.manual_seed(0)
    ref = make_policy(narrow_config(name), STATS)
    policy = make_policy(narrow_config(name), STATS)
    policy.load_state_dict(ref.state_dict())
    policy.to(dtype)
    assert policy.dtype == dtype
    obs = fake_batch(policy.config, with_actions=False)
    images, _, _, state = policy.encode_observation(obs)
    assert all(im.dtype == dtype for im in images) and state.dtype == dtype
    chunk = policy.predict_action_chunk(obs)
    assert chunk.dtype == torch.float32  # actions for the robot, unnormalised in float32
    assert torch.isfinite(chunk).all()
    want = ref.predict_action_chunk(obs) if name == "tiny-oft" else None
    if want is not None:  # the parallel family is deterministic: compare with float32
        tol = 1e-5 if dtype == torch.float32 else 0.15 * want.abs().max().item()
        assert (chunk - want).abs().max().item() <= tol
    loss, _ = policy(fake_batch(policy.config))
    assert loss.dtype == torch.float32 or loss.dtype == dtype
    loss.backward()
    unused = policy.model.unused_parameter_names()
    grads = {n: p.grad for n, p in policy.model.named_parameters() if n not in unused}
    assert all(g is not None and g.dtype == dtype for g in grads.values())


def test_images_travel_as_uint8_and_convert_on_the_device(policy, monkeypatch):
    from memvla.policies import base

    seen = []
    real = base.images_to_float

    def spy(x, dtype):
        seen.append(x.dtype)
        return real(x, dtype)

    monkeypatch.setattr(base, "images_to_float", spy)
    obs = fake_batch(policy.config, with_actions=False)
    images, *_ = policy.encode_observation(obs)
    assert seen == [torch.uint8]  # moved to the device as bytes, converted there
    floats = dict(obs, **{"observation.images.top":
                          obs["observation.images.top"].permute(0, 3, 1, 2).float() / 255})
    images_f, *_ = policy.encode_observation(floats)
    torch.testing.assert_close(images[0], images_f[0])


def test_normalizer_statistics_are_placed_once_per_device(policy):
    x = torch.randn(4, 3)
    policy.normalizer.normalize("observation.state", x)
    first = policy.normalizer._stats_on("observation.state", x.device)
    for _ in range(3):
        policy.normalizer.normalize("observation.state", x)
        policy.normalizer.unnormalize("observation.state", x)
    assert all(a is b for a, b in zip(first.values(), policy.normalizer._stats_on(
        "observation.state", x.device).values(), strict=True))
    assert policy.normalizer.normalize("observation.state", x.to(torch.bfloat16)).dtype == (
        torch.float32)


def test_an_empty_batch_is_a_value_error(policy):
    obs = fake_batch(policy.config, b=1)
    empty = {k: (v[:0] if isinstance(v, torch.Tensor) else []) for k, v in obs.items()}
    with pytest.raises(ValueError, match=r"observation.images.top: expected a batch of at least "
                       r"1 sample, got an empty batch of shape \(0, 3, 64, 64\)"):
        policy(empty)
    with pytest.raises(ValueError, match="empty batch"):
        policy.predict_action_chunk(empty)
