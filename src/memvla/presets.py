"""Named presets: one registry, a did-you-mean error for unknown names.

- ``tiny``: a few hundred thousand parameters; trains on a 2-core CPU in minutes on the
  built-in 64×64 tasks.
- ``smolvla-450m``: SmolVLA's shapes (SmolVLM2-500M with 16 of its 32 text layers, SigLIP
  at 512 px with 64 tokens per image after pixel shuffle, expert at 0.75 width).
- ``pi0-3b``: π0's shapes (PaliGemma: SigLIP So400m/14 at 224 px, Gemma 2B; Gemma 300M
  action expert; joint attention in every layer, the state token in the suffix).
- ``pi05-3b``: π0.5's shapes: π0's, with the state discretised into the prompt and the
  flow time conditioning the expert's norms (adaptive RMSNorm).
- ``tiny-oft``: the parallel-decoding VLA (OpenVLA-OFT family) at the size of ``tiny``;
  64 patch tokens per 64×64 image (patch 8, no pixel shuffle: room for the pruner).
- ``tiny-mamba``: ``tiny`` with a Mamba backbone carrying the episode in its state.
- ``robomamba-2.8b``: RoboMamba's shapes (CLIP ViT-L/14 at 224 px + Mamba-2.8B).
- ``tiny-oft-text``: ``tiny-oft`` with actions as text tokens (StreamVLN's ↑ ← → STOP):
  4 discrete actions, 4 future steps per turn (for memory-maze).
- ``openvla-oft-7b``: OpenVLA-OFT's names and shapes (Llama-2 7B; the fused DINOv2 ViT-L/14 +
  SigLIP So400m/14 tower at 224 px, 256 patches per image; a 3-layer GELU projector;
  two cameras as on LIBERO, proprio 8 → one token, chunk 8 × 7-dim actions, an MLP-ResNet
  head of width 4096 with 2 blocks).

Big presets build on the meta device for parameter counts (``build_policy(name,
device="meta")``) and at reduced depth (an override ``model.text.depth=2`` and
``model.expert.depth=2``; the parallel family has no expert) for CPU benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .config_utils import apply_overrides
from .configs import (
    ContextConfig,
    DecoderConfig,
    FlowVLAConfig,
    MambaOptions,
    ParallelVLAConfig,
    PolicyConfig,
    TokenizerConfig,
    VisionConfig,
)
from .data.tokenizers import WordTokenizer
from .utils import did_you_mean

PRESETS: dict[str, Callable[[], PolicyConfig]] = {}


def register(name: str):
    def deco(fn: Callable[[], PolicyConfig]):
        PRESETS[name] = fn
        return fn

    return deco


def get_preset(name: str, overrides: list[str] | None = None) -> PolicyConfig:
    """The preset's config, with optional dotted overrides (``model.chunk_size=8``)."""
    if name not in PRESETS:
        raise ValueError(did_you_mean(name, PRESETS, what="preset"))
    cfg = PRESETS[name]()
    return apply_overrides(cfg, overrides) if overrides else cfg


def smolvla_expert_mlp_dim(width: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """SmolVLA's expert MLP width: 4·(2/3)·width rounded up to a multiple of 256."""
    hidden = int(multiplier * int(2 * width / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


WORD_VOCAB = WordTokenizer().vocab_size  # the built-in word/byte tokenizer


@register("tiny")
def tiny() -> PolicyConfig:
    text = DecoderConfig(width=64, depth=4, heads=4, kv_heads=2, head_dim=16, mlp_dim=128,
                         vocab_size=WORD_VOCAB)
    expert = DecoderConfig(width=48, depth=4, heads=4, kv_heads=2, head_dim=16, mlp_dim=128)
    vision = VisionConfig(width=64, depth=2, heads=4, mlp_dim=128, image_size=64, patch_size=8)
    model = FlowVLAConfig(vision=vision, text=text, expert=expert, connector_scale=2,
                          chunk_size=8, max_state_dim=8, max_action_dim=8, num_steps=10)
    return PolicyConfig(model=model, cameras=["top"], image_shape=(3, 64, 64), state_dim=3,
                        action_dim=3, n_action_steps=8,
                        tokenizer=TokenizerConfig(kind="words", max_length=24))


@register("tiny-mamba")
def tiny_mamba() -> PolicyConfig:
    """``tiny`` with a Mamba backbone (4 blocks of width 64, state 16) carrying the episode
    in its recurrent state (``context.kind=ssm_state``)."""
    cfg = tiny()
    model = replace(cfg.model, backbone="mamba", mamba=MambaOptions(d_state=16, d_conv=4,
                                                                    expand=2))
    return replace(cfg, model=model, context=ContextConfig(kind="ssm_state"))


@register("robomamba-2.8b")
def robomamba_2_8b() -> PolicyConfig:
    # RoboMamba: CLIP ViT-L/14 at 224 px (256 patches, a linear projector) + Mamba-2.8B
    # (64 blocks of width 2560, state 16, vocabulary 50280); a narrow action expert reads
    # one key/value head of 64 per block
    vision = VisionConfig(width=1024, depth=24, heads=16, mlp_dim=4096, image_size=224,
                          patch_size=14, eps=1e-5, act="gelu")
    text = DecoderConfig(width=2560, depth=64, heads=1, kv_heads=1, head_dim=64, mlp_dim=1,
                         vocab_size=50280, rms_eps=1e-5)
    expert = DecoderConfig(width=128, depth=64, heads=2, kv_heads=1, head_dim=64, mlp_dim=512)
    model = FlowVLAConfig(vision=vision, text=text, expert=expert, connector_scale=1,
                          connector_bias=True, chunk_size=8, max_state_dim=8,
                          max_action_dim=8, backbone="mamba",
                          mamba=MambaOptions(d_state=16, d_conv=4, expand=2))
    return PolicyConfig(model=model, cameras=["top"], image_shape=(3, 224, 224), state_dim=7,
                        action_dim=7, n_action_steps=8,
                        context=ContextConfig(kind="ssm_state"),
                        tokenizer=TokenizerConfig(kind="words", max_length=48))


@register("smolvla-450m")
def smolvla_450m() -> PolicyConfig:
    # SmolVLM2-500M: SigLIP-B/16 at 512 px; SmolLM2-360M text tower (32 layers, 16 kept)
    vision = VisionConfig(width=768, depth=12, heads=12, mlp_dim=3072, image_size=512,
                          patch_size=16)
    text = DecoderConfig(width=960, depth=16, heads=15, kv_heads=5, head_dim=64, mlp_dim=2560,
                         vocab_size=49280, rms_eps=1e-5, rope_base=10_000.0, lm_head=True)
    ew = int(960 * 0.75)
    expert = DecoderConfig(width=ew, depth=16, heads=15, kv_heads=5, head_dim=64,
                           mlp_dim=smolvla_expert_mlp_dim(ew), rms_eps=1e-5)
    model = FlowVLAConfig(vision=vision, text=text, expert=expert, connector_scale=4,
                          self_attn_every_n_layers=2, chunk_size=50, max_state_dim=32,
                          max_action_dim=32, state_token="prefix", causal_actions=True)
    return PolicyConfig(model=model, cameras=["top"], image_shape=(3, 512, 512), state_dim=6,
                        action_dim=6, n_action_steps=50,
                        tokenizer=TokenizerConfig(kind="words", max_length=48))


@register("pi0-3b")
def pi0_3b() -> PolicyConfig:
    # PaliGemma 3B: SigLIP So400m/14 at 224 px + Gemma 2B; Gemma 300M action expert
    vision = VisionConfig(width=1152, depth=27, heads=16, mlp_dim=4304, image_size=224,
                          patch_size=14)
    gemma = dict(heads=8, kv_heads=1, head_dim=256, rms_eps=1e-6, act="gelu_tanh",
                 norm_unit_offset=True)
    text = DecoderConfig(width=2048, depth=18, mlp_dim=16384, vocab_size=257152, **gemma)
    expert = DecoderConfig(width=1024, depth=18, mlp_dim=4096, **gemma)
    model = FlowVLAConfig(vision=vision, text=text, expert=expert, connector_scale=1,
                          connector_bias=True, self_attn_every_n_layers=1, chunk_size=50,
                          max_state_dim=32, max_action_dim=32, state_token="suffix",
                          causal_actions=False, scale_image_embeddings=False)
    return PolicyConfig(model=model, cameras=["base_0_rgb", "left_wrist_0_rgb",
                                              "right_wrist_0_rgb"],
                        image_shape=(3, 224, 224), state_dim=14, action_dim=14,
                        n_action_steps=50,
                        tokenizer=TokenizerConfig(kind="words", max_length=48))


@register("pi05-3b")
def pi05_3b() -> PolicyConfig:
    """π0.5: π0's PaliGemma and Gemma 300M expert; the state discretised into 256 bins in
    the prompt (no state token), the flow time through an MLP that conditions every expert
    norm (adaptive RMSNorm with gated residuals), 200 prompt tokens."""
    cfg = pi0_3b()
    expert = replace(cfg.model.expert, cond_dim=cfg.model.expert.width)
    model = replace(cfg.model, expert=expert, state_token="prompt",
                    time_conditioning="adarms")
    # the bins cover [-1, 1]: min-max normalisation puts the state there (LeRobot's π0.5
    # uses quantiles, which memvla does not have)
    return replace(cfg, model=model, tokenizer=TokenizerConfig(kind="words", max_length=200),
                   normalization={"observation.state": "min_max", "action": "mean_std"})


@register("tiny-oft")
def tiny_oft() -> PolicyConfig:
    text = DecoderConfig(width=64, depth=4, heads=4, kv_heads=2, head_dim=16, mlp_dim=128,
                         vocab_size=WORD_VOCAB)
    vision = VisionConfig(width=64, depth=2, heads=4, mlp_dim=128, image_size=64, patch_size=8)
    # squared error: with L1 the built-in tasks' mostly-still data gives the median chunk
    # ("do not move"), 0% on the remember-color twin against 100% (memvla bench pruning)
    model = ParallelVLAConfig(vision=vision, text=text, projector_layers=2, chunk_size=8,
                              max_state_dim=8, max_action_dim=4, head_hidden=64, head_blocks=2,
                              stop_token_id=WordTokenizer.eos_id, regression_loss="mse")
    return PolicyConfig(family="parallel", model=model, cameras=["top"],
                        image_shape=(3, 64, 64), state_dim=3, action_dim=3, n_action_steps=8,
                        tokenizer=TokenizerConfig(kind="words", max_length=24))


@register("tiny-oft-text")
def tiny_oft_text() -> PolicyConfig:
    """``tiny-oft`` with StreamVLN's actions as text tokens: 4 discrete actions (↑ ← → STOP,
    one-hot; memory-maze's) as the last 4 ids of the vocabulary, 4 future steps per turn."""
    cfg = tiny_oft()
    text = replace(cfg.model.text, vocab_size=WORD_VOCAB + 4, lm_head=True)
    model = replace(cfg.model, text=text, action_head="text", text_actions=4, chunk_size=4,
                    max_action_dim=4)
    return replace(cfg, model=model, action_dim=4, n_action_steps=4)


@register("openvla-oft-7b")
def openvla_oft_7b() -> PolicyConfig:
    """OpenVLA-OFT on LIBERO as published: the DINOv2 ViT-L/14 (4 registers) and SigLIP
    So400m/14 towers in timm's layout, read at their second-to-last block, fused, at 224 px;
    Llama-2 7B (vocabulary padded to 32064); 8 × 7 actions, 8-d proprio, two cameras;
    BOUNDS_Q99 normalisation and the released inference's read of the head."""
    dino = VisionConfig(width=1024, depth=24, heads=16, mlp_dim=4096, image_size=224,
                        patch_size=14, act="gelu", layout="timm", class_token=True,
                        reg_tokens=4, layer_scale=True, feature_layer=1,
                        pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225))
    siglip = VisionConfig(width=1152, depth=27, heads=16, mlp_dim=4304, image_size=224,
                          patch_size=14, act="gelu", layout="timm", attn_pool=True,
                          feature_layer=1)
    llama2_7b = DecoderConfig(width=4096, depth=32, heads=32, kv_heads=32, head_dim=128,
                              mlp_dim=11008, vocab_size=32064, rms_eps=1e-5, lm_head=True)
    model = ParallelVLAConfig(vision=dino, vision_fused=siglip, text=llama2_7b,
                              projector_layers=3, chunk_size=8, max_state_dim=8,
                              max_action_dim=7, head_hidden=4096, head_blocks=2,
                              stop_token_id=2, action_offset=1)
    return PolicyConfig(family="parallel", model=model, cameras=["image", "wrist_image"],
                        image_shape=(3, 224, 224), state_dim=8, action_dim=7, n_action_steps=8,
                        tokenizer=TokenizerConfig(kind="words", max_length=48),
                        normalization={"observation.state": "q01_q99", "action": "q01_q99"})


def count_parameters(cfg: PolicyConfig) -> int:
    """Parameters of the config's model with its temporal context (memory tokens, ...),
    built on the meta device (no memory used) by the policy class that would run it."""
    import torch

    from .policies import FAMILY_POLICIES

    with torch.device("meta"):
        model = FAMILY_POLICIES[cfg.family].build_model(cfg)
    return sum(p.numel() for p in model.parameters())
