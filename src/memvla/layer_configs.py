"""The configs of the building blocks every model family shares: the vision tower, the
decoder, the token pruner (and the check that cuts a tower for the pruner). Re-exported
by :mod:`memvla.configs`."""

from __future__ import annotations

from dataclasses import dataclass

from .config_utils import _positive, _require
from .layers.mlp import ACTIVATIONS

VISION_LAYOUTS = ("siglip", "timm")


@dataclass
class VisionConfig:
    """A ViT vision tower. ``layout``: ``siglip`` (Hugging Face SigLIP's module names and
    design, :mod:`memvla.layers.vision`) or ``timm`` (timm's ``VisionTransformer`` names, as
    OpenVLA stores its DINOv2 and SigLIP towers, :mod:`memvla.layers.vit_timm`). The timm
    layout's options: ``class_token`` and ``reg_tokens`` (prefix tokens, DINOv2-reg),
    ``layer_scale`` (``ls1``/``ls2.scale_factor``), ``attn_pool`` (SigLIP's attention-pool
    head: stored, never read by a VLA). ``feature_layer``: whose output the tower gives,
    counted from the last block: 0 = the last block then the final norm, 1 = the
    second-to-last block without the norm (OpenVLA's). ``pixel_mean``/``pixel_std``: the
    tower's own input normalisation of [0, 1] pixels (None: SigLIP's 0.5 / 0.5, i.e. the
    [-1, 1] images the policy prepares)."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 512
    patch_size: int = 16
    channels: int = 3
    eps: float = 1e-6
    act: str = "gelu_tanh"
    # SmolVLM's patch positions: coordinates bucketed so that an n×n grid gets rows and
    # columns 0, 0, 1, ..., n − 2 (what transformers' SmolVLM and so SmolVLA compute)
    position_buckets: bool = False
    layout: str = "siglip"
    class_token: bool = False
    reg_tokens: int = 0
    layer_scale: bool = False
    attn_pool: bool = False
    feature_layer: int = 0
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    # at inference, patches that changed by at most reuse_threshold (any pixel, images in
    # [-1, 1]) since the previous chunk's frame keep their tower states; the changed ones
    # are computed against the cached keys (memvla.layers.vision_reuse)
    reuse: bool = False
    reuse_threshold: float = 0.05

    def __post_init__(self):
        _require(self.reuse_threshold >= 0, f"vision.reuse_threshold must be >= 0 (a pixel "
                 f"change in [-1, 1] units), got {self.reuse_threshold}")
        _require(self.layout in VISION_LAYOUTS, f"vision.layout must be one of "
                 f"{VISION_LAYOUTS}, got {self.layout!r}")
        if self.layout == "siglip":
            extra = {k: getattr(self, k) for k in ("class_token", "reg_tokens", "layer_scale",
                                                    "attn_pool", "feature_layer")
                     if getattr(self, k)}
            _require(not extra, f"vision.layout='siglip' has none of the timm layout's "
                     f"options; got {extra} (set vision.layout='timm')")
        _require(0 <= self.feature_layer < self.depth, f"vision.feature_layer must be in "
                 f"[0, vision.depth={self.depth}), got {self.feature_layer}")
        _require(self.reg_tokens >= 0, f"vision.reg_tokens must be >= 0, got {self.reg_tokens}")
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            _require(value is None or len(value) == self.channels, f"vision.{name} must have "
                     f"one value per channel ({self.channels}), got {value}")
        _require((self.pixel_mean is None) == (self.pixel_std is None),
                 "vision.pixel_mean and vision.pixel_std are given together (or neither)")
        _positive("vision", width=self.width, depth=self.depth, heads=self.heads,
                  mlp_dim=self.mlp_dim, image_size=self.image_size, patch_size=self.patch_size)
        _require(self.width % self.heads == 0,
                 f"vision.width ({self.width}) must be a multiple of vision.heads ({self.heads})")
        _require(self.image_size % self.patch_size == 0,
                 f"vision.image_size ({self.image_size}) must be a multiple of "
                 f"vision.patch_size ({self.patch_size})")
        _require(self.act in ACTIVATIONS, f"vision.act must be one of {sorted(ACTIVATIONS)}, "
                 f"got {self.act!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class DecoderConfig:
    """Llama / SmolLM2 / Gemma decoder stack. ``vocab_size = 0``: no token embeddings."""

    width: int = 960
    depth: int = 16
    heads: int = 15
    kv_heads: int = 5
    head_dim: int = 64
    mlp_dim: int = 2560
    vocab_size: int = 0
    rms_eps: float = 1e-5
    rope_base: float = 10_000.0
    act: str = "silu"
    norm_unit_offset: bool = False  # Gemma: scale by 1 + weight
    lm_head: bool = False  # keep an (untied) output head, for checkpoint compatibility
    # > 0: adaptive RMSNorms conditioned on a (B, cond_dim) vector, with gated residuals
    # (π0.5's action expert, conditioned on the flow time); 0: plain norms
    cond_dim: int = 0

    def __post_init__(self):
        _require(self.cond_dim >= 0, f"decoder.cond_dim must be >= 0, got {self.cond_dim}")
        _positive("decoder", width=self.width, depth=self.depth, heads=self.heads,
                  kv_heads=self.kv_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim)
        _require(self.heads % self.kv_heads == 0,
                 f"decoder.heads ({self.heads}) must be a multiple of kv_heads "
                 f"({self.kv_heads})")
        _require(self.head_dim % 2 == 0, f"decoder.head_dim must be even for RoPE, got "
                 f"{self.head_dim}")
        _require(self.vocab_size >= 0, f"decoder.vocab_size must be >= 0, got {self.vocab_size}")
        _require(self.act in ACTIVATIONS, f"decoder.act must be one of {sorted(ACTIVATIONS)}, "
                 f"got {self.act!r}")
        _require(not (self.lm_head and not self.vocab_size),
                 "decoder.lm_head needs vocab_size > 0")


PRUNER_NOISES = ("uniform", "gumbel")
PRUNER_QUERIES = ("lightvla", "residual")
PRUNER_DUPLICATES = ("drop", "keep")
PRUNER_GRADIENTS = ("straight_through", "none")
PRUNER_ACTION_CONTEXTS = ("none", "placeholders", "keys", "prev_chunk", "state")


def _check_tower_layer(pruner, towers: list[VisionConfig]) -> None:
    """``pruner.tower_layer`` cuts every tower the model reads at the same block: below the
    blocks the shallowest one's features read, and not with ``vision.reuse``."""
    k = pruner.tower_layer
    if k is None:
        return
    depth = min(v.depth - v.feature_layer for v in towers)
    _require(k < depth, f"model.pruner.tower_layer must be below the {depth} blocks the vision "
             f"tower's features read (model.vision.depth - feature_layer; the pruner votes "
             f"after that many blocks; None = after the tower), got {k}")
    _require(not any(v.reuse for v in towers), "model.pruner.tower_layer drops patches "
             "inside the vision tower, whose states model.vision.reuse caches for every "
             "patch: set one of them (model.vision.reuse=false or "
             "model.pruner.tower_layer=null)")


@dataclass
class PrunerConfig:
    """LightVLA's adaptive visual-token pruner (:mod:`memvla.layers.token_pruner`).

    ``num_patches``: visual tokens per sample the pruner expects (all cameras together);
    0 with ``enabled`` = derived from the model (cameras × tokens per image).
    ``noise``: training noise added to the scores, ``rand · scale`` ("uniform", the
    released code) or Gumbel ("gumbel", the paper's wording); the scale decays linearly
    from ``noise_scale`` to 0 over training (the trainer drives it).
    ``query``: "lightvla" = attention of the patches over the task tokens (collapses with a
    short prompt); "residual" = that plus ``residual_scale / √D`` × the patch itself (keeps
    some of each patch's identity; a larger scale keeps more patches, see the module).
    ``center``: score the patches less their mean over the image(s) (the component training
    makes them share, which otherwise collapses the votes; false = as released).
    ``duplicates``: in training, the slots of patches voted for more than once are "drop"ped
    (masked: training attends what inference keeps) or "keep"ped (as released: a patch
    voted for n times fills n slots, which inference does not see).
    ``gradient``: "straight_through" (the softmax's gradient reaches the scores, so the
    patch and task embeddings) or "none" (the hard selection alone: the scores get none).
    ``temperature`` divides the scores; ``min_keep`` / ``max_keep`` keep at least / at
    most that many patches at inference (most-voted first; 0 = no bound; both equal = a
    fixed count, e.g. for timing). Training keeps the length; with ``duplicates="drop"``
    ``max_keep`` also masks the winners beyond the cap there (so a policy can be trained
    to a budget), ``min_keep`` acts at inference only.
    ``action_context`` (flow-matching family only): what the pruner sees of the action:
    nothing, noisy-action placeholders in the prefix (option A) or the same features as
    extra keys only (option B) — both read the initial noise (x at t = 1), in training as
    at inference, where the prefix precedes denoising — the previously executed chunk
    (in training: the dataset's actions before the frame, or the previous segment's), or
    the state.
    ``tower_layer``: None = vote on the vision tower's output tokens (as LightVLA); k =
    vote after the tower's first k layers (each tower's, for the parallel family's fused
    pair; on the connector's tokens of those features: :mod:`memvla.layers.vision_drop`),
    so the tower's other layers run on the kept patches only (k = 0: on the patch
    embeddings, before any layer).
    """

    enabled: bool = False
    num_patches: int = 0
    noise: str = "uniform"
    noise_scale: float = 1.0
    query: str = "lightvla"
    residual_scale: float = 1.0
    center: bool = True
    duplicates: str = "drop"
    gradient: str = "straight_through"
    temperature: float = 1.0
    min_keep: int = 0
    max_keep: int = 0
    action_context: str = "none"
    tower_layer: int | None = None

    def __post_init__(self):
        _require(self.tower_layer is None or (isinstance(self.tower_layer, int)
                                              and self.tower_layer >= 0),
                 f"pruner.tower_layer must be None (vote after the vision tower) or a layer "
                 f"count >= 0, got {self.tower_layer!r}")
        _require(self.num_patches >= 0, f"pruner.num_patches must be >= 0, got "
                 f"{self.num_patches}")
        _require(self.noise in PRUNER_NOISES, f"pruner.noise must be one of {PRUNER_NOISES}, "
                 f"got {self.noise!r}")
        _require(self.noise_scale >= 0, f"pruner.noise_scale must be >= 0, got "
                 f"{self.noise_scale}")
        _require(self.query in PRUNER_QUERIES, f"pruner.query must be one of {PRUNER_QUERIES}, "
                 f"got {self.query!r}")
        _require(self.gradient in PRUNER_GRADIENTS, f"pruner.gradient must be one of "
                 f"{PRUNER_GRADIENTS}, got {self.gradient!r}")
        _require(self.duplicates in PRUNER_DUPLICATES, f"pruner.duplicates must be one of "
                 f"{PRUNER_DUPLICATES}, got {self.duplicates!r}")
        _positive("pruner", temperature=self.temperature, residual_scale=self.residual_scale)
        _require(self.min_keep >= 0, f"pruner.min_keep must be >= 0, got {self.min_keep}")
        _require(self.max_keep == 0 or self.max_keep >= max(self.min_keep, 1),
                 f"pruner.max_keep must be 0 (no cap) or >= max(pruner.min_keep, 1) = "
                 f"{max(self.min_keep, 1)}, got {self.max_keep}")
        _require(self.action_context in PRUNER_ACTION_CONTEXTS, f"pruner.action_context must "
                 f"be one of {PRUNER_ACTION_CONTEXTS}, got {self.action_context!r}")
