"""A segment-recurrent text language model (LM-RMT) with the memory module of the VLA.

A long token sequence is cut into segments of ``segment_len`` tokens processed in order.
Each segment is one pass of memvla's :class:`~memvla.models.decoder.Decoder` over

    [memory read tokens] [text tokens, causal] [memory write tokens]      (layout "rmt")
    [memory tokens, read = write, see everything] [text tokens, causal]   (layout "smolvla")

with the memory inserted and extracted by :class:`~memvla.layers.memory_tokens.MemoryTokens`
(the module the VLA uses), and carried to the next segment. Optionally, as in
Transformer-XL, the keys/values of the last ``mem_len`` text tokens of the previous
segments are kept per layer (detached: no gradient flows into past segments through them)
and every query of the current segment sees all of them.

Training through the segments uses truncated back-propagation through time over the
memory: with ``mem_backprop_depth = k >= 0`` the carried memory is detached before every
segment s > 0 with s % (k + 1) == 0 (:func:`~memvla.layers.memory_tokens.truncates_before`,
the rule of the VLA's episodes too); k = 0 detaches every segment, k = -1 or any k of at
least the number of segments keeps the whole sequence.

RoPE positions restart at 0 in every segment (cumsum of the real-token flags over
[read memory, text, write memory]). Cached keys are rotated back by the segment's length N
each time a segment passes, so that they sit at negative positions exactly where they
would be if positions ran on across segments; angles stay bounded however long the stream.
With no memory tokens and ``mem_len`` >= the sequence length, the model is therefore a plain
causal decoder over the whole sequence (a test checks this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import DecoderConfig, _positive, _require
from ..layers.kv_cache import KVCache
from ..layers.masks import block_mask_between, positions_from_pad
from ..layers.memory_tokens import LAYOUTS, MemoryTokens, truncates_before
from ..layers.rope import apply_rope
from ..layers.tokens import TokenSegment
from .decoder import Decoder

CACHED_BLOCK = -1  # block id of cached keys: below every block of the current segment


@dataclass
class TextLMConfig:
    """Segment-recurrent LM. ``num_mem_tokens = 0``: no memory tokens; ``mem_len = 0``: no
    Transformer-XL cache; ``mem_backprop_depth``: -1 = whole sequence, k >= 0 = truncated."""

    decoder: DecoderConfig
    segment_len: int = 16
    num_mem_tokens: int = 0
    mem_layout: str = "rmt"
    mem_len: int = 0
    mem_backprop_depth: int = -1
    mem_init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.decoder, dict):
            self.decoder = DecoderConfig(**self.decoder)
        _require(self.decoder.vocab_size > 0, "text_lm.decoder.vocab_size must be > 0 (the "
                 f"language model embeds token ids), got {self.decoder.vocab_size}")
        _positive("text_lm", segment_len=self.segment_len, mem_init_std=self.mem_init_std)
        _require(self.num_mem_tokens >= 0, f"text_lm.num_mem_tokens must be >= 0 (0 turns the "
                 f"memory off, M > 0 memory tokens turn it on), got {self.num_mem_tokens}")
        _require(self.mem_layout in LAYOUTS, f"text_lm.mem_layout must be one of {LAYOUTS} "
                 f"('rmt': read at the start, write at the end; 'smolvla': the same tokens "
                 f"read and write at the start), got {self.mem_layout!r}")
        _require(self.mem_len >= 0, f"text_lm.mem_len must be >= 0 (0 turns the "
                 f"Transformer-XL cache off), got {self.mem_len}")
        _require(self.mem_backprop_depth >= -1, f"text_lm.mem_backprop_depth must be -1 (the "
                 f"whole sequence) or k >= 0 (truncate every k + 1 segments), got "
                 f"{self.mem_backprop_depth}")

    def num_segments(self, length: int) -> int:
        return -(-length // self.segment_len)


@dataclass
class LMState:
    """What is carried from one segment to the next."""

    memory: Tensor | None  # (B, M, D), None without memory tokens
    cache: KVCache | None  # keys/values of the last mem_len text tokens, detached
    segment: int = 0  # index of the next segment (for the truncation rule)


@dataclass
class LMOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None
    state: LMState

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(-1)  # (B, T)


def masked_cross_entropy(logits: Tensor, targets: Tensor, loss_mask: Tensor | None) -> Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T) over loss_mask (B, T)."""
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must be (B, T) = {tuple(logits.shape[:2])}, got "
                         f"{tuple(targets.shape)}")
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
    if loss_mask is None:
        return losses.mean()
    if loss_mask.shape != targets.shape:
        raise ValueError(f"loss_mask must be (B, T) = {tuple(targets.shape)}, got "
                         f"{tuple(loss_mask.shape)}")
    mask = loss_mask.flatten().to(losses.dtype)  # (B*T,)
    if mask.sum() == 0:
        raise ValueError("loss_mask selects no position: nothing to train on")
    return (losses * mask).sum() / mask.sum()


class SegmentRecurrentLM(nn.Module):
    def __init__(self, cfg: TextLMConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder
        self.decoder = Decoder(d)
        self.lm_head = nn.Linear(d.width, d.vocab_size, bias=False)
        self.memory = (MemoryTokens(cfg.num_mem_tokens, d.width, cfg.mem_layout,
                                    cfg.mem_init_std) if cfg.num_mem_tokens > 0 else None)

    # -- streaming ------------------------------------------------------------------------
    def init_state(self, batch: int) -> LMState:
        memory = self.memory.initial(batch) if self.memory is not None else None  # (B, M, D)
        return LMState(memory, None, 0)

    def _assemble(self, embs: Tensor, memory: Tensor | None) -> tuple[TokenSegment, int]:
        """The segment's sequence and the index of its first text token."""
        b, t, _ = embs.shape
        ones = torch.ones(b, t, dtype=torch.long, device=embs.device)
        text = TokenSegment(embs, ones.bool(), ones)  # causal: every token a new block
        if self.memory is None:
            return text, 0
        parts = self.memory.insert([text], memory)
        return TokenSegment.cat(parts), self.memory.num_tokens

    def step_segment(self, state: LMState, tokens: Tensor) -> tuple[Tensor, LMState]:
        """Process one segment of ids (B, T), T <= segment_len -> logits (B, T, V) and the
        state for the next segment (the given state is not changed)."""
        cfg = self.cfg
        if tokens.dim() != 2 or not 0 < tokens.shape[1] <= cfg.segment_len:
            raise ValueError(f"step_segment: tokens must be (B, T) with 1 <= T <= segment_len "
                             f"({cfg.segment_len}), got shape {tuple(tokens.shape)}")
        memory = state.memory
        if memory is not None and truncates_before(state.segment, cfg.mem_backprop_depth):
            memory = memory.detach()  # (B, M, D)
        if memory is not None and memory.shape[0] != tokens.shape[0]:
            raise ValueError(f"step_segment: state is for batch {memory.shape[0]}, tokens have "
                             f"batch {tokens.shape[0]}; call init_state({tokens.shape[0]})")
        t = tokens.shape[1]
        seq, first = self._assemble(self.decoder.embed(tokens), memory)  # (B, N, D)
        blocks = torch.cumsum(seq.flags, 1)  # (B, N)
        positions = positions_from_pad(seq.pad)  # (B, N)
        work = KVCache(len(self.decoder.layers))
        past = state.cache
        if past is not None:
            work.keys, work.values = list(past.keys), list(past.values)
            work.append_tokens(past.key_pad, past.key_block, past.key_pos)
        work.append_tokens(seq.pad, blocks, positions)
        mask = block_mask_between(seq.query_blocks(blocks), seq.pad,
                                  work.key_block, work.key_pad)  # (B, N, L)
        hidden = self.decoder(seq.embs, positions, mask, work)  # (B, N, D)
        logits = self.lm_head(hidden[:, first:first + t])  # (B, T, V)
        new_memory = (self.memory.extract(hidden)  # (B, M, D)
                      if self.memory is not None else None)
        cache = self._next_cache(work, 0 if past is None else len(past), first, t,
                                 seq.length) if cfg.mem_len > 0 else None
        return logits, LMState(new_memory, cache, state.segment + 1)

    def _next_cache(self, work: KVCache, past_len: int, first: int, t: int,
                    seg_len: int) -> KVCache:
        """Keep the cached keys and this segment's text keys, the last mem_len of them,
        detached, shifted by -seg_len positions (rotated back by RoPE)."""
        text = slice(past_len + first, past_len + first + t)
        nxt = KVCache(work.num_layers)

        def pick(x: Tensor, dim: int) -> Tensor:
            old = x.narrow(dim, 0, past_len)  # the cached part of the key axis
            return torch.cat([old, x[(slice(None),) * dim + (text,)]], dim)

        nxt.keys = [pick(k, 2).detach() for k in work.keys]  # (B, Hkv, L', Dh)
        nxt.values = [pick(v, 2).detach() for v in work.values]  # (B, Hkv, L', Dh)
        nxt.append_tokens(pick(work.key_pad, 1), torch.full_like(pick(work.key_block, 1),
                          CACHED_BLOCK), pick(work.key_pos, 1) - seg_len)
        nxt.keep_last(self.cfg.mem_len)
        shift = torch.full_like(nxt.key_pos, -seg_len)  # (B, L')
        cos, sin = self.decoder.rope(shift)  # (B, L', Dh)
        nxt.keys = [apply_rope(k, cos, sin) for k in nxt.keys]  # (B, Hkv, L', Dh)
        return nxt

    # -- whole sequences ------------------------------------------------------------------
    def forward(self, tokens: Tensor, targets: Tensor | None = None,
                loss_mask: Tensor | None = None, state: LMState | None = None) -> LMOutput:
        """ids (B, T_total) cut into segments of segment_len, run in order carrying the memory
        (and the cache). targets (B, T_total): what each position must predict (for plain
        language modelling, the ids shifted by one); the loss is the mean cross-entropy over
        loss_mask (B, T_total) bool (every position when None)."""
        cfg = self.cfg
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        seg = cfg.segment_len
        n_seg = cfg.num_segments(tokens.shape[1])
        state = self.init_state(tokens.shape[0]) if state is None else state
        logits = []
        for s in range(n_seg):
            out, state = self.step_segment(state, tokens[:, s * seg:(s + 1) * seg])
            logits.append(out)
        all_logits = torch.cat(logits, 1)  # (B, T, V)
        loss = None if targets is None else masked_cross_entropy(all_logits, targets, loss_mask)
        return LMOutput(all_logits, loss, state)

