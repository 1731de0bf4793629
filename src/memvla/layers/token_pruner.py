"""LightVLA's adaptive visual-token pruner: parameter-free voting among the patches.

Patches (B, P, D) and task tokens (B, T, D) are RMS-normalised (no weight). Every patch
asks the task tokens a question (single-head attention, padding / placeholder keys masked
out by ``task_valid``), giving a task-aware query (B, P, D); the query scores every patch,
``score = queries · patchesᵀ / √D / temperature`` (B, P, P), and each patch (row) votes
for its argmax (column).

- Inference (``eval()``): the unique winners are kept, in their original order, with their
  original (RoPE) positions. Samples keep different counts, so the batch is padded to the
  largest count and a validity mask says which slots are real. ``min_keep`` / ``max_keep``
  bound the count (most-voted first, ties by the strongest vote received, then by index).
  With ``duplicates="drop"`` ``max_keep`` bounds training's kept slots the same way (the
  winners of the noisy votes), so training attends what inference keeps.
- Training (``train()``): the length is kept. Noise (``rand · noise_scale`` as released, or
  Gumbel) is added to the scores, and ``patches ← W @ patches`` with the straight-through
  weights ``W = one_hot(argmax) + (softmax − softmax.detach())``: the hard selection
  forward, the softmax's gradient backward. The noise scale decays linearly to 0 over
  training (:meth:`TokenPruner.set_progress`). A patch voted for by n patches then fills n
  slots (``duplicates="keep"``, as released), where inference keeps it once: the model
  learns to read a patch's weight from its copies, which inference does not have.
  ``duplicates="drop"`` (the default) masks the copies: slot j holds patch j (the row of
  its first voter, with that row's straight-through gradient) if it was voted for and is
  masked otherwise, so training attends exactly the tokens and positions inference keeps.

Query modes: ``lightvla`` (as released) = the attention output alone. It is a convex
mixture of the T task vectors, so with a short prompt all queries are nearly the same and
every patch votes for the same 2–3 winners (the collapse seen on prefix/suffix models).
``residual`` = attention output + ``residual_scale / √D`` · patch: each query keeps some
of its own patch's identity, so different patches ask different questions and vote for
different winners. The self-similarity of a normed patch is D against ~√D for another one,
hence the 1/√D: with ``residual_scale`` about 1 the self term and the task term are of the
same size and a short prompt keeps a LightVLA-like share (about 10–15% of 512 random
patches with 3 task tokens, whatever D); a larger scale keeps more (every patch votes for
itself as the scale grows), a smaller one approaches the collapsing ``lightvla`` query.
``min_keep`` is a second, blunter fix: a floor on the count, most-voted first.

Centring (``center``, the default): the patches' mean over the image(s) is subtracted before
they are normed and scored. Training aligns the visual tokens (the task loss does it, in an
unpruned model too; the straight-through gradient with duplicates kept then rewards copying
a useful patch into more slots): normed, aligned patches are nearly one vector plus small
differences, every patch votes for the same few winners and a trained flow-matching pruner
kept 1–4 of 16 (``memvla bench pruning-collapse``). The shared component tells no patch
from another; without it the differences are what gets scored.

Axis letters: P = visual tokens of all cameras together, T = task tokens (not time here),
P' = kept slots.

:func:`prune_reference` is the slow per-sample twin of the batched inference path.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import PrunerConfig
from .norm import rms_norm

NORM_EPS = 1e-6


def plain_rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMS norm over the last axis (computed in float32)."""
    return rms_norm(x, None, NORM_EPS)


# -- scores -----------------------------------------------------------------------------------
def task_queries(patches_n: Tensor, task_n: Tensor, task_valid: Tensor,
                 query: str = "lightvla", residual_scale: float = 1.0) -> Tensor:
    """Task-aware queries (B, P, D) from normed patches (B, P, D) and normed task tokens
    (B, T, D); ``task_valid`` (B, T) bool masks padding / placeholders out of the keys.
    A sample without any valid task token gets a zero attention output."""
    any_valid = task_valid.any(1)  # (B,)
    mask = task_valid | ~any_valid[:, None]  # (B, T) never empty: no NaN
    attn = F.scaled_dot_product_attention(patches_n[:, None], task_n[:, None], task_n[:, None],
                                          attn_mask=mask[:, None, None, :])[:, 0]  # (B, P, D)
    attn = attn * any_valid[:, None, None].to(attn.dtype)  # (B, P, D)
    if query == "residual":
        attn = attn + residual_scale / math.sqrt(patches_n.shape[-1]) * patches_n  # (B, P, D)
    elif query != "lightvla":
        raise ValueError(f"token pruner: query must be 'lightvla' or 'residual', got {query!r}")
    return plain_rms_norm(attn)  # (B, P, D)


def task_queries_ref(patches_n: Tensor, task_n: Tensor, task_valid: Tensor,
                     query: str = "lightvla", residual_scale: float = 1.0) -> Tensor:
    """Slow twin of :func:`task_queries`: explicit float32 softmax, sample by sample."""
    out = []
    for b in range(patches_n.shape[0]):
        p, t = patches_n[b].float(), task_n[b][task_valid[b]].float()  # (P, D), (T', D)
        if t.shape[0]:
            w = (p @ t.T / math.sqrt(p.shape[-1])).softmax(-1)  # (P, T')
            a = w @ t  # (P, D)
        else:
            a = torch.zeros_like(p)
        out.append(a + residual_scale / math.sqrt(p.shape[-1]) * p if query == "residual"
                   else a)
    return plain_rms_norm(torch.stack(out)).to(patches_n.dtype)  # (B, P, D)


def centred(patches: Tensor, center: bool = True) -> Tensor:
    """``patches`` (B, P, D) less their mean over P (the component they share), if
    ``center``."""
    return patches - patches.mean(1, keepdim=True) if center else patches  # (B, P, D)


def prune_scores(patches: Tensor, task: Tensor, task_valid: Tensor, query: str = "lightvla",
                 temperature: float = 1.0, residual_scale: float = 1.0,
                 center: bool = False) -> tuple[Tensor, Tensor]:
    """-> (scores (B, P, P) float32, row i scoring every patch j for patch i's vote;
    queries (B, P, D)). ``center``: score the patches less their mean (see the module)."""
    p, t = plain_rms_norm(centred(patches, center)), plain_rms_norm(task)  # (B, P, D), (B, T, D)
    q = task_queries(p, t, task_valid, query, residual_scale)  # (B, P, D)
    score = q.float() @ p.float().transpose(1, 2)  # (B, P, P)
    return score / (math.sqrt(p.shape[-1]) * temperature), q


# -- inference: hard selection ----------------------------------------------------------------
def count_votes(votes: Tensor) -> Tensor:
    """Votes each patch receives (B, P), from every patch's vote ``votes`` (B, P)."""
    return torch.zeros_like(votes).scatter_add_(1, votes, torch.ones_like(votes))  # (B, P)


def vote_counts(score: Tensor) -> Tensor:
    """Votes each patch receives (B, P): every row votes for its argmax column."""
    return count_votes(score.argmax(-1))  # (B, P)


def priority_order(counts: Tensor, strength: Tensor) -> Tensor:
    """Patch indices (B, P) most-voted first; ties by ``strength`` (descending), then index."""
    by_strength = torch.sort(strength, dim=1, descending=True, stable=True).indices  # (B, P)
    c = counts.gather(1, by_strength)  # (B, P)
    return by_strength.gather(1, torch.sort(c, dim=1, descending=True, stable=True).indices)


def bounded_winners(counts: Tensor, strength: Tensor, min_keep: int = 0,
                    max_keep: int = 0) -> Tensor:
    """Kept patches (B, P) bool from the votes each received ``counts`` (B, P): the
    winners, at least ``min_keep`` and at most ``max_keep`` (0 = no bound) of them,
    most-voted first (ties by ``strength`` (B, P), the strongest vote received)."""
    voted = counts > 0  # (B, P)
    if min_keep == 0 and max_keep == 0:
        return voted
    b, p = counts.shape
    n = voted.sum(1).clamp(min=min(min_keep, p))  # (B,)
    if max_keep:
        n = n.clamp(max=max_keep)
    order = priority_order(counts, strength)  # (B, P)
    ranks = torch.arange(p, device=counts.device).expand(b, p)  # (B, P)
    rank = torch.empty_like(order).scatter_(1, order, ranks)  # (B, P) rank of each patch
    return rank < n[:, None]


def keep_mask(score: Tensor, min_keep: int = 0, max_keep: int = 0) -> Tensor:
    """Kept patches (B, P) bool: the vote winners of ``score`` (B, P, P), at least
    ``min_keep`` and at most ``max_keep`` (0 = no bound) of them, most-voted first."""
    return bounded_winners(vote_counts(score), score.max(1).values, min_keep, max_keep)


def kept_first(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``mask`` (B, P) bool -> (indices (B, K) of the kept entries first, in original order,
    K = the batch's largest count (at least 1); valid (B, K); kept counts (B,))."""
    kept = mask.sum(1)  # (B,)
    k = max(int(kept.max()), 1)
    idx = torch.sort((~mask).long(), dim=1, stable=True).indices[:, :k]  # (B, K) kept first
    valid = torch.arange(k, device=mask.device)[None] < kept[:, None]  # (B, K)
    return idx, valid, kept


def gather_kept(patches: Tensor, positions: Tensor, mask: Tensor):
    """Kept patches in original order, padded to the batch's largest count ->
    (tokens (B, K, D) zero in padding, valid (B, K), positions (B, K), kept (B,)).
    Padding slots repeat the last kept position (they are masked anyway)."""
    idx, valid, kept = kept_first(mask)
    d = patches.shape[-1]
    tokens = patches.gather(1, idx[..., None].expand(-1, -1, d))  # (B, K, D)
    tokens = torch.where(valid[..., None], tokens, torch.zeros_like(tokens))  # (B, K, D)
    pos = positions.gather(1, idx)  # (B, K)
    last = pos.gather(1, (kept - 1).clamp(min=0)[:, None])  # (B, 1)
    return tokens, valid, torch.where(valid, pos, last), kept


def prune_reference(patches: Tensor, positions: Tensor, task: Tensor, task_valid: Tensor,
                    query: str = "lightvla", temperature: float = 1.0, min_keep: int = 0,
                    max_keep: int = 0, residual_scale: float = 1.0,
                    center: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Slow twin of the batched inference path: one sample at a time, the reference
    queries (:func:`task_queries_ref`), Python sets and sorts -> (tokens (B, K, D),
    valid (B, K), positions (B, K), kept (B,))."""
    rows = []
    for b in range(patches.shape[0]):
        p_n = plain_rms_norm(centred(patches[b:b + 1], center))  # (1, P, D)
        t_n = plain_rms_norm(task[b:b + 1])  # (1, T, D)
        q = task_queries_ref(p_n, t_n, task_valid[b:b + 1], query, residual_scale)  # (1, P, D)
        score = q.float() @ p_n.float().transpose(1, 2) / (
            math.sqrt(p_n.shape[-1]) * temperature)  # (1, P, P)
        s = score[0]  # (P, P)
        p = s.shape[0]
        votes = s.argmax(-1).tolist()
        count = {j: votes.count(j) for j in range(p)}
        strength = s.max(0).values.tolist()
        order = sorted(range(p), key=lambda j: (-count[j], -strength[j], j))
        n = max(len(set(votes)), min(min_keep, p))
        n = min(n, max_keep) if max_keep else n
        rows.append(sorted(order[:n]))
    k = max(len(r) for r in rows)
    d = patches.shape[-1]
    tokens = patches.new_zeros(len(rows), k, d)  # (B, K, D)
    valid = torch.zeros(len(rows), k, dtype=torch.bool, device=patches.device)  # (B, K)
    pos = torch.zeros(len(rows), k, dtype=torch.long, device=patches.device)  # (B, K)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = patches[b, r]
        valid[b, : len(r)] = True
        pos[b, : len(r)] = positions[b, r]
        pos[b, len(r):] = positions[b, r[-1]]
    return tokens, valid, pos, valid.sum(1)


# -- training: straight-through soft selection ------------------------------------------------
def score_noise(score: Tensor, kind: str) -> Tensor:
    """Unit-scale noise for the scores: uniform [0, 1) (released code) or Gumbel(0, 1)."""
    if kind == "uniform":
        return torch.rand_like(score)
    if kind == "gumbel":
        u = torch.rand_like(score).clamp_(1e-10, 1.0 - 1e-7)
        return -torch.log(-torch.log(u))
    raise ValueError(f"token pruner: noise must be 'uniform' or 'gumbel', got {kind!r}")


def straight_through_weights(score: Tensor, noise_scale: float = 0.0,
                             noise: str = "uniform") -> Tensor:
    """W (B, P, P): exactly ``one_hot(argmax(score + noise))`` forward, the gradient of
    ``softmax(score + noise)`` backward. ``noise_scale`` 0 adds nothing (deterministic)."""
    if noise_scale > 0:
        score = score + noise_scale * score_noise(score, noise)  # (B, P, P)
    soft = score.softmax(-1)  # (B, P, P)
    hard = F.one_hot(score.argmax(-1), score.shape[-1]).to(soft.dtype)  # (B, P, P)
    return hard + (soft - soft.detach())


def one_slot_per_winner(mixed: Tensor, votes: Tensor,
                        kept: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Training as inference sees it: ``mixed`` (B, P, D) = W @ patches, whose slot i is
    (forward) a copy of patch ``votes[:, i]`` -> (tokens (B, P, D), valid (B, P)): slot j
    holds the first voter's row for winner j (forward: patch j itself, with its gradient
    through the straight-through weights) and is valid iff j was voted for; the other slots
    are zero and masked. Each voted patch counts once, in its own place, as it does after
    :func:`gather_kept`. ``kept`` (B, P) bool, a subset of the voted patches (the winners
    within a cap), keeps only those valid (default: every voted patch)."""
    p = votes.shape[1]
    voted_for = F.one_hot(votes, p).bool()  # (B, P voter, P winner)
    valid = voted_for.any(1) if kept is None else kept  # (B, P)
    first = voted_for.to(torch.uint8).argmax(1)  # (B, P) first voter of each patch
    tokens = mixed.gather(1, first[..., None].expand(-1, -1, mixed.shape[-1]))  # (B, P, D)
    return torch.where(valid[..., None], tokens, torch.zeros_like(tokens)), valid


# -- module -----------------------------------------------------------------------------------
@contextmanager
def pruning_for_inference(pruner: TokenPruner | None):
    """Inside: ``pruner`` prunes as at inference (drops tokens; no noise, no
    straight-through mixing) even if its model is in train mode; its mode is restored
    after. A no-op for None. Sampling / predicting a chunk is inference."""
    was = pruner is not None and pruner.training
    if was:
        pruner.eval()
    try:
        yield
    finally:
        if was:
            pruner.train()


def stats_to_floats(stats: dict[str, Tensor]) -> dict[str, float]:
    """0-dim statistic tensors -> floats, with one host synchronisation for all."""
    if not stats:
        return {}
    values = torch.stack([v.float() for v in stats.values()]).tolist()
    return dict(zip(stats, values, strict=True))


@dataclass
class PruneOutput:
    tokens: Tensor  # (B, P', D) kept (inference) or re-mixed (training) patches
    valid: Tensor  # (B, P') bool, False for padding slots
    positions: Tensor  # (B, P') long, the original positions of the kept patches
    kept: Tensor  # (B,) long, unique vote winners per sample (what inference keeps)
    stat_tensors: dict[str, Tensor] = field(default_factory=dict)  # 0-dim, on the device

    @property
    def stats(self) -> dict[str, float]:
        """The collapse statistics as floats (synchronises with the device)."""
        return stats_to_floats(self.stat_tensors)


class TokenPruner(nn.Module):
    """``num_patches``: the visual tokens per sample it expects (0 = whatever it is given).
    ``noise_scale`` starts at ``cfg.noise_scale``; :meth:`set_progress` decays it."""

    def __init__(self, cfg: PrunerConfig, num_patches: int):
        super().__init__()
        if num_patches < 0:
            raise ValueError(f"token pruner: num_patches must be >= 0, got {num_patches}")
        self.cfg = cfg
        self.num_patches = num_patches
        self.noise_scale: float = float(cfg.noise_scale)
        self.last_kept: Tensor | None = None  # (B,) kept counts of the last call
        self.last_votes: Tensor | None = None  # (B, P) votes per patch of the last call
        self.last_num_patches = 0  # P of the last call

    def set_progress(self, frac: float) -> None:
        """Training progress in [0, 1]: noise_scale = cfg.noise_scale · (1 − frac)."""
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"token pruner: progress must be in [0, 1], got {frac}")
        self.noise_scale = float(self.cfg.noise_scale) * (1.0 - frac)

    def _check(self, patches: Tensor, positions: Tensor, task: Tensor,
               task_valid: Tensor) -> None:
        if patches.dim() != 3 or task.dim() != 3:
            raise ValueError(f"token pruner: patches and task must be (B, P, D) and (B, T, D), "
                             f"got {tuple(patches.shape)} and {tuple(task.shape)}")
        b, p, d = patches.shape
        if self.num_patches and p != self.num_patches:
            raise ValueError(f"model.pruner.num_patches is {self.num_patches} (the visual "
                             f"tokens per sample the pruner was built for) but the images give "
                             f"{p}; set model.pruner.num_patches={p} (or 0 to derive it from "
                             "the cameras)")
        if task.shape[0] != b or task.shape[2] != d:
            raise ValueError(f"token pruner: task must be (B, T, D) = ({b}, T, {d}), got "
                             f"{tuple(task.shape)}")
        if tuple(positions.shape) != (b, p):
            raise ValueError(f"token pruner: positions must be (B, P) = {(b, p)}, got "
                             f"{tuple(positions.shape)}")
        if tuple(task_valid.shape) != tuple(task.shape[:2]) or task_valid.dtype != torch.bool:
            raise ValueError(f"token pruner: task_valid must be a bool (B, T) = "
                             f"{tuple(task.shape[:2])} tensor, got {task_valid.dtype} "
                             f"{tuple(task_valid.shape)}")

    def forward(self, patches: Tensor, positions: Tensor, task: Tensor,
                task_valid: Tensor, values=None) -> PruneOutput:
        """patches (B, P, D), positions (B, P) long, task (B, T, D), task_valid (B, T) bool.
        ``values``: the patches are scored, the tokens selected are ``values(kept)`` (B, P,
        D) for the kept patches (B, P) bool (default the patches themselves; a preview of
        the tokens is scored in :mod:`memvla.layers.vision_drop`)."""
        self._check(patches, positions, task, task_valid)
        c = self.cfg
        score, queries = prune_scores(patches, task, task_valid, c.query, c.temperature,
                                      c.residual_scale, c.center)
        if self.training:
            if c.gradient == "none":
                score = score.detach()  # the hard selection alone
            w = straight_through_weights(score, self.noise_scale, c.noise)  # (B, P, P)
            votes = w.detach().argmax(-1)  # (B, P) the noisy votes actually used
            counts = count_votes(votes)  # (B, P)
            kept = counts > 0  # (B, P)
            if c.duplicates == "drop" and c.max_keep:  # the cap inference applies
                kept = bounded_winners(counts, score.detach().max(1).values, 0, c.max_keep)
            chosen = patches if values is None else values(kept)  # (B, P, D)
            tokens = (w.to(chosen.dtype) @ chosen)  # (B, P, D)
            if c.duplicates == "drop":
                tokens, valid = one_slot_per_winner(tokens, votes, kept)
            else:
                valid = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
            out = PruneOutput(tokens, valid, positions, kept.sum(1))
        else:
            mask = keep_mask(score, c.min_keep, c.max_keep)  # (B, P)
            chosen = patches if values is None else values(mask)  # (B, P, D)
            tokens, valid, pos, kept = gather_kept(chosen, positions, mask)
            counts = vote_counts(score)  # (B, P)
            out = PruneOutput(tokens, valid, pos, kept)
        out.stat_tensors = self._stats(out.kept, counts, queries)
        self.last_kept = out.kept.detach()  # on the device: read (a sync) only when wanted
        self.last_votes = counts.detach()  # (B, P) votes each patch received
        self.last_num_patches = patches.shape[1]
        return out

    @torch.no_grad()
    def _stats(self, kept: Tensor, counts: Tensor, queries: Tensor) -> dict[str, Tensor]:
        """Collapse statistics, as 0-dim tensors on the device (no host synchronisation):
        mean kept count, its share of P, the spread of the queries across patches (≈ 0 when
        every patch asks the same question) and the share of the votes won by the
        most-voted patch."""
        p = counts.shape[1]
        mean_kept = kept.float().mean()
        spread = queries.float().std(1).mean() if p > 1 else mean_kept.new_zeros(())
        return {"kept": mean_kept, "keep_ratio": mean_kept / p, "query_std": spread,
                "top_vote_share": counts.max(1).values.float().mean() / p}

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"num_patches={self.num_patches}, query={c.query!r}, noise={c.noise!r}, "
                f"noise_scale={self.noise_scale}, temperature={c.temperature}, "
                f"center={c.center}, duplicates={c.duplicates!r}, min_keep={c.min_keep}, "
                f"max_keep={c.max_keep}")
