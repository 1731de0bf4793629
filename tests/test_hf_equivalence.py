"""memvla's layers against Hugging Face transformers' reference implementations.

Small random Hugging Face models are built, every parameter is re-drawn (so that norm
weights, biases and the Gemma ``1 + weight`` offset are not at their trivial init), the same
weights are loaded by name into memvla's modules (``strict=True``: the names must match) and
the outputs are compared in float32 to a max abs diff of 1e-5.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from memvla.configs import DecoderConfig  # noqa: E402
from memvla.layers.connector import Connector, pixel_shuffle  # noqa: E402
from memvla.layers.kv_cache import KVCache  # noqa: E402
from memvla.layers.masks import block_mask, positions_from_pad  # noqa: E402
from memvla.layers.rope import apply_rope, rope_cos_sin  # noqa: E402
from memvla.layers.vision import VisionTransformer  # noqa: E402
from memvla.models.decoder import Decoder  # noqa: E402

TOL = 1e-5
WIDTH, DEPTH, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 64, 2, 4, 2, 16, 128, 100
RMS_EPS, ROPE_BASE = 1e-5, 10_000.0


# -- helpers --------------------------------------------------------------------------------
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Re-draw every parameter: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 0.5²),
    biases ~ N(0, 0.1²), norm weights = their init + N(0, 0.1²)."""
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.add_(0.1 * noise)
        elif "embed" in name and p.dim() == 2:
            p.copy_(0.5 * noise)
        elif p.dim() >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:
            p.copy_(0.1 * noise)


def rope_kwargs(config_cls, theta: float) -> dict:
    """transformers 5 takes ``rope_parameters``; 4.x took ``rope_theta``."""
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def check_rope_base(hf_model, theta: float) -> None:
    """Guard against a rope kwarg silently ignored by the config."""
    want = 1.0 / (theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    assert max_diff(hf_model.rotary_emb.inv_freq, want) < 1e-7


def hf_decoder(kind: str, gen: torch.Generator, theta: float = ROPE_BASE):
    sizes = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH,
                 num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                 vocab_size=VOCAB, rms_norm_eps=RMS_EPS, attention_bias=False,
                 attn_implementation="eager")
    if kind == "llama":
        cfg = transformers.LlamaConfig(**sizes, **rope_kwargs(transformers.LlamaConfig, theta))
        model = transformers.LlamaModel(cfg)
    else:
        cfg = transformers.GemmaConfig(**sizes, hidden_act="gelu_pytorch_tanh",
                                       **rope_kwargs(transformers.GemmaConfig, theta))
        model = transformers.GemmaModel(cfg)
    randomize(model, gen)
    check_rope_base(model, theta)
    return model.eval()


def memvla_decoder(hf_model, gemma: bool, theta: float = ROPE_BASE) -> Decoder:
    extra = dict(act="gelu_tanh", norm_unit_offset=True) if gemma else {}
    cfg = DecoderConfig(width=WIDTH, depth=DEPTH, heads=HEADS, kv_heads=KV_HEADS,
                        head_dim=HEAD_DIM, mlp_dim=MLP, vocab_size=VOCAB, rms_eps=RMS_EPS,
                        rope_base=theta, **extra)
    model = Decoder(cfg)
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model.eval()


def causal_inputs(pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """memvla's positions (B, N) and causal mask (B, N, N) for right-padded rows."""
    flags = torch.ones_like(pad, dtype=torch.long)  # (B, N) every token its own block
    return positions_from_pad(pad), block_mask(flags, pad)


# -- decoders ---------------------------------------------------------------------------------
@torch.no_grad()
def test_llama_decoder_matches_hf():
    gen = torch.Generator().manual_seed(1)
    hf = hf_decoder("llama", gen)
    ours = memvla_decoder(hf, gemma=False)
    ids = torch.randint(0, VOCAB, (2, 11), generator=gen)  # (B, N)
    pad = torch.ones_like(ids, dtype=torch.bool)  # (B, N)
    pos, mask = causal_inputs(pad)
    assert torch.equal(pos, torch.arange(11).expand(2, 11))
    want = hf(input_ids=ids).last_hidden_state  # (B, N, D)
    got = ours(ours.embed(ids), pos, mask)  # (B, N, D)
    assert max_diff(got, want) <= TOL
    # the comparison has teeth: a non-causal mask changes the result
    full = torch.ones_like(mask)
    assert max_diff(ours(ours.embed(ids), pos, full), want) > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_llama_decoder_padding_matches_hf(side):
    """Padded batches: only the real tokens are compared. With right padding a causal mask
    alone hides the padding from real tokens; left padding checks that memvla's padding
    mask (and positions that padding does not advance) do it too."""
    gen = torch.Generator().manual_seed(2)
    hf = hf_decoder("llama", gen)
    ours = memvla_decoder(hf, gemma=False)
    lengths = torch.tensor([13, 8, 5])
    n = int(lengths.max())
    ids = torch.randint(0, VOCAB, (3, n), generator=gen)  # (B, N)
    idx = torch.arange(n)[None]  # (1, N)
    pad = idx < lengths[:, None] if side == "right" else idx >= n - lengths[:, None]  # (B, N)
    pos, mask = causal_inputs(pad)  # (B, N), (B, N, N)
    hf_pos = pos.clamp(min=0)  # (B, N) HF counts from 0 at the first real token too
    want = hf(input_ids=ids, attention_mask=pad.long(),
              position_ids=hf_pos).last_hidden_state  # (B, N, D)
    got = ours(ours.embed(ids), pos, mask)  # (B, N, D)
    assert max_diff(got[pad], want[pad]) <= TOL
    # each padded row equals its real tokens run alone, unpadded
    for b in range(3):
        alone = hf(input_ids=ids[b:b + 1, pad[b]]).last_hidden_state  # (1, n_b, D)
        assert max_diff(got[b][pad[b]][None], alone) <= TOL


@torch.no_grad()
def test_llama_decoder_kv_cache_matches_hf():
    """Prefill part of the sequence into memvla's KVCache, then run the rest against it."""
    gen = torch.Generator().manual_seed(3)
    hf = hf_decoder("llama", gen)
    ours = memvla_decoder(hf, gemma=False)
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)  # (B, N)
    want = hf(input_ids=ids).last_hidden_state  # (B, N, D)
    cache = KVCache(DEPTH)
    pad = torch.ones_like(ids, dtype=torch.bool)  # (B, N)
    pos, mask = causal_inputs(pad)  # (B, N), (B, N, N)
    cut = 7
    first = ours(ours.embed(ids[:, :cut]), pos[:, :cut], mask[:, :cut, :cut], cache)
    rest = ours(ours.embed(ids[:, cut:]), pos[:, cut:], mask[:, cut:], cache)  # (B, N-c, D)
    assert cache.keys[0].shape[2] == 12
    assert max_diff(torch.cat([first, rest], 1), want) <= TOL


@torch.no_grad()
def test_gemma_decoder_matches_hf():
    """Gemma: GeGLU (tanh GELU), RMSNorm scaled by ``1 + weight``, embeddings × sqrt(D).

    memvla's ``Decoder.embed`` returns unscaled embeddings; the sqrt(width) factor is applied
    by the model (``FlowVLAConfig.scale_text_embeddings``). Hugging Face applies it inside
    ``embed_tokens`` (transformers 5: ``GemmaTextScaledWordEmbedding``, so ``inputs_embeds``
    are used as given) or inside ``GemmaModel.forward`` to whatever embeddings it gets
    (transformers 4.x). The fair comparison feeds both models the same token ids' scaled
    embeddings: memvla ``embed(ids) * sqrt(D)``, Hugging Face the embeddings that its own
    ``input_ids`` path would produce before the first layer.
    """
    gen = torch.Generator().manual_seed(4)
    hf = hf_decoder("gemma", gen)
    ours = memvla_decoder(hf, gemma=True)
    ids = torch.randint(0, VOCAB, (2, 10), generator=gen)  # (B, N)
    pad = torch.ones_like(ids, dtype=torch.bool)  # (B, N)
    pos, mask = causal_inputs(pad)
    scaled = ours.embed(ids) * math.sqrt(WIDTH)  # (B, N, D)
    scales_in_embedding = hasattr(hf.embed_tokens, "embed_scale")
    hf_embeds = hf.embed_tokens(ids)  # (B, N, D) scaled by v5, raw by 4.x
    if scales_in_embedding:
        assert max_diff(hf_embeds, scaled) <= TOL
    want_embeds = hf(inputs_embeds=hf_embeds).last_hidden_state  # (B, N, D)
    want_ids = hf(input_ids=ids).last_hidden_state  # (B, N, D)
    assert max_diff(want_embeds, want_ids) <= TOL  # both HF paths agree
    got = ours(scaled, pos, mask)  # (B, N, D)
    assert max_diff(got, want_ids) <= TOL
    # without the sqrt(D) factor the outputs differ (the factor is not a no-op here)
    assert max_diff(ours(ours.embed(ids), pos, mask), want_ids) > 1e-2


# -- vision -----------------------------------------------------------------------------------
@torch.no_grad()
def test_siglip_vision_matches_hf():
    gen = torch.Generator().manual_seed(5)
    cfg = transformers.SiglipVisionConfig(hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=128,
                                          image_size=32, patch_size=8, vision_use_head=False,
                                          attn_implementation="eager")
    hf = transformers.SiglipVisionModel(cfg)
    randomize(hf, gen)
    hf.eval()
    assert cfg.hidden_act == "gelu_pytorch_tanh"
    ours = VisionTransformer(width=64, depth=2, heads=4, mlp_dim=128, image_size=32,
                             patch_size=8, eps=cfg.layer_norm_eps, act="gelu_tanh")
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    state.pop("embeddings.position_ids", None)  # a buffer of index constants (HF 4.x)
    ours.load_state_dict(state, strict=True)
    images = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1  # (B, C, H, W) in [-1, 1]
    out = hf(pixel_values=images)
    want = out.last_hidden_state  # (B, P, D)
    got = ours(images)  # (B, P, D)
    assert got.shape == (3, 16, 64)
    assert max_diff(got, want) <= TOL
    # HF's last_hidden_state is post-layernormed, like memvla's output
    hidden = hf(pixel_values=images, output_hidden_states=True).hidden_states[-1]  # (B, P, D)
    assert max_diff(hf.post_layernorm(hidden), want) <= TOL


# -- connector --------------------------------------------------------------------------------
def smolvlm_connector(vision_dim: int, text_dim: int, scale: int):
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    cfg = transformers.SmolVLMConfig(
        vision_config={"hidden_size": vision_dim, "num_attention_heads": 4},
        text_config={"hidden_size": text_dim, "num_attention_heads": 4,
                     "num_key_value_heads": 4},
        scale_factor=scale)
    return SmolVLMConnector(cfg).eval()


@pytest.mark.parametrize("side,scale", [(4, 2), (8, 2), (8, 4), (16, 4), (6, 3)])
def test_pixel_shuffle_equals_smolvlm(side, scale):
    hf = smolvlm_connector(8, 16, scale)
    x = torch.randn(2, side * side, 8)  # (B, P, D)
    want = hf.pixel_shuffle(x, scale)  # (B, P/s², D·s²)
    got = pixel_shuffle(x, scale)  # (B, P/s², D·s²)
    assert got.shape == want.shape
    assert torch.equal(got, want)


@torch.no_grad()
@pytest.mark.parametrize("scale", [2, 4])
def test_connector_matches_smolvlm(scale):
    gen = torch.Generator().manual_seed(6)
    hf = smolvlm_connector(32, 48, scale)
    randomize(hf, gen)
    ours = Connector(32, 48, scale=scale, bias=False).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 64, 32, generator=gen)  # (B, P, Dv)
    want = hf(x)  # (B, P/s², Dt)
    got = ours(x)  # (B, P/s², Dt)
    assert got.shape == (2, 64 // scale**2, 48)
    assert max_diff(got, want) <= TOL


# -- rope -------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("theta", [10_000.0, 100_000.0])
def test_rope_matches_hf_llama_with_gaps(theta):
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    cfg = transformers.LlamaConfig(hidden_size=WIDTH, num_attention_heads=HEADS,
                                   head_dim=HEAD_DIM, **rope_kwargs(transformers.LlamaConfig,
                                                                    theta))
    rotary = LlamaRotaryEmbedding(cfg)
    # gaps, repeats of the same position and rows that differ across the batch
    positions = torch.tensor([[0, 1, 2, 5, 9, 10, 57, 300],
                              [3, 3, 4, 40, 41, 99, 100, 1000]])  # (B, N)
    q = torch.randn(2, HEADS, 8, HEAD_DIM)  # (B, Hh, N, Dh)
    k = torch.randn(2, KV_HEADS, 8, HEAD_DIM)  # (B, Hkv, N, Dh)
    hf_cos, hf_sin = rotary(q, positions)  # (B, N, Dh)
    cos, sin = rope_cos_sin(positions, HEAD_DIM, theta)  # (B, N, Dh)
    assert max_diff(cos, hf_cos) <= TOL and max_diff(sin, hf_sin) <= TOL
    want_q, want_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    assert max_diff(apply_rope(q, cos, sin), want_q) <= TOL
    assert max_diff(apply_rope(k, cos, sin), want_k) <= TOL
    # relative property: the score of q·k depends only on the position difference
    shifted_cos, shifted_sin = rope_cos_sin(positions + 17, HEAD_DIM, theta)  # (B, N, Dh)
    scores = apply_rope(q, cos, sin) @ apply_rope(q, cos, sin).transpose(-1, -2)  # (B,H,N,N)
    shifted = (apply_rope(q, shifted_cos, shifted_sin)
               @ apply_rope(q, shifted_cos, shifted_sin).transpose(-1, -2))  # (B, H, N, N)
    assert max_diff(scores, shifted) <= 1e-4 * scores.abs().max().item()



@pytest.mark.parametrize("side", [4, 7])
def test_smolvlm_bucketed_patch_positions(side):
    """transformers 4.x's SmolVLM (what LeRobot 0.4.x runs; the LeRobot comparison in
    test_import_lerobot checks it end to end) buckets i / n · (1 − 1e-6) against 1/n, 2/n,
    ...: rows and columns 0, 0, 1, ..., n − 2. With ``position_buckets`` the embeddings add
    those rows of the table; without, the plain 0 .. P − 1."""
    from memvla.layers.vision import VisionEmbeddings, bucketed_positions

    ids = bucketed_positions(side).view(side, side)
    line = [0, 0, *range(1, side - 1)]
    assert (ids // side)[:, 0].tolist() == line and (ids % side)[0].tolist() == line
    emb = VisionEmbeddings(16, side * 4, 4, position_buckets=True)
    plain = VisionEmbeddings(16, side * 4, 4)
    plain.load_state_dict(emb.state_dict())
    x = torch.randn(2, 3, side * 4, side * 4)
    table = emb.position_embedding.weight
    assert torch.allclose(emb(x) - plain(x), (table[ids.flatten()] - table)[None], atol=1e-6)
