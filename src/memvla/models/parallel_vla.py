"""The parallel-decoding VLA (OpenVLA-OFT family), the model LightVLA prunes.

One decoder over ``[BOS][patches of every camera][proprio][prompt][placeholders][STOP]``
with bidirectional attention (padding masked): the ``chunk_size × action_dim`` action
placeholders are zero embeddings (OFT multiplies their token embeddings by zero), so all
actions of the chunk are decoded in one pass; the decoder's hidden states at the
placeholders go through an MLP-ResNet head (:mod:`memvla.layers.action_head`) that
regresses the normalised action chunk with an L1 loss (or squared error:
``model.regression_loss``). With ``model.action_head=text``
(StreamVLN's actions as text) the placeholders and STOP give way to one slot per future
step, causal among themselves, whose hidden states the LM head reads as discrete action
tokens (:mod:`memvla.layers.action_tokens`).

Vision: OpenVLA runs a fused DINOv2 ViT-L/14 + SigLIP So400m/14 tower (patch features
concatenated channel-wise) and a GELU MLP projector; here ``model.vision`` is a ViT and
``model.vision_fused`` an optional second one, each in SigLIP's Hugging Face layout or in
timm's (``vision.layout=timm``, :mod:`memvla.layers.vit_timm`: OpenVLA's DINOv2 with
registers and LayerScale, its SigLIP, read at the second-to-last block; what
``openvla-oft-7b`` and an imported OFT checkpoint use). At tiny scale one tower is enough.
Each camera's image goes through the tower and the projector separately and the patch
tokens of all cameras are concatenated (OFT's multi-image input).

Token pruning (LightVLA, ``model.pruner.enabled``): :class:`memvla.layers.token_pruner.
TokenPruner` sits after the projector. Its task keys are the prompt embeddings with padding
masked out (the released code also lets the padding and the zeroed placeholders in). Kept
patches keep their original RoPE positions, and every token after the patches keeps the
position it would have without pruning, so positions may have gaps. At inference each
sample keeps its own number of patches: the batch is padded to the largest count and the
padding is masked out of attention, so a batch equals its samples run alone. The indices
the action hidden states are read from are computed from the pruned sequence (the released
code reads them 2 positions late at inference); :class:`ParallelSequence` carries them, and
training and inference read the placeholders at the same RoPE positions.

Module names follow OpenVLA-OFT (``vision_backbone.featurizer``,
``vision_backbone.fused_featurizer``, ``projector.fc{1,2,3}``, ``language_model.model``,
``language_model.lm_head``, ``proprio_projector.fc{1,2}``, ``action_head.model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import ContextConfig, ParallelVLAConfig, VisionConfig
from ..context import make_context
from ..layers.action_head import L1RegressionActionHead
from ..layers.action_tokens import (
    actions_to_tokens,
    greedy_decode,
    slot_inputs,
    token_loss,
    tokens_to_actions,
)
from ..layers.connector import MLPProjector
from ..layers.kv_cache import KVCache
from ..layers.masks import block_mask_between
from ..layers.token_pruner import TokenPruner, pruning_for_inference
from ..layers.tokens import TokenSegment
from ..layers.vision import ImageEncoder, VisionTransformer
from ..layers.vision_drop import TowerPreview
from ..layers.vision_reuse import current_frame_encoder, make_vision_reuse
from ..layers.vit_timm import TimmViT
from .decoder import Decoder

# what each token of a ParallelSequence is (padding: PAD; CONTEXT: a temporal context's)
PAD, BOS, PATCH, PROPRIO, PROMPT, ACTION, STOP, CONTEXT = -1, 0, 1, 2, 3, 4, 5, 6


@dataclass
class ParallelSequence:
    """The decoder's input: embeddings (B, N, D), real-token flags ``valid`` (B, N), RoPE
    ``positions`` (B, N), token ``kinds`` (B, N) and where the action placeholders are:
    sequence indices ``action_start : action_start + num_actions`` (the same for every
    sample of the batch; computed from the pruned length)."""

    embs: Tensor
    valid: Tensor
    positions: Tensor
    kinds: Tensor
    action_start: int
    num_actions: int
    kept: Tensor  # (B,) visual tokens kept per sample
    stats: dict[str, Tensor] = field(default_factory=dict)  # the pruner's, 0-dim tensors
    blocks: Tensor | None = None  # (B, N) attention blocks (None: one, bidirectional)
    flags: Tensor | None = None  # (B, N) block flags of its own layout (text slots: causal)

    @property
    def action_slice(self) -> slice:
        return slice(self.action_start, self.action_start + self.num_actions)

    @property
    def action_positions(self) -> Tensor:
        """RoPE positions of the placeholders (B, A·Da)."""
        return self.positions[:, self.action_slice]


def build_sequence(bos: Tensor, patches: Tensor, patch_valid: Tensor, patch_pos: Tensor,
                   num_patches: int, proprio: Tensor | None, prompt: Tensor, prompt_pad: Tensor,
                   num_actions: int, stop: Tensor | None,
                   slots: Tensor | None = None) -> ParallelSequence:
    """Assemble ``[BOS][patches][proprio][prompt][placeholders][STOP]``.

    bos/stop (B, 1, D) (stop None: no STOP token); patches (B, P', D) with ``patch_valid``
    (B, P') and their original positions ``patch_pos`` (B, P') (P' < ``num_patches`` after
    pruning); proprio (B, 1, D) or None; prompt (B, Nl, D) right-padded, ``prompt_pad``
    (B, Nl) True for real tokens. ``slots`` (B, K, D): the action slots' embeddings, each
    in a block of its own (causal: the text action head); None: K zero placeholders in the
    one bidirectional block (OFT). Positions: BOS 0, patches as given, then counting on
    from 1 + ``num_patches`` over the real tokens (prompt padding does not advance them).
    """
    b, p, d = patches.shape
    dev = patches.device
    parts = [bos] + [patches] + ([proprio] if proprio is not None else []) + [prompt]
    placeholders = patches.new_zeros(b, num_actions, d) if slots is None else slots  # (B,K,D)
    n_stop = 0 if stop is None else 1
    embs = torch.cat([*parts, placeholders, *([stop] if n_stop else [])], 1)  # (B, N, D)

    ones = torch.ones(b, 1, dtype=torch.bool, device=dev)
    n_prop = 0 if proprio is None else 1
    valid = torch.cat([ones, patch_valid, ones.expand(b, n_prop), prompt_pad,
                       ones.expand(b, num_actions + n_stop)], 1)  # (B, N)

    after = 1 + num_patches + n_prop  # first position after the proprio token
    prompt_pos = after + torch.cumsum(prompt_pad.long(), 1) - 1  # (B, Nl)
    start = after + prompt_pad.long().sum(1, keepdim=True)  # (B, 1) first placeholder
    tail = start + torch.arange(num_actions + n_stop, device=dev)  # (B, K [+ 1]) actions, STOP
    zero = torch.zeros(b, 1, dtype=torch.long, device=dev)
    positions = torch.cat([zero, patch_pos.long(), zero[:, :n_prop] + 1 + num_patches,
                           prompt_pos.clamp(min=0), tail], 1)  # (B, N)

    def kind(k: int, n: int) -> Tensor:
        return torch.full((b, n), k, dtype=torch.long, device=dev)

    kinds = torch.cat([kind(BOS, 1), kind(PATCH, p), kind(PROPRIO, n_prop),
                       kind(PROMPT, prompt.shape[1]), kind(ACTION, num_actions),
                       kind(STOP, n_stop)], 1)  # (B, N)
    kinds = kinds.masked_fill(~valid, PAD)
    action_start = 1 + p + n_prop + prompt.shape[1]
    flags = blocks = None
    if slots is not None:  # each slot starts a block: it sees the prefix and earlier slots
        flags = (kinds == ACTION).long()  # (B, N)
        blocks = torch.cumsum(flags, 1)  # (B, N)
    return ParallelSequence(embs, valid, positions, kinds, action_start, num_actions,
                            patch_valid.long().sum(1), blocks=blocks, flags=flags)


def build_sequence_ref(bos: Tensor, patches: Tensor, patch_valid: Tensor, patch_pos: Tensor,
                       num_patches: int, proprio: Tensor | None, prompt: Tensor,
                       prompt_pad: Tensor, num_actions: int, stop: Tensor | None,
                       slots: Tensor | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Slow twin of :func:`build_sequence`: per sample, only the real tokens, in order, as
    (embeddings (N_b, D), positions (N_b,), kinds (N_b,)), counting positions one by one."""
    out = []
    d = patches.shape[-1]
    for i in range(patches.shape[0]):
        embs, pos, kinds = [bos[i, 0]], [0], [BOS]
        for j in range(patches.shape[1]):
            if patch_valid[i, j]:
                embs.append(patches[i, j])
                pos.append(int(patch_pos[i, j]))
                kinds.append(PATCH)
        nxt = 1 + num_patches
        if proprio is not None:
            embs.append(proprio[i, 0])
            pos.append(nxt)
            kinds.append(PROPRIO)
            nxt += 1
        for j in range(prompt.shape[1]):
            if prompt_pad[i, j]:
                embs.append(prompt[i, j])
                pos.append(nxt)
                kinds.append(PROMPT)
                nxt += 1
        for j in range(num_actions):
            embs.append(patches.new_zeros(d) if slots is None else slots[i, j])
            pos.append(nxt)
            kinds.append(ACTION)
            nxt += 1
        if stop is not None:
            embs.append(stop[i, 0])
            pos.append(nxt)
            kinds.append(STOP)
        out.append((torch.stack(embs), torch.tensor(pos), torch.tensor(kinds)))
    return out


def _vit(v: VisionConfig) -> VisionTransformer | TimmViT:
    if v.layout == "timm":
        return TimmViT(v.width, v.depth, v.heads, v.mlp_dim, v.image_size, v.patch_size,
                       v.channels, v.eps, v.act, v.class_token, v.reg_tokens, v.layer_scale,
                       v.attn_pool, v.feature_layer, v.pixel_mean, v.pixel_std)
    return VisionTransformer(v.width, v.depth, v.heads, v.mlp_dim, v.image_size, v.patch_size,
                             v.channels, v.eps, v.act, v.position_buckets)


class VisionBackbone(nn.Module):
    """One ViT, or two over the same image with their patch features concatenated."""

    def __init__(self, cfg: ParallelVLAConfig):
        super().__init__()
        self.featurizer = _vit(cfg.vision)
        self.fused_featurizer = _vit(cfg.vision_fused) if cfg.vision_fused else None

    @property
    def towers(self) -> list[nn.Module]:
        """The towers, whose patch features concatenate in this order."""
        return [t for t in (self.featurizer, self.fused_featurizer) if t is not None]

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, S, S) in [-1, 1] -> patch features (B, P, Dv)."""
        feats = self.featurizer(images)  # (B, P, Dv1)
        if self.fused_featurizer is not None:
            feats = torch.cat([feats, self.fused_featurizer(images)], -1)  # (B, P, Dv1+Dv2)
        return feats


class LanguageModel(nn.Module):
    """The decoder (``model``, Llama naming) and its LM head (kept for checkpoint
    compatibility; the action loss never reaches it)."""

    def __init__(self, cfg: ParallelVLAConfig):
        super().__init__()
        t = cfg.text
        self.model = Decoder(t)
        self.lm_head = nn.Linear(t.width, t.vocab_size, bias=False) if t.lm_head else None


class ProprioProjector(nn.Module):
    """OFT's proprio projector: state (B, Ds') -> one token (B, 1, D)."""

    def __init__(self, state_dim: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(state_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, state: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(state)))[:, None]  # (B, 1, D)


class ParallelVLA(nn.Module):
    """``num_cameras`` sets the visual tokens per sample the pruner expects when
    ``model.pruner.num_patches`` is 0. ``context`` picks the temporal context
    (:mod:`memvla.context`): ``encode``, ``forward`` and ``predict`` take its state
    (``context_state``) and the last two return the next one beside their result, as the
    flow-matching family does. A context's tokens (memory tokens, past frames) join the
    sequence as its own parts: memory read tokens and past frames before BOS, RMT write
    tokens after STOP in a block of their own (only they see the whole sequence). A context
    that keeps earlier turns in a key/value cache (slow-fast) has the whole sequence of
    each turn (placeholders included) appended to it, and the next turn attends to it."""

    def __init__(self, cfg: ParallelVLAConfig, num_cameras: int = 1,
                 context: ContextConfig | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.text.width
        self.vision_backbone = VisionBackbone(cfg)
        self.projector = MLPProjector(cfg.vision_width, d, cfg.projector_layers)
        self.language_model = LanguageModel(cfg)
        self.proprio_projector = ProprioProjector(cfg.max_state_dim, d) if cfg.use_proprio \
            else None
        self.text_actions = cfg.action_head == "text"  # the LM head reads action tokens
        self.action_head = None if self.text_actions else L1RegressionActionHead(
            d, cfg.head_hidden or d, cfg.chunk_size, cfg.max_action_dim, cfg.head_blocks)
        self.context = make_context(context or ContextConfig(), d, cfg.max_action_dim)
        self.vision_reuse = make_vision_reuse(cfg.vision, self.context)  # inference only
        self.last_prune_stat_tensors: dict[str, Tensor] = {}  # of the last call
        self.pruner = None
        if cfg.pruner.enabled:
            self.pruner = TokenPruner(
                cfg.pruner, cfg.pruner.num_patches or num_cameras * cfg.tokens_per_image)

    @property
    def decoder(self) -> Decoder:
        return self.language_model.model

    def unused_parameter_names(self) -> set[str]:
        """Kept so that checkpoints load by name, never read: the LM head with the L1 head
        (the final norm is: the head reads the normed placeholders) and what a timm tower
        stores beyond its feature layer."""
        unused = set()
        for name in ("featurizer", "fused_featurizer"):
            tower = getattr(self.vision_backbone, name)
            if isinstance(tower, TimmViT):
                unused |= {f"vision_backbone.{name}.{n}" for n in tower.unused_parameter_names()}
        if self.text_actions:
            return unused
        return unused | {n for n, _ in self.named_parameters()
                         if n.startswith("language_model.lm_head.")}

    # -- the sequence ---------------------------------------------------------------------
    @property
    def image_encoder(self) -> ImageEncoder:
        """Images (B, C, S, S) -> projected patch tokens (B, Ti, D), for the context too
        (its ``vision`` is the fused pair of towers when there are two)."""
        one = self.vision_backbone.fused_featurizer is None
        return ImageEncoder(self.vision_backbone.featurizer if one else self.vision_backbone,
                            self.projector)

    def embed_patches(self, images: list[Tensor], context_state=None,
                      previews: TowerPreview | None = None) -> Tensor:
        """Images per camera (B, C, S, S) -> projected patch tokens of all cameras (B, P, D)
        (each camera through the context's image encoding: e.g. MEM's space-time one):
        through ``previews`` (the pruner's in-tower votes, ``pruner.tower_layer``) or the
        image encoder (reusing the last frame's unchanged patches with ``vision.reuse``)."""
        encoder = self.image_encoder
        reuse, training = self.vision_reuse, self.training
        tokens = [self.context.encode_images(
            previews or current_frame_encoder(reuse, training, encoder, cam), img, cam,
            context_state) for cam, img in enumerate(images)]  # (B, Ti, D) each
        return torch.cat(tokens, 1)  # (B, P, D)

    def encode(self, images: list[Tensor], lang_ids: Tensor, lang_pad: Tensor,
               state: Tensor, context_state=None, cache: KVCache | None = None,
               slot_ids: Tensor | None = None) -> ParallelSequence:
        """Build the (pruned) sequence. ``lang_ids``/``lang_pad`` (B, Nl): the prompt
        without BOS (the policy drops the tokenizer's); the BOS token
        (``model.bos_token_id``) goes first, before the patches, as in OpenVLA. With a
        ``cache`` of earlier turns (the slow-fast context) the sequence continues its
        positions and blocks. ``slot_ids`` (B, K): the text head's slot inputs (the
        previous steps' action tokens)."""
        if context_state is None and self.context.stateful:
            raise ValueError(f"context.kind={self.context.kind!r} needs its state: give "
                             "context_state (e.g. initial_state(B) at an episode's start)")
        bos = self.decoder.embed(torch.full_like(lang_ids[:, :1], self.cfg.bos_token_id))
        prompt, prompt_pad = self.decoder.embed(lang_ids), lang_pad  # (B, Nl, D), (B, Nl)
        tower = self.cfg.pruner.tower_layer if self.pruner is not None else None
        previews = None if tower is None else TowerPreview(self.image_encoder, tower)
        patches = self.embed_patches(images, context_state, previews)  # (B, P, D)
        b, p, _ = patches.shape
        pos = torch.arange(1, p + 1, device=patches.device).expand(b, p)  # (B, P)
        valid = torch.ones(b, p, dtype=torch.bool, device=patches.device)  # (B, P)
        stats: dict[str, Tensor] = {}
        if self.pruner is not None:
            values = None if previews is None else previews.values(self.pruner.training)
            out = self.pruner(patches, pos, prompt, prompt_pad, values)
            patches, valid, pos, stats = out.tokens, out.valid, out.positions, out.stat_tensors
        proprio = None if self.proprio_projector is None else self.proprio_projector(state)
        stop_ids = torch.full_like(lang_ids[:, :1], self.cfg.stop_token_id)  # (B, 1)
        stop, slots = self.decoder.embed(stop_ids), None  # (B, 1, D)
        if self.text_actions:
            if slot_ids is None or tuple(slot_ids.shape) != (b, self.cfg.num_action_tokens):
                raise ValueError(f"model.action_head='text': slot_ids must be "
                                 f"({b}, {self.cfg.num_action_tokens}) token ids, got "
                                 f"{None if slot_ids is None else tuple(slot_ids.shape)}")
            stop, slots = None, self.decoder.embed(slot_ids)  # (B, K, D)
        seq = build_sequence(bos, patches, valid, pos, p, proprio, prompt, prompt_pad,
                             self.cfg.num_action_tokens, stop, slots)
        seq.stats = stats
        if context_state is not None:
            seq = self._with_context(seq, context_state, cache)
        return seq

    def _with_context(self, seq: ParallelSequence, context_state,
                      cache: KVCache | None = None) -> ParallelSequence:
        """The sequence with the temporal context's parts around it: a part before it
        counts its positions from 0 (or after the ``cache`` of earlier turns) and shifts
        the sequence's; a part after it continues from the sequence's last position."""
        own = TokenSegment(seq.embs, seq.valid,
                           torch.zeros_like(seq.kinds) if seq.flags is None else seq.flags)
        parts = self.context.extend_prefix([own], context_state, self.image_encoder)
        at = next(i for i, part in enumerate(parts) if part is own)
        pos, kinds = [], []
        offset = None if cache is None or cache.is_empty else cache.next_position()  # (B, 1)
        for part in parts:
            if part is own:
                here = seq.positions + (0 if offset is None else offset)  # (B, N)
                kinds.append(seq.kinds)
            else:
                first = 0 if offset is None else offset
                here = first + torch.cumsum(part.pad.long(), 1) - 1  # (B, n)
                kinds.append(torch.full_like(here, CONTEXT).masked_fill(~part.pad, PAD))
            pos.append(here)
            last = torch.where(part.pad, here, torch.full_like(here, -1)).max(1, True).values
            offset = last + 1  # (B, 1) the next free position
        joined = TokenSegment.cat(parts)
        before = sum(part.length for part in parts[:at])
        blocks = torch.cumsum(joined.flags.long(), 1)  # (B, N)
        if cache is not None and not cache.is_empty:
            blocks = blocks + cache.key_block[:, -1:]  # (B, N) after the cached turns
        return ParallelSequence(joined.embs, joined.pad, torch.cat(pos, 1),
                                torch.cat(kinds, 1), seq.action_start + before,
                                seq.num_actions, seq.kept, seq.stats, blocks=blocks,
                                flags=joined.flags)

    def hidden_states(self, seq: ParallelSequence, final_norm: bool = True,
                      cache: KVCache | None = None) -> Tensor:
        """Bidirectional decoder over the sequence (a context's blocks aside) -> hidden
        states (B, N, D), after the final norm unless ``final_norm`` is False. With a
        ``cache`` the sequence also attends to the earlier turns it holds, and is appended
        to it."""
        blocks = torch.zeros_like(seq.kinds) if seq.blocks is None else seq.blocks  # (B, N)
        k_block, k_pad = blocks, seq.valid
        if cache is not None:
            if not cache.is_empty:
                k_block = torch.cat([cache.key_block, blocks], 1)  # (B, L)
                k_pad = torch.cat([cache.key_pad, seq.valid], 1)  # (B, L)
            cache.append_tokens(seq.valid, blocks, seq.positions)
        mask = block_mask_between(blocks, seq.valid, k_block, k_pad)  # (B, N, L)
        return self.decoder(seq.embs, seq.positions, mask, cache,
                            final_norm=final_norm)  # (B, N, D)

    def turn_cache(self, context_state) -> KVCache | None:
        """The cache this call appends to: the context's cache of earlier turns (a fresh
        one at a window's start) when the context keeps one, else None."""
        if context_state is None or not self.context.keeps_cache:
            return None
        cache = self.context.prefix_cache(context_state)
        return KVCache(self.cfg.text.depth) if cache is None else cache

    def action_hidden(self, images, lang_ids, lang_pad, state, context_state=None,
                      slot_ids: Tensor | None = None, seq: ParallelSequence | None = None
                      ) -> tuple[Tensor, ParallelSequence, object]:
        """Hidden states at the placeholders (B, A·Da, D) (the text head's slots: (B, A, D)),
        the sequence they came from and the context's next state (None without one).
        ``seq``: the sequence :meth:`encode` built for these inputs (then not built again)."""
        cache = self.turn_cache(context_state)
        if seq is None:
            seq = self.encode(images, lang_ids, lang_pad, state, context_state, cache, slot_ids)
        reads_raw = self.context.reads_prefix_output and not self.context.reads_normed_output
        h = self.hidden_states(seq, not reads_raw, cache)  # (B, N, D)
        new_state = None if context_state is None else self.context.update(
            context_state, h, cache=cache, images=images)
        if reads_raw:
            h = self.decoder.norm(h)  # (B, N, D) what the head reads, after the final norm
        start = seq.action_start + self.cfg.action_offset  # 1: OFT's released inference
        return h[:, start: start + seq.num_actions], seq, new_state  # (B, A·Da, D)

    # -- training and inference -----------------------------------------------------------
    def initial_state(self, batch: int):
        """The temporal context's state at the start of ``batch`` episodes (or None)."""
        return self.context.initial_state(batch)

    def write_state(self, images, lang_ids, lang_pad, state, context_state, prev=None):
        """The context's next state from a frame observed while a chunk executes (a write
        pass, ``context.observe_every``): the whole sequence on that frame, its actions
        unread (the text head's slots hold the stop token). ``prev`` is not read."""
        slots = None
        if self.text_actions:
            slots = torch.full((state.shape[0], self.cfg.num_action_tokens),
                               self.cfg.stop_token_id, device=state.device)  # (B, K)
        return self.action_hidden(images, lang_ids, lang_pad, state, context_state, slots)[2]

    def forward(self, images: list[Tensor], lang_ids: Tensor, lang_pad: Tensor, state: Tensor,
                actions: Tensor, context_state=None) -> tuple[Tensor, object]:
        """L1 (or squared, ``model.regression_loss``) losses per element (B, A, Da') of the
        regressed chunk against ``actions``
        (normalised, padded to max_action_dim), and the context's next state. The text head
        takes the one-hot discrete actions (B, A, n) (not normalised) and gives each step's
        cross-entropy, repeated over the n dimensions (B, A, n) (their mean is the
        step's). The pruner's statistics of the call are in
        :attr:`last_prune_stat_tensors`."""
        if self.text_actions:
            targets = actions_to_tokens(actions, self.cfg.first_action_id)  # (B, A)
            h, seq, new_state = self.action_hidden(
                images, lang_ids, lang_pad, state, context_state,
                slot_inputs(targets, self.cfg.stop_token_id))  # (B, A, D)
            self.last_prune_stat_tensors = seq.stats
            ce = token_loss(self.language_model.lm_head(h), targets)  # (B, A)
            return ce[..., None].expand(-1, -1, actions.shape[-1]), new_state
        h, seq, new_state = self.action_hidden(images, lang_ids, lang_pad, state,
                                               context_state)
        self.last_prune_stat_tensors = seq.stats
        pred = self.action_head(h)  # (B, A, Da')
        if self.cfg.regression_loss == "mse":
            return F.mse_loss(pred, actions, reduction="none"), new_state
        return F.l1_loss(pred, actions, reduction="none"), new_state

    @torch.no_grad()
    def predict(self, images: list[Tensor], lang_ids: Tensor, lang_pad: Tensor,
                state: Tensor, context_state=None) -> tuple[Tensor, object]:
        """The action chunk (B, A, Da') in one parallel pass (no sampling), and the
        context's next state. The text head decodes its A tokens greedily (A passes) and
        gives them as one-hot actions (B, A, n). The pruner prunes as at inference whatever
        the model's mode."""
        with pruning_for_inference(self.pruner):
            if self.text_actions:
                return self._decode_tokens(images, lang_ids, lang_pad, state, context_state)
            h, seq, new_state = self.action_hidden(images, lang_ids, lang_pad, state,
                                                   context_state)
        self.last_prune_stat_tensors = seq.stats
        return self.action_head(h), new_state  # (B, A, Da')

    def _decode_tokens(self, images, lang_ids, lang_pad, state, context_state):
        """Greedy decoding of the text head -> (one-hot actions (B, A, n), next state: that
        of the last pass, whose slot inputs are the decoded tokens). The sequence (images,
        prompt, the context's parts) is built once; each pass changes its slots only."""
        cfg, last = self.cfg, {}

        def logits_of(slot_ids: Tensor) -> Tensor:
            if "seq" not in last:
                last["seq"] = self.encode(images, lang_ids, lang_pad, state, context_state,
                                          self.turn_cache(context_state), slot_ids)
            else:
                seq = last["seq"]
                embs = seq.embs.clone()  # (B, N, D)
                embs[:, seq.action_slice] = self.decoder.embed(slot_ids)  # (B, A, D)
                last["seq"] = replace(seq, embs=embs)
            h, seq, last["state"] = self.action_hidden(images, lang_ids, lang_pad, state,
                                                       context_state, seq=last["seq"])
            self.last_prune_stat_tensors = seq.stats
            return self.language_model.lm_head(h)  # (B, A, V)

        ids, _ = greedy_decode(logits_of, cfg.num_action_tokens, cfg.stop_token_id,
                               cfg.first_action_id, cfg.text_actions, lang_ids.shape[0],
                               lang_ids.device)  # (B, A)
        actions = tokens_to_actions(ids, cfg.first_action_id, cfg.text_actions,
                                    self.decoder.norm.weight.dtype)  # (B, A, n)
        return actions, last["state"]
