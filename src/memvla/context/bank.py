"""A within-episode memory bank (MemoryVLA's, as a temporal context): what the policy made
of each chunk's observation, one vector per chunk, retrieved by similarity.

- **entry**: a write token at the end of the prefix, in an attention block of its own (it
  sees the whole prefix, nothing of the prefix sees it: RMT's write layout); its output
  (bounded as memory tokens' is, ``context.write``: the residual stream clipped to
  ``context.max_rms``, or after the backbone's final norm) is written to the bank after the
  chunk
  (:func:`memvla.layers.memory_bank.bank_write`, at most ``context.bank_size`` entries:
  when full the most similar adjacent pair merges). MemoryVLA's "cognitive" memory: what
  the backbone made of the observation, not its raw pixels (mean-pooled image tokens of a
  cue frame and of the frames after it are 0.999 similar).
- **query**: the current observation pooled (each camera's image tokens averaged, then
  the cameras), projected (``query``); it scores the projected entries (``key``) by cosine
  similarity. ``context.bank_read``:

  - ``topk``: the top ``context.bank_topk`` enter the prefix before the model's own
    tokens, oldest first, each through ``value`` and scaled by a learned gate on its score
    (sigmoid(a·cos + b): an entry that does not fit the query is shut out; the bounded
    score keeps the gate off saturation). An entry outside the top k gets no gradient: a
    cue unlike the frames after it is the least similar to them, so once the bank holds
    more than k entries it is never read, nor learned to be read.
  - ``attention``: ``context.bank_topk`` read tokens, each a softmax-weighted mix (over
    every held entry, at a learned temperature) of the entry plus ``value`` of it; the k
    queries are the projected observation plus a learned offset each
    (:func:`memvla.layers.memory_bank.bank_attend`).

- **chain** (``context.bank_chain``): the write token starts from the newest entry (the
  learned write vector plus it), so each entry is written from the last one, as memory
  tokens write the next memory from theirs, and a cue's gradient comes back through every
  chunk in between. Without it an entry is reached only from the chunks that read it, and
  on remember-color the write never learns the cue (docs/retrieval.md).

The state is ``keys`` (B, S, D), ``count`` (B, S), ``time`` (B, S) and ``turn`` (chunks
done); while a chunk is being computed it also holds the pooled observation of that chunk
(``observed``, put there when the model encodes its images and taken out by
:meth:`BankContext.update`). Trained through the episode like memory tokens (the entries
keep their graph within ``train.bptt_depth``). What it reads does not grow with the
episode: S entries at most, k of them in the prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import ContextConfig
from ..layers.memory_bank import bank_attend, bank_newest, bank_retrieve, bank_write
from ..layers.memory_tokens import bound_written
from ..layers.tokens import TokenSegment
from .base import TemporalContext


class BankContext(TemporalContext):
    kind = "bank"

    def __init__(self, cfg: ContextConfig, width: int):
        super().__init__()
        self.cfg = cfg
        self.width = width
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        if cfg.bank_read == "topk":
            self.gate = nn.Parameter(torch.tensor([4.0, 0.0]))  # a, b of sigmoid(a·cos + b)
        self.write = nn.Parameter(torch.randn(1, width) * 0.02)  # the write token
        if cfg.bank_read == "attention":
            self.offsets = nn.Parameter(torch.randn(cfg.bank_topk, width) * 0.02)  # (K, D)
            self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.last_retrieved: dict[str, Tensor] = {}  # of the last prefix

    @property
    def recurrent(self) -> bool:
        return True

    @property
    def reads_prefix_output(self) -> bool:
        return True

    @property
    def reads_normed_output(self) -> bool:
        return self.cfg.write == "norm"

    def initial_state(self, batch: int) -> dict:
        dev = self.query.weight.device
        s = self.cfg.bank_size
        return {"keys": torch.zeros(batch, s, self.width, device=dev),
                "count": torch.zeros(batch, s, device=dev),
                "time": torch.zeros(batch, s, device=dev), "turn": 0}

    def encode_images(self, encoder, images: Tensor, camera: int, state: dict) -> Tensor:
        tokens = encoder(images)  # (B, Ti, D)
        if state is not None:  # this chunk's pooled observation, camera by camera
            seen = state.setdefault("observed", [])
            del seen[camera:]
            seen.append(tokens.mean(1))  # (B, D)
        return tokens

    def observation(self, state: dict) -> Tensor:
        seen = state.get("observed")
        if not seen:
            raise ValueError("context.kind='bank': the model encoded no image for this chunk "
                             "(the bank pools the observation's image tokens)")
        return torch.stack(seen, 0).mean(0)  # (B, D)

    def scores(self, state: dict) -> Tensor:
        """Cosine similarity (B, S) of the projected current observation to every entry
        (bounded, so that the gate on it never starts saturated)."""
        q = F.normalize(self.query(self.observation(state)), dim=-1)  # (B, D)
        k = F.normalize(self.key(state["keys"].to(q.dtype)), dim=-1)  # (B, S, D)
        return (k @ q[..., None])[..., 0]  # (B, S)

    def extend_prefix(self, parts: list[TokenSegment], state: dict,
                      encoder=None) -> list[TokenSegment]:
        read = self.read_topk if self.cfg.bank_read == "topk" else self.read_attention
        segment = read(state)
        write = self.write[None].expand(segment.embs.shape[0], -1, -1)  # (B, 1, D)
        if self.cfg.bank_chain:  # written from the newest entry, as memory tokens are
            write = write + bank_newest(state["keys"].to(write.dtype), state["count"])[:, None]
        # the write token: a block of its own, at the end
        return [segment, *parts, TokenSegment.full(write, 1, 0)]

    def read_topk(self, state: dict) -> TokenSegment:
        """The top-k entries by similarity, gated by it (``bank_read='topk'``)."""
        scores = self.scores(state)  # (B, S)
        keys = state["keys"].to(scores.dtype)  # (B, S, D)
        idx, top, exists = bank_retrieve(scores, state["count"], self.cfg.bank_topk)
        got = keys.gather(1, idx[..., None].expand(-1, -1, keys.shape[-1]))  # (B, k, D)
        a, b = self.gate
        gate = torch.sigmoid(a * top + b) * exists  # (B, k)
        tokens = self.value(got) * gate[..., None]  # (B, k, D)
        self.last_retrieved = {"entries": (state["count"] > 0).sum(1),
                               "retrieved": exists.sum(1), "gate": gate.detach()}
        return TokenSegment(tokens, exists, torch.zeros_like(idx))

    def read_attention(self, state: dict) -> TokenSegment:
        """K tokens, each an attention-weighted mix of every held entry
        (``bank_read='attention'``)."""
        q = self.query(self.observation(state))[:, None] + self.offsets  # (B, K, D)
        q = F.normalize(q, dim=-1)
        keys = state["keys"].to(q.dtype)  # (B, S, D)
        k = F.normalize(self.key(keys), dim=-1)  # (B, S, D)
        weights = bank_attend(q @ k.transpose(1, 2) * self.log_temperature.exp(),
                              state["count"])  # (B, K, S)
        tokens = weights @ (keys + self.value(keys))  # (B, K, D)
        entries = (state["count"] > 0).sum(1)  # (B,)
        exists = (entries > 0)[:, None].expand(-1, tokens.shape[1])  # (B, K)
        self.last_retrieved = {"entries": entries, "retrieved": exists.sum(1),
                               "weights": weights.detach()}
        return TokenSegment(tokens, exists, torch.zeros(exists.shape, dtype=torch.long,
                                                        device=tokens.device))

    def update(self, state: dict, hidden: Tensor, cache=None, images=None) -> dict:
        entry = bound_written(hidden[:, -1:], self.cfg.write, self.cfg.max_rms)[:, 0]  # (B, D)
        state.pop("observed")  # the carried state keeps its structure from chunk to chunk
        keys, count, time = bank_write(state["keys"].to(entry.dtype), state["count"],
                                       state["time"], entry, float(state["turn"]),
                                       self.cfg.bank_merge)
        return {"keys": keys, "count": count, "time": time, "turn": state["turn"] + 1}

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"bank_size={c.bank_size}, bank_topk={c.bank_topk}, bank_merge={c.bank_merge}, "
                f"bank_read={c.bank_read!r}, bank_chain={c.bank_chain}")
