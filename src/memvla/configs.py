"""Typed configuration dataclasses, validated in ``__post_init__``.

Nested configs serialise to JSON with :func:`memvla.config_utils.to_dict` and come back with
:func:`memvla.config_utils.from_dict`; the command line edits them with dotted overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config_utils import _positive, _require
from .context_config import (  # noqa: F401 (re-exported)
    CONTEXT_KINDS,
    CONTEXT_OPTIONS,
    FRAMES_MODES,
    MEMORY_LAYOUTS,
    MEMORY_WRITES,
    POOL_MODES,
    WINDOWS,
    ContextConfig,
)
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


# prefix: a token after the language (SmolVLA); suffix: before the actions (π0); prompt:
# no token, the state discretised into 256 bins and written into the prompt (π0.5)
STATE_TOKEN_PLACES = ("prefix", "suffix", "prompt")
# how the expert learns the flow time: concat (an MLP over [action; time], SmolVLA / π0) or
# adarms (an MLP of the time conditions every expert norm, π0.5)
TIME_CONDITIONINGS = ("concat", "adarms")
BACKBONES = ("transformer", "mamba")
KERNEL_CHOICES = ("auto", "pure", "cuda")


@dataclass
class MambaOptions:
    """The selective-SSM settings of a Mamba backbone (``model.backbone=mamba``; its width,
    depth and vocabulary are ``model.text``'s): state size per channel, causal convolution
    width, inner expansion, time-step rank ("auto" = ceil(width / 16)) and the kernels
    ("auto": mamba_ssm's CUDA kernels when installed and on a GPU, "pure", "cuda")."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    kernels: str = "auto"

    def __post_init__(self):
        _positive("model.mamba", d_state=self.d_state, d_conv=self.d_conv, expand=self.expand)
        _require(self.dt_rank == "auto" or (isinstance(self.dt_rank, int) and self.dt_rank > 0),
                 f"model.mamba.dt_rank must be 'auto' or an int > 0, got {self.dt_rank!r}")
        _require(self.kernels in KERNEL_CHOICES, f"model.mamba.kernels must be one of "
                 f"{KERNEL_CHOICES}, got {self.kernels!r}")


@dataclass
class FlowVLAConfig:
    """The flow-matching VLA (SmolVLA / π0 family): a VLM over the prefix (images,
    language, state) and a narrower action expert over the suffix (the action chunk).
    ``pruner``: LightVLA's token pruner over the image tokens of every camera, with the
    language tokens (and ``pruner.action_context``) as its task keys. ``backbone``:
    ``transformer`` (``text`` is the decoder) or ``mamba`` (RoboMamba: ``text.depth`` Mamba
    blocks of ``text.width`` with ``mamba``'s settings; the expert reads keys/values
    projected from each block's output, in ``text``'s ``kv_heads × head_dim``)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: DecoderConfig = field(default_factory=DecoderConfig)  # the kept backbone layers
    expert: DecoderConfig = field(default_factory=DecoderConfig)  # vocab_size 0
    connector_scale: int = 4  # pixel-shuffle factor (1 = a plain linear projector)
    connector_bias: bool = False
    # Every n-th expert layer (i % n == 0) attends jointly over [prefix; suffix]; the others
    # cross-attend to the prefix only, through their own k/v projections of the backbone's
    # keys/values. n = 1: joint attention everywhere (π0); n = 2: SmolVLA.
    self_attn_every_n_layers: int = 2
    chunk_size: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    state_token: str = "prefix"  # "prefix" (SmolVLA), "suffix" (π0) or "prompt" (π0.5)
    time_conditioning: str = "concat"  # "concat" (SmolVLA, π0) or "adarms" (π0.5)
    causal_actions: bool = True  # action tokens attend causally (SmolVLA) or jointly (π0)
    scale_image_embeddings: bool = True  # multiply image tokens by sqrt(width)
    scale_text_embeddings: bool = True  # multiply language tokens by sqrt(width)
    num_steps: int = 10  # Euler steps at inference
    time_alpha: float = 1.5
    time_beta: float = 1.0
    time_min: float = 0.001
    time_min_period: float = 4e-3
    time_max_period: float = 4.0
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    backbone: str = "transformer"
    mamba: MambaOptions = field(default_factory=MambaOptions)

    def __post_init__(self):
        _require(self.backbone in BACKBONES, f"model.backbone must be one of {BACKBONES}, got "
                 f"{self.backbone!r}")
        _require(self.vision.layout == "siglip", f"model.vision.layout: the flow-matching "
                 f"family's tower is SigLIP's (layout 'siglip'), got {self.vision.layout!r}")
        _require(self.backbone == "transformer" or not self.pruner.enabled,
                 "model.pruner.enabled: the token pruner drops prefix tokens of a "
                 "transformer; with model.backbone='mamba' set model.pruner.enabled=false")
        _check_tower_layer(self.pruner, [self.vision])
        _positive("model", connector_scale=self.connector_scale,
                  self_attn_every_n_layers=self.self_attn_every_n_layers,
                  chunk_size=self.chunk_size, max_state_dim=self.max_state_dim,
                  max_action_dim=self.max_action_dim, num_steps=self.num_steps,
                  time_alpha=self.time_alpha, time_beta=self.time_beta)
        _require(self.state_token in STATE_TOKEN_PLACES,
                 f"model.state_token must be one of {STATE_TOKEN_PLACES}, got "
                 f"{self.state_token!r}")
        _require(self.time_conditioning in TIME_CONDITIONINGS,
                 f"model.time_conditioning must be one of {TIME_CONDITIONINGS}, got "
                 f"{self.time_conditioning!r}")
        want = self.expert.width if self.time_conditioning == "adarms" else 0
        _require(self.expert.cond_dim == want,
                 f"model.expert.cond_dim must be {want} with model.time_conditioning="
                 f"{self.time_conditioning!r} (adaptive norms conditioned on the time), got "
                 f"{self.expert.cond_dim}")
        _require(self.text.cond_dim == 0, f"model.text.cond_dim must be 0 (only the expert's "
                 f"norms are conditioned), got {self.text.cond_dim}")
        _require(self.text.vocab_size > 0, "model.text.vocab_size must be > 0 (the backbone "
                 "embeds language tokens)")
        _require(self.expert.vocab_size == 0, "model.expert.vocab_size must be 0 (the action "
                 "expert has no token embeddings)")
        _require(self.expert.depth == self.text.depth,
                 f"model.expert.depth ({self.expert.depth}) must equal model.text.depth "
                 f"({self.text.depth}): each expert layer reads the backbone layer beside it")
        _require(self.expert.head_dim == self.text.head_dim,
                 f"model.expert.head_dim ({self.expert.head_dim}) must equal "
                 f"model.text.head_dim ({self.text.head_dim}) for joint attention")
        _require(self.expert.kv_heads == self.text.kv_heads,
                 f"model.expert.kv_heads ({self.expert.kv_heads}) must equal "
                 f"model.text.kv_heads ({self.text.kv_heads}) for joint attention")
        _require(self.vision.grid % self.connector_scale == 0,
                 f"model.connector_scale ({self.connector_scale}) must divide the patch grid "
                 f"side ({self.vision.grid} = image_size / patch_size)")
        _require(0.0 <= self.time_min < 1.0, f"model.time_min must be in [0, 1), got "
                 f"{self.time_min}")

    @property
    def tokens_per_image(self) -> int:
        return (self.vision.grid // self.connector_scale) ** 2

    def is_joint_layer(self, i: int) -> bool:
        return i % self.self_attn_every_n_layers == 0


@dataclass
class ParallelVLAConfig:
    """The parallel-decoding VLA (OpenVLA-OFT family, :mod:`memvla.models.parallel_vla`):
    ``[BOS][patches of every camera][proprio][prompt][placeholders × chunk·action_dim][STOP]``
    through one bidirectional decoder; the hidden states at the placeholders go through an
    MLP-ResNet head that regresses the action chunk (L1).

    ``vision`` is a ViT; ``vision_fused`` an optional second tower over the same image whose
    patch features are concatenated channel-wise (OpenVLA's DINOv2 + SigLIP; it must have
    the same patch grid). ``projector_layers``: 2 = Linear-GELU-Linear (OpenVLA, one
    tower), 3 = the fused projector (hidden 4 × the vision width, GELUs between).
    ``max_action_dim``: the action dimensions the model predicts (OFT's ACTION_DIM);
    there are ``chunk_size × max_action_dim`` placeholders; a policy's action_dim may be
    smaller (the rest is zero-padded and not in the loss). ``head_hidden`` 0 = the decoder
    width. ``bos_token_id``: the id whose embedding opens the sequence (Llama's and the
    built-in tokenizer's BOS is 1; the policy drops the tokenizer's own BOS from the prompt,
    and a tokenizer that adds none loses no token). ``stop_token_id``: the id whose
    embedding closes the sequence (Llama's and the built-in tokenizer's EOS is 2).
    ``pruner``: LightVLA's token pruner after the projector.

    ``action_head``: ``l1`` (OFT: the placeholders and the regression head above) or
    ``text`` (StreamVLN's actions as text tokens, :mod:`memvla.layers.action_tokens`): the
    task's ``text_actions`` discrete actions (one-hot action vectors, action_dim =
    ``text_actions``) are the last ``text_actions`` ids of the vocabulary; ``chunk_size``
    slots (StreamVLN's ``num_future_steps``) after the prompt, causal among themselves,
    each reading the previous step's action token (the first reads ``stop_token_id``), are
    read by the LM head (``text.lm_head`` must be on) with a cross-entropy loss on the
    action tokens only, and decoded greedily over the action tokens.
    ``regression_loss`` (the ``l1`` head): ``l1`` (OFT's) or ``mse``. L1's minimiser is the
    median: on data where most steps hold still (the built-in tasks wait for a cue), the
    median chunk is "do not move" and an L1 head can settle there and never leave it.

    ``action_offset``: 1 reads the head's hidden states one position after the
    placeholders (the last one is STOP's), in training and inference alike. OpenVLA-OFT's
    released code trains its head one position before them and runs it one after; its
    published results come from the latter, which an imported OFT checkpoint reproduces.
    """

    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        width=1152, depth=27, heads=16, mlp_dim=4304, image_size=224, patch_size=14))
    vision_fused: VisionConfig | None = None
    text: DecoderConfig = field(default_factory=lambda: DecoderConfig(
        width=4096, depth=32, heads=32, kv_heads=32, head_dim=128, mlp_dim=11008,
        vocab_size=32000, rms_eps=1e-5, lm_head=True))
    projector_layers: int = 2
    chunk_size: int = 8
    max_state_dim: int = 8
    max_action_dim: int = 7
    head_hidden: int = 0
    head_blocks: int = 2
    use_proprio: bool = True
    bos_token_id: int = 1
    stop_token_id: int = 2
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    action_head: str = "l1"
    regression_loss: str = "l1"
    text_actions: int = 4
    action_offset: int = 0

    def __post_init__(self):
        _require(self.regression_loss in REGRESSION_LOSSES, f"model.regression_loss must be "
                 f"one of {REGRESSION_LOSSES}, got {self.regression_loss!r}")
        _require(self.action_offset in (0, 1) and (
            self.action_offset == 0 or self.action_head == "l1"),
            f"model.action_offset must be 0 (the head reads the placeholders) or 1 (one "
            f"position later, as OpenVLA-OFT's released inference reads them; model.action_head"
            f"='l1' only), got {self.action_offset} with action_head={self.action_head!r}")
        _positive("model", chunk_size=self.chunk_size, max_state_dim=self.max_state_dim,
                  max_action_dim=self.max_action_dim)
        _require(self.action_head in ACTION_HEADS, f"model.action_head must be one of "
                 f"{ACTION_HEADS}, got {self.action_head!r}")
        if self.action_head == "text":
            _require(self.text.lm_head, "model.action_head='text' reads the language-model "
                     "head: set model.text.lm_head=true")
            _require(2 <= self.text_actions < self.text.vocab_size,
                     f"model.text_actions must be in [2, model.text.vocab_size "
                     f"({self.text.vocab_size})), got {self.text_actions}")
            _require(self.max_action_dim == self.text_actions,
                     f"model.action_head='text': an action is one of model.text_actions "
                     f"({self.text_actions}) tokens, stored one-hot: expected "
                     f"model.max_action_dim={self.text_actions}, got {self.max_action_dim}")
        _require(self.projector_layers in (2, 3), f"model.projector_layers must be 2 (one "
                 f"tower) or 3 (fused towers), got {self.projector_layers}")
        _require(self.head_hidden >= 0 and self.head_blocks >= 0,
                 f"model.head_hidden and model.head_blocks must be >= 0, got "
                 f"{self.head_hidden}, {self.head_blocks}")
        _require(self.text.vocab_size > 0, "model.text.vocab_size must be > 0 (the decoder "
                 "embeds the prompt)")
        for name in ("bos_token_id", "stop_token_id"):
            value = getattr(self, name)
            _require(0 <= value < self.text.vocab_size, f"model.{name} ({value}) must be a "
                     f"token id below model.text.vocab_size ({self.text.vocab_size})")
        f = self.vision_fused
        if f is not None:
            _require((f.image_size, f.grid, f.channels) == (self.vision.image_size,
                                                             self.vision.grid,
                                                             self.vision.channels),
                     f"model.vision_fused must see the image as model.vision does: "
                     f"image_size {self.vision.image_size}, a {self.vision.grid}×"
                     f"{self.vision.grid} patch grid and {self.vision.channels} channels; got "
                     f"image_size {f.image_size}, grid {f.grid}, channels {f.channels}")
        _check_tower_layer(self.pruner, [v for v in (self.vision, self.vision_fused) if v])
        _require(self.pruner.action_context == "none",
                 f"model.pruner.action_context={self.pruner.action_context!r} is for the "
                 "flow-matching family; the parallel VLA's pruner reads the prompt only "
                 "(set it to 'none')")

    @property
    def tokens_per_image(self) -> int:
        return self.vision.grid ** 2

    @property
    def vision_width(self) -> int:
        """Width of the patch features the projector reads (both towers together)."""
        return self.vision.width + (self.vision_fused.width if self.vision_fused else 0)

    @property
    def num_action_tokens(self) -> int:
        """The action slots of the sequence: a placeholder per step and dimension (l1), or
        a token per step (text)."""
        if self.action_head == "text":
            return self.chunk_size
        return self.chunk_size * self.max_action_dim

    @property
    def first_action_id(self) -> int:
        """The token id of the first discrete action (text head)."""
        return self.text.vocab_size - self.text_actions


ACTION_HEADS = ("l1", "text")
# the "l1" head's loss: L1 (OpenVLA-OFT's) or squared error
REGRESSION_LOSSES = ("l1", "mse")
TOKENIZER_KINDS = ("words", "hf")


@dataclass
class TokenizerConfig:
    kind: str = "words"  # "words": built-in word/byte tokenizer; "hf": a local HF tokenizer
    # directory of a Hugging Face tokenizer (kind = "hf"); a relative path is read from the
    # checkpoint's directory (checkpoints hold their tokenizer's files in ``tokenizer/``)
    path: str | None = None
    max_length: int = 48  # tasks are padded to this many tokens; longer ones are an error
    words: list[str] | None = None  # vocabulary of the word tokenizer (None = built-in)
    # kind = "hf": append "\n" to a task that does not end with one (SmolVLA's processor)
    append_newline: bool = False
    # kind = "hf": the text tokenized for a task, with ``{task}`` or ``{task_lower}`` in it
    # (OpenVLA: "In: What action should the robot take to {task_lower}?\nOut:")
    prompt: str = "{task}"
    # kind = "hf": ids appended after the prompt's unless they end it already (OpenVLA's
    # empty token 29871)
    end_ids: list[int] | None = None

    def __post_init__(self):
        _require(self.kind in TOKENIZER_KINDS, f"tokenizer.kind must be one of "
                 f"{TOKENIZER_KINDS}, got {self.kind!r}")
        _require(self.kind == "hf" or (self.prompt == "{task}" and not self.end_ids),
                 "tokenizer.prompt and tokenizer.end_ids are options of kind = 'hf'")
        try:
            self.prompt.format(task="", task_lower="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"tokenizer.prompt {self.prompt!r} may name only {{task}} and "
                             f"{{task_lower}} ({type(e).__name__}: {e})") from None
        _require(self.kind != "hf" or bool(self.path),
                 "tokenizer.path must name a local tokenizer directory when kind = 'hf'")
        _positive("tokenizer", max_length=self.max_length)


NORM_MODES = ("mean_std", "min_max", "q01_q99", "identity")
IMAGE_PADS = ("top_left", "center")


@dataclass
class PolicyConfig:
    """Everything needed to rebuild a policy: model, inputs, processors, context.

    ``family`` picks the model: "flow" (:class:`FlowVLAConfig`, the default, so configs
    saved before families existed still load) or "parallel" (:class:`ParallelVLAConfig`).
    """

    family: str = "flow"
    model: FlowVLAConfig | ParallelVLAConfig = field(default_factory=FlowVLAConfig)
    cameras: list[str] = field(default_factory=lambda: ["top"])
    image_shape: tuple[int, int, int] = (3, 512, 512)  # (C, H, W) of the input images
    # Input images of another size than the vision tower's are resized keeping the aspect
    # ratio and padded: "top_left" puts the padding left/top (SmolVLA), "center" (π0).
    image_pad: str = "top_left"
    state_dim: int = 6
    action_dim: int = 6
    n_action_steps: int = 50
    normalization: dict[str, str] = field(
        default_factory=lambda: {"observation.state": "mean_std", "action": "mean_std"})
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    context: ContextConfig = field(default_factory=ContextConfig)

    @property
    def segment_stride(self) -> int:
        """Frames from one training segment of an episode to the next: one per write of
        the temporal context's state (``context.observe_every``; by default one per
        predicted chunk, ``n_action_steps``)."""
        return self.context.observe_every or self.n_action_steps

    @staticmethod
    def field_types_for(data: dict) -> dict[str, type]:
        """The model config class of the family named in ``data`` (for ``from_dict``)."""
        family = data.get("family", "flow")
        _require(family in MODEL_FAMILIES, f"policy.family must be one of "
                 f"{sorted(MODEL_FAMILIES)}, got {family!r}")
        return {"model": MODEL_FAMILIES[family]}

    def __post_init__(self):
        _require(self.family in MODEL_FAMILIES, f"policy.family must be one of "
                 f"{sorted(MODEL_FAMILIES)}, got {self.family!r}")
        want = MODEL_FAMILIES[self.family]
        _require(isinstance(self.model, want), f"policy.family={self.family!r} needs a "
                 f"{want.__name__} model config, got {type(self.model).__name__}; set the "
                 "family that matches the model (or start from a preset of that family)")
        _require(len(self.cameras) > 0, "policy.cameras must name at least one camera")
        _require(len(set(self.cameras)) == len(self.cameras),
                 f"policy.cameras has duplicates: {self.cameras}")
        _require(len(self.image_shape) == 3 and self.image_shape[0] == self.model.vision.channels,
                 f"policy.image_shape must be (C, H, W) with C = model.vision.channels "
                 f"({self.model.vision.channels}), got {self.image_shape}")
        _require(self.image_pad in IMAGE_PADS, f"policy.image_pad must be one of {IMAGE_PADS}, "
                 f"got {self.image_pad!r}")
        _positive("policy", state_dim=self.state_dim, action_dim=self.action_dim,
                  n_action_steps=self.n_action_steps)
        _require(self.state_dim <= self.model.max_state_dim,
                 f"policy.state_dim ({self.state_dim}) exceeds model.max_state_dim "
                 f"({self.model.max_state_dim}); raise model.max_state_dim")
        _require(self.action_dim <= self.model.max_action_dim,
                 f"policy.action_dim ({self.action_dim}) exceeds model.max_action_dim "
                 f"({self.model.max_action_dim}); raise model.max_action_dim")
        _require(self.n_action_steps <= self.model.chunk_size,
                 f"policy.n_action_steps ({self.n_action_steps}) must be <= "
                 f"model.chunk_size ({self.model.chunk_size})")
        every = self.context.observe_every
        _require(every is None or self.n_action_steps % every == 0,
                 f"context.observe_every ({every}) must divide policy.n_action_steps "
                 f"({self.n_action_steps}): a chunk is planned on every "
                 f"{self.n_action_steps}-th frame and the state written every {every}-th")
        for key, mode in self.normalization.items():
            _require(mode in NORM_MODES, f"policy.normalization[{key!r}] must be one of "
                     f"{NORM_MODES}, got {mode!r}")
        backbone = getattr(self.model, "backbone", "transformer")
        _require(self.context.kind != "ssm_state" or backbone == "mamba",
                 f"context.kind='ssm_state' carries a Mamba backbone's recurrent state: "
                 f"expected model.backbone='mamba', got {backbone!r}")
        _require(self.context.kind != "bank" or backbone == "transformer",
                 "context.kind='bank' puts retrieved entries in a transformer's prefix; a "
                 "Mamba backbone carries the episode in its state: use context.kind='ssm_state'")
        _require(self.context.kind != "slow_fast" or backbone == "transformer",
                 "context.kind='slow_fast' keeps earlier turns in a KV cache; a Mamba "
                 "backbone carries them in its state: use context.kind='ssm_state'")
        if getattr(self.model, "action_head", "l1") == "text":
            _require(self.action_dim == self.model.text_actions,
                     f"model.action_head='text': each action is one of model.text_actions "
                     f"({self.model.text_actions}) discrete actions, stored one-hot: expected "
                     f"policy.action_dim={self.model.text_actions}, got {self.action_dim}")
        _require(self.context.voxel_size is None or len(self.cameras) == 1,
                 f"context.voxel_size back-projects one camera's tokens with "
                 f"observation.depth / pose / intrinsics: expected 1 camera, got "
                 f"{len(self.cameras)} ({', '.join(self.cameras)})")
        pruner = getattr(self.model, "pruner", None)
        _require(pruner is None or pruner.tower_layer is None or not (
            self.context.kind == "frames" and self.context.frames_mode == "mem"),
            "model.pruner.tower_layer drops patches inside the vision tower, which "
            "context.frames_mode='mem' runs over the frame history: use "
            "context.frames_mode='tokens' or model.pruner.tower_layer=null")
        if pruner is not None and pruner.enabled and pruner.num_patches:
            have = len(self.cameras) * self.model.tokens_per_image
            _require(pruner.num_patches == have,
                     f"model.pruner.num_patches is {pruner.num_patches} but the policy feeds "
                     f"{len(self.cameras)} camera(s) × {self.model.tokens_per_image} tokens = "
                     f"{have} visual tokens; set model.pruner.num_patches={have} (or 0 to "
                     "derive it from the cameras)")

    @property
    def image_keys(self) -> list[str]:
        return [f"observation.images.{c}" for c in self.cameras]


MODEL_FAMILIES: dict[str, type] = {"flow": FlowVLAConfig, "parallel": ParallelVLAConfig}
