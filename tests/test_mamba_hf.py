"""Hugging Face Mamba checkpoints: a tiny random transformers ``MambaModel`` /
``MambaForCausalLM`` is saved with ``save_pretrained``, loaded by
:func:`memvla.interop.hf_mamba.load_hf_mamba`, and the last hidden states compared to
transformers' own (its slow, pure PyTorch path: on the CPU, with mamba.py and the
associative scan switched off) to a max abs diff of 1e-5 in float32. Directories that are
not Mamba's are refused with the keys that differ."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memvla.interop.hf_mamba import load_hf_mamba  # noqa: E402

TOL = 1e-5
VOCAB = 50


def hf_config(**kw):
    base = {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "vocab_size": VOCAB,
            "conv_kernel": 4, "expand": 2, "use_mambapy": False, "use_associative_scan": False}
    return transformers.MambaConfig(**{**base, **kw})


@torch.no_grad()
def perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Move every parameter off its init (norm weights off 1, D off 1, biases off 0...)."""
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=gen))


def save_random(cls, tmp_path, gen, max_shard_size=None, **kw):
    model = cls(hf_config(**kw)).eval()
    perturb(model, gen)
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(tmp_path, **extra)
    return model


def hf_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    base = model.backbone if hasattr(model, "backbone") else model
    assert base.embeddings.weight.device.type == "cpu"  # the slow path, not the kernels
    return base(input_ids=ids, use_cache=False).last_hidden_state


CASES = {
    "model": (transformers.MambaModel, {}),
    "causal-lm-tied": (transformers.MambaForCausalLM, {}),
    "causal-lm-untied-sharded": (transformers.MambaForCausalLM,
                                 {"tie_word_embeddings": False, "max_shard_size": "20KB"}),
    "bias-rank-expand": (transformers.MambaModel,
                         {"use_bias": True, "use_conv_bias": False, "residual_in_fp32": False,
                          "time_step_rank": 5, "expand": 3, "conv_kernel": 3,
                          "layer_norm_epsilon": 1e-6}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loaded_backbone_matches_transformers(case, tmp_path):
    cls, kw = CASES[case]
    gen = torch.Generator().manual_seed(1)
    hf = save_random(cls, tmp_path, gen, **kw)
    if "max_shard_size" in kw:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model, cfg = load_hf_mamba(tmp_path)
    assert cfg.n_layer == 2 and cfg.d_model == 32 and cfg.vocab_size == VOCAB
    ids = torch.randint(0, VOCAB, (2, 19), generator=gen)
    with torch.no_grad():
        want = hf_hidden(hf, ids)
        got, _ = model(model.embed(ids))
        # and token by token through the recurrent step
        states, steps = None, []
        for t in range(ids.shape[1]):
            h_t, states = model.step(model.embed(ids[:, t]), states)
            steps.append(h_t)
    assert (got - want).abs().max().item() <= TOL
    assert (torch.stack(steps, 1) - want).abs().max().item() <= 1e-4


def test_non_mamba_layout_names_the_keys_that_differ(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(hf_config().to_dict()))
    save_file({"model.embed_tokens.weight": torch.zeros(VOCAB, 32),
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_hf_mamba(tmp_path)
    msg = str(err.value)
    assert "missing keys: embeddings.weight" in msg
    assert "unexpected keys: model.embed_tokens.weight" in msg


def test_shape_mismatch_is_named(tmp_path):
    gen = torch.Generator().manual_seed(2)
    save_random(transformers.MambaModel, tmp_path, gen)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["state_size"] = 4  # the tensors are for 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shapes differ: layers\.0\.mixer\.A_log: checkpoint "
                                         r"\(64, 8\) vs expected \(64, 4\)"):
        load_hf_mamba(tmp_path)


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="never unpickles"):
        load_hf_mamba(tmp_path)


def test_other_model_types_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "hidden_size": 32}))
    with pytest.raises(ValueError, match="model_type is 'llama', expected 'mamba'"):
        load_hf_mamba(tmp_path)
