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
from .layer_configs import (  # noqa: F401 (re-exported)
    PRUNER_ACTION_CONTEXTS,
    PRUNER_DUPLICATES,
    PRUNER_GRADIENTS,
    PRUNER_NOISES,
    PRUNER_QUERIES,
    VISION_LAYOUTS,
    DecoderConfig,
    PrunerConfig,
    VisionConfig,
    _check_tower_layer,
)

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
