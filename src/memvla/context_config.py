"""The temporal-context config (:mod:`memvla.context`): which kind a policy carries from
one chunk to the next, and the options of each kind. Re-exported by :mod:`memvla.configs`."""

from __future__ import annotations

from dataclasses import dataclass

from .config_utils import _positive, _require

CONTEXT_KINDS = ("none", "memory_tokens", "frames", "slow_fast", "ssm_state", "bank",
                 "experience")
MEMORY_LAYOUTS = ("smolvla", "rmt")
MEMORY_WRITES = ("norm", "clip")
MEMORY_UPDATES = ("replace", "gated", "associative")
MEMORY_SCALES = ("raw", "match")
BANK_READS = ("topk", "attention")
FRAMES_MODES = ("tokens", "pooled", "mem")
POOL_MODES = ("avg", "max", "bilinear")
# the options of each kind; the others must keep their defaults
CONTEXT_OPTIONS = {
    "none": (),
    "ssm_state": ("observe_every",),
    "memory_tokens": ("num_tokens", "layout", "init_std", "write", "max_rms", "memory_update",
                      "memory_noise", "memory_scale", "memory_key_dim", "observe_every",
                      "hold_weight", "hold_threshold"),
    "frames": ("num_frames", "frame_stride", "frames_mode", "pool_stride", "pool_mode",
               "temporal_every", "voxel_size"),
    "slow_fast": ("num_turns", "window", "num_history", "pool_stride", "pool_mode",
                  "voxel_size", "observe_every"),
    "bank": ("bank_size", "bank_topk", "bank_merge", "bank_read", "bank_chain", "write",
             "max_rms", "observe_every"),
    "experience": ("store_topk", "store_chunk", "store_dropout", "retrieve_below",
                   "confidence", "confidence_samples", "max_spread"),
}
CONFIDENCES = ("spread", "entropy")
WINDOWS = ("reset", "slide")


@dataclass
class ContextConfig:
    """Temporal context of the policy: what it carries from one chunk to the next.

    ``none``: nothing (each chunk sees the current observation only).
    ``memory_tokens``: ``num_tokens`` recurrent memory tokens in the prefix, in the
    ``smolvla`` (read = write at the start) or ``rmt`` (read at the start, write at the
    end; no prefix token sees the write tokens, the action expert does) layout; trained
    through the episode (see ``train.bptt_depth``), one memory update per predicted chunk:
    training cuts episodes into segments every ``n_action_steps`` frames (how often the
    policy predicts a chunk at inference), each with its ``chunk_size`` actions.

    ``write``: what bounds the written memory over a long episode. ``clip`` (default): the
    backbone's residual stream at the write positions, scaled down per token where its RMS
    exceeds ``max_rms`` (inside the bound the memory is the raw hidden state, so the
    residual connections carry it from segment to segment unchanged unless the layers
    change it; keep the bound above the RMS the memory reaches within the trained horizon).
    ``norm``: the output of the backbone's final RMSNorm (its scale is fixed by that norm's
    weight, so the memory's norm stays flat however long the episode; but every update
    rescales what is carried: in a synthetic task a cue did not survive 8 updates that way,
    while remember-color learnt with either write, see README).

    ``frames``: frame history, the past ``num_frames`` frames at ``frame_stride``
    environment steps (t − stride, t − 2·stride, ...; LeRobot's visual memory: 6 and 10),
    trained on frames with that history from the dataset (no BPTT). ``frames_mode``:
    ``tokens`` = each past frame's image tokens in the prefix before the current ones,
    ``pooled`` = the same 2-D pooled with ``pool_stride`` / ``pool_mode``
    (:mod:`memvla.layers.pooling`), ``mem`` = MEM's space-time vision encoder
    (:mod:`memvla.layers.temporal_vision`: the same ViT weights with causal attention
    across time every ``temporal_every``-th layer; only the current frame's tokens enter
    the prefix). Frames before the episode's start are masked (``tokens``, ``pooled``) or
    are the first frame (``mem``).

    ``slow_fast``: StreamVLN's slow-fast context (:mod:`memvla.context.slow_fast`). Fast:
    the previous turns (one turn = one predicted chunk) stay in the backbone's KV cache and
    each new turn's prefix attends to them; ``window="reset"`` empties the cache every
    ``num_turns`` turns (StreamVLN's schedule), ``"slide"`` evicts the oldest turn beyond
    ``num_turns``; ``num_turns=0`` keeps the whole episode (the full-history baseline).
    Slow: up to ``num_history`` frames of the turns before the window, sampled with
    StreamVLN's ``slice(0, t0, max(t0 // num_history, 1))``, 2-D pooled (``pool_stride``,
    ``pool_mode``), before the current prefix. Trained through the episode (the cache is
    the carried state, ``train.bptt_depth`` truncates it). Keep ``num_turns`` below the
    chunks of the training episodes: a policy whose training never crossed a window meets
    its first reset, and its first slow frames, only beyond the trained horizon (on
    remember-color, 8 turns with delays up to 30: 99% at delay 30, 5% at 90; 4 turns: 100%
    at both, docs/exam.md).

    ``voxel_size`` (metres; ``slow_fast``, and ``frames`` with ``tokens`` / ``pooled``):
    StreamVLN's voxel pruning of the past frames' tokens (:mod:`memvla.layers.voxel`):
    each token's patch centre is back-projected with the frame's depth, pose and
    intrinsics (``observation.depth``, ``observation.pose``, ``observation.intrinsics``,
    one camera) and only the newest token per voxel is kept. None: off.

    ``memory_update``: ``replace`` (the written memory is the next one) or ``gated`` (a
    learned per-channel interpolation between the old and the written memory: a closed
    gate carries the memory unchanged) or ``associative`` (ARMT-style: the carried state is
    a matrix (B, D, ``memory_key_dim``) into which each written token is stored by the
    delta rule; the memory tokens read it at learned queries, see
    :mod:`memvla.layers.associative_memory`). ``memory_noise``: Gaussian noise of that share of
    each token's RMS added to the carried memory in training (0: none). ``memory_scale``:
    ``raw`` (the carried memory enters the prefix as it is) or ``match`` (each memory token
    rescaled to the RMS of the other prefix tokens of its sample, so that its scale stays
    that of the prefix however long the episode: μVLA's scale matching).
    ``hold_weight``: in training through episodes, that weight times the memory's relative
    change ‖m' − m‖² / ‖m‖² over the writes whose observation (every ``observation.*``
    feature) is within ``hold_threshold`` of the previous segment's, added to the loss: the
    memory is taught to stay where it is while nothing happens, so that it does not drift
    over delays longer than training's (0: off; see
    :func:`memvla.layers.memory_tokens.hold_penalty`).

    ``observe_every`` (the kinds trained through the episode: ``memory_tokens``,
    ``slow_fast``, ``ssm_state``, ``bank``): the state is also written from the frames
    observed while a chunk executes, every that many environment steps (a write pass: the
    model's prefix on that frame, no actions; it must divide ``n_action_steps``). None
    (default): written once per chunk, from the frame the chunk is planned on, so an event
    shorter than a chunk can be missed. Training cuts episodes into segments every
    ``observe_every`` frames and predicts a chunk (with its loss) every
    ``n_action_steps``; the others are write passes, back-propagated through like the rest.
    (``frames`` records every frame already; its history is set by ``frame_stride``.)

    ``bank``: a within-episode memory bank (:mod:`memvla.context.bank`, MemoryVLA's): one
    pooled observation vector per chunk, at most ``bank_size`` entries (when full, the most
    similar adjacent pair is merged, the oldest on a tie; with ``bank_merge`` a new entry
    at least that cosine-similar to the newest merges into it at once), the ``bank_topk``
    entries most similar to the current observation in the prefix through a learned gate
    (``bank_read='topk'``), or ``bank_topk`` tokens each an attention-weighted mix of every
    entry (``bank_read='attention'``: every entry gets a gradient, see :mod:`memvla.context.bank`);
    with ``bank_chain`` each entry's write token starts from the newest entry (a recurrent
    write, as memory tokens': what lets the bank learn remember-color's cue);
    an entry is a write token's output bounded as memory tokens' is (``write``,
    ``max_rms``). Trained through the episode.

    ``experience``: items of an experience store across episodes in the prefix
    (:mod:`memvla.context.experience`, :mod:`memvla.retrieval`): the ``store_topk``
    items nearest to the current observation and instruction, each one token made of its
    first ``store_chunk`` actions and its outcome (success or failure). The store is
    attached to the policy (``policy.attach_experience(store)``, ``memvla eval --store``);
    ``memvla train`` builds one from the training set and never retrieves a sample's own
    episode; ``store_dropout``: the share of training samples given no items (so that the
    policy also acts without them). Switching (seed 003's hybrid): a chunk retrieves only
    when the policy's confidence without items is below ``retrieve_below`` (None: always;
    0: never), measured as ``confidence`` = ``spread`` (of ``confidence_samples`` flow
    samples, a spread of ``max_spread`` or more is confidence 0) or ``entropy`` (of the
    token pruner's votes); see :mod:`memvla.policies.confidence`.

    Options of another kind than ``kind`` must keep their defaults (a clear error says
    which).
    """

    kind: str = "none"
    num_tokens: int = 4
    layout: str = "smolvla"
    init_std: float = 0.02
    write: str = "clip"
    max_rms: float = 16.0
    memory_update: str = "replace"
    memory_noise: float = 0.0
    memory_scale: str = "raw"
    memory_key_dim: int = 32
    observe_every: int | None = None
    hold_weight: float = 0.0
    hold_threshold: float = 0.01
    num_frames: int = 6
    frame_stride: int = 10
    frames_mode: str = "tokens"
    pool_stride: int = 2
    pool_mode: str = "avg"
    temporal_every: int = 1
    num_turns: int = 8
    window: str = "reset"
    num_history: int = 8
    voxel_size: float | None = None
    bank_size: int = 16
    bank_topk: int = 4
    bank_merge: float | None = None
    bank_read: str = "topk"
    bank_chain: bool = False
    store_topk: int = 4
    store_chunk: int = 8
    store_dropout: float = 0.0
    retrieve_below: float | None = None
    confidence: str = "spread"
    confidence_samples: int = 4
    max_spread: float = 1.0

    def __post_init__(self):
        _require(self.kind in CONTEXT_KINDS, f"context.kind must be one of {CONTEXT_KINDS}, "
                 f"got {self.kind!r}")
        defaults = ContextConfig.__dataclass_fields__
        for kind, names in CONTEXT_OPTIONS.items():
            for name in names:
                value, default = getattr(self, name), defaults[name].default
                _require(name in CONTEXT_OPTIONS[self.kind] or value == default,
                         f"context.{name} is an option of context.kind={kind!r}, not of "
                         f"{self.kind!r}: expected its default {default!r}, got {value!r}")
        if self.kind == "frames":
            _positive("context", num_frames=self.num_frames, frame_stride=self.frame_stride,
                      pool_stride=self.pool_stride, temporal_every=self.temporal_every)
            _require(self.frames_mode in FRAMES_MODES, f"context.frames_mode must be one of "
                     f"{FRAMES_MODES}, got {self.frames_mode!r}")
        if self.kind in ("frames", "slow_fast"):
            _require(self.pool_mode in POOL_MODES, f"context.pool_mode must be one of "
                     f"{POOL_MODES}, got {self.pool_mode!r}")
            _positive("context", pool_stride=self.pool_stride)
        if self.voxel_size is not None:
            _require(isinstance(self.voxel_size, int | float) and self.voxel_size > 0,
                     f"context.voxel_size must be > 0 metres (or None: no voxel pruning), "
                     f"got {self.voxel_size!r}")
            _require(self.kind == "slow_fast" or self.frames_mode != "mem",
                     "context.voxel_size prunes past frames' tokens in the prefix; "
                     "context.frames_mode='mem' puts none there: expected 'tokens' or "
                     "'pooled', got 'mem'")
        if self.kind == "slow_fast":
            _require(self.num_turns >= 0, f"context.num_turns must be >= 1 turn (or 0: the "
                     f"whole episode), got {self.num_turns}")
            _require(self.window in WINDOWS, f"context.window must be one of {WINDOWS}, got "
                     f"{self.window!r}")
            _require(self.num_history >= 0, f"context.num_history must be >= 0, got "
                     f"{self.num_history}")
        if self.kind == "bank":
            _require(self.bank_read in BANK_READS, f"context.bank_read must be one of "
                     f"{BANK_READS}, got {self.bank_read!r}")
            _require(isinstance(self.bank_chain, bool), f"context.bank_chain must be true or "
                     f"false, got {self.bank_chain!r}")
            if self.bank_read == "topk":  # the entries read, of those held
                _require(self.bank_size >= 1 and 1 <= self.bank_topk <= self.bank_size,
                         f"context.bank_size must be >= 1 and context.bank_topk in [1, "
                         f"bank_size]; got bank_size={self.bank_size}, "
                         f"bank_topk={self.bank_topk}")
            else:  # the read tokens, each a mix of every entry
                _require(self.bank_size >= 1 and self.bank_topk >= 1,
                         f"context.bank_size and context.bank_topk (the read tokens of "
                         f"bank_read='attention') must be >= 1; got bank_size="
                         f"{self.bank_size}, bank_topk={self.bank_topk}")
            _require(self.write in MEMORY_WRITES and self.max_rms > 0, f"context.write must "
                     f"be one of {MEMORY_WRITES} and context.max_rms > 0, got "
                     f"{self.write!r}, {self.max_rms}")
            _require(self.bank_merge is None or -1 <= self.bank_merge <= 1,
                     f"context.bank_merge is a cosine similarity in [-1, 1] (or None: merge "
                     f"only when the bank is full), got {self.bank_merge}")
        if self.kind == "experience":
            _positive("context", store_topk=self.store_topk, store_chunk=self.store_chunk,
                      max_spread=self.max_spread)
            _require(0 <= self.store_dropout < 1, f"context.store_dropout is a share of "
                     f"training samples in [0, 1), got {self.store_dropout}")
            _require(self.retrieve_below is None or (isinstance(
                self.retrieve_below, int | float) and self.retrieve_below >= 0),
                f"context.retrieve_below is a confidence threshold >= 0 (0: never retrieve; "
                f"None: always), got {self.retrieve_below!r}")
            _require(self.confidence in CONFIDENCES, f"context.confidence must be one of "
                     f"{CONFIDENCES}, got {self.confidence!r}")
            _require(self.confidence_samples >= 2, f"context.confidence_samples must be >= 2 "
                     f"(the spread of one sample is 0), got {self.confidence_samples}")
        _require(self.observe_every is None or (isinstance(self.observe_every, int)
                                                and self.observe_every >= 1),
                 f"context.observe_every is a number of environment steps >= 1 (or None: "
                 f"only the frame a chunk is planned on), got {self.observe_every!r}")
        if self.kind == "memory_tokens":
            _require(self.num_tokens > 0, f"context.num_tokens must be > 0 with "
                     f"context.kind=memory_tokens, got {self.num_tokens}")
            _require(self.layout in MEMORY_LAYOUTS, f"context.layout must be one of "
                     f"{MEMORY_LAYOUTS}, got {self.layout!r}")
            _require(self.init_std > 0, f"context.init_std must be > 0, got {self.init_std}")
            _require(self.write in MEMORY_WRITES, f"context.write must be one of "
                     f"{MEMORY_WRITES}, got {self.write!r}")
            _require(self.max_rms > 0, f"context.max_rms must be > 0, got {self.max_rms}")
            _require(self.memory_update in MEMORY_UPDATES, f"context.memory_update must be one "
                     f"of {MEMORY_UPDATES}, got {self.memory_update!r}")
            _positive("context", memory_key_dim=self.memory_key_dim)
            _require(self.memory_scale in MEMORY_SCALES, f"context.memory_scale must be one "
                     f"of {MEMORY_SCALES}, got {self.memory_scale!r}")
            _require(self.memory_noise >= 0, f"context.memory_noise is a share of the "
                     f"memory's RMS, >= 0; got {self.memory_noise}")
            _require(isinstance(self.hold_weight, int | float) and self.hold_weight >= 0,
                     f"context.hold_weight weighs the memory's change over unchanged "
                     f"observations in the loss, >= 0 (0: off); got {self.hold_weight!r}")
            _require(isinstance(self.hold_threshold, int | float) and self.hold_threshold >= 0,
                     f"context.hold_threshold is the largest change of an observation "
                     f"feature (e.g. a pixel) that counts as unchanged, >= 0; got "
                     f"{self.hold_threshold!r}")

    @property
    def recurrent(self) -> bool:
        """True when the context is trained through whole episodes (memory tokens, the
        slow-fast cache: BPTT)."""
        return self.kind in ("memory_tokens", "slow_fast", "ssm_state", "bank")

    @property
    def stateful(self) -> bool:
        """True when the policy carries something from step to step at inference."""
        return self.kind not in ("none", "experience")

    @property
    def history_offsets(self) -> list[int]:
        """Offsets of the past frames a frame sample needs (oldest first; [] for none)."""
        if self.kind != "frames":
            return []
        return [-k * self.frame_stride for k in range(self.num_frames, 0, -1)]
