"""A bounded memory bank of observation vectors (MemoryVLA's within-episode bank).

A bank holds up to S entries per sample, oldest first in slots 0 … n−1: ``keys`` (B, S, D),
``count`` (B, S) (how many observations an entry merges; 0 = an empty slot) and ``time``
(B, S) (the step of its newest observation). Writing an observation e at step t
(:func:`bank_write`):

1. with a ``threshold``, if the newest entry is a near-duplicate of e (cosine ≥
   ``threshold``), e merges into it (count-weighted mean, time t);
2. else e is appended; when the bank is full, the most similar pair of adjacent entries is
   merged first to make room (the oldest such pair on a tie), so the bank never exceeds S
   and what is distinct, e.g. a cue among repeated frames, stays while the repeats
   collapse. (Pooled image features share a large common part: a cue frame and the frames
   after it can be 0.999 similar while repeated frames are 1.0, so an eager threshold below
   that would merge the cue away; the default has none.)

Reading, two ways (``context.bank_read``): :func:`bank_retrieve`, the top-k entries by a
score per entry (the context's cosine similarity to a query), returned oldest first, with
their scores and whether each exists; or :func:`bank_attend`, each of k queries reading a
softmax-weighted mix of every held entry (MemoryVLA's retrieval by attention), which gives
every entry a gradient, not only those that made the top k. :func:`bank_write_ref` and
:func:`bank_attend_ref` are the loop twins of :func:`bank_write` and :func:`bank_attend`.
:func:`bank_newest` is the newest entry (what a chained write starts from).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _merge(k1: Tensor, c1: Tensor, k2: Tensor, c2: Tensor) -> Tensor:
    """Count-weighted mean of two entries (..., D) with counts (...)."""
    w = (c1 / (c1 + c2).clamp_min(1e-9))[..., None]
    return w * k1 + (1 - w) * k2


def bank_write(keys: Tensor, count: Tensor, time: Tensor, entry: Tensor, t: float,
               threshold: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Write ``entry`` (B, D) at step ``t`` into the bank (keys (B, S, D), count (B, S),
    time (B, S)) -> the new (keys, count, time)."""
    b, s, _ = keys.shape
    rows = torch.arange(b, device=keys.device)
    n = (count > 0).sum(1)  # (B,) entries held
    last = (n - 1).clamp_min(0)  # (B,)
    newest = bank_newest(keys, count)  # (B, D); zero (and unused) for an empty bank
    sim_last = F.cosine_similarity(newest, entry, dim=-1)  # (B,)
    merge_last = (n > 0) & (sim_last >= (2.0 if threshold is None else threshold))  # (B,)
    full = (n == s) & ~merge_last  # (B,)

    # case 1: merge into the newest entry
    merged_last = _merge(newest, count[rows, last], entry, torch.ones_like(n))
    k1, c1, t1 = keys.clone(), count.clone(), time.clone()
    k1[rows, last], c1[rows, last], t1[rows, last] = merged_last, count[rows, last] + 1, t

    # case 2: append at slot n (not full)
    slot = n.clamp_max(s - 1)  # (B,)
    k2, c2, t2 = keys.clone(), count.clone(), time.clone()
    k2[rows, slot], c2[rows, slot], t2[rows, slot] = entry, 1.0, t

    # case 3 (full): merge the chosen adjacent pair (i, i + 1), shift left, append at S − 1
    if s > 1:
        sims = F.cosine_similarity(keys[:, :-1], keys[:, 1:], dim=-1)  # (B, S − 1)
        i = sims.argmax(1)  # (B,) the most similar pair (the first, i.e. oldest, on a tie)
        j = torch.arange(s, device=keys.device)[None]  # (1, S)
        src = torch.where(j > i[:, None], j + 1, j).clamp_max(s - 1)  # (B, S)
        k3 = keys.gather(1, src[..., None].expand_as(keys))  # (B, S, D)
        c3, t3 = count.gather(1, src), time.gather(1, src)  # (B, S)
        k3[rows, i] = _merge(keys[rows, i], count[rows, i], keys[rows, i + 1],
                             count[rows, i + 1])
        c3[rows, i] = count[rows, i] + count[rows, i + 1]
        t3[rows, i] = time[rows, i + 1]
        k3[:, -1], c3[:, -1], t3[:, -1] = entry, 1.0, t
    else:  # a bank of one entry: the pair is the entry and the new observation
        k3, c3, t3 = k1, c1, t1

    def pick(x: Tensor, y: Tensor, z: Tensor) -> Tensor:  # case 1, 2 or 3 per sample
        shape = (-1,) + (1,) * (x.dim() - 1)
        return torch.where(merge_last.view(shape), x, torch.where(full.view(shape), z, y))

    return pick(k1, k2, k3), pick(c1, c2, c3), pick(t1, t2, t3)


def bank_write_ref(keys: Tensor, count: Tensor, time: Tensor, entry: Tensor, t: float,
                   threshold: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Loop twin of :func:`bank_write`: per sample, on Python lists of entries."""
    outs = ([], [], [])
    s = keys.shape[1]
    for bi in range(keys.shape[0]):
        held = [(keys[bi, i], float(count[bi, i]), float(time[bi, i])) for i in range(s)
                if count[bi, i] > 0]
        e = entry[bi]

        def cos(x: Tensor, y: Tensor) -> float:
            return float(F.cosine_similarity(x, y, dim=0))

        def merged(a, c):
            return (_merge(a[0], torch.tensor(a[1]), c[0], torch.tensor(c[1])), a[1] + c[1],
                    c[2])

        if held and threshold is not None and cos(held[-1][0], e) >= threshold:
            held[-1] = merged(held[-1], (e, 1.0, t))
        else:
            if len(held) == s:
                if s == 1:
                    held = [merged(held[0], (e, 1.0, t))]
                else:
                    sims = [cos(held[i][0], held[i + 1][0]) for i in range(s - 1)]
                    i = max(range(s - 1), key=lambda q: (sims[q], -q))
                    held[i:i + 2] = [merged(held[i], held[i + 1])]
            if len(held) < s:
                held.append((e, 1.0, t))
        pad = s - len(held)
        outs[0].append(torch.stack([h[0] for h in held] + [torch.zeros_like(e)] * pad))
        outs[1].append(torch.tensor([h[1] for h in held] + [0.0] * pad))
        outs[2].append(torch.tensor([h[2] for h in held] + [0.0] * pad))
    return (torch.stack(outs[0]), torch.stack(outs[1]).to(count.dtype),
            torch.stack(outs[2]).to(time.dtype))


def bank_retrieve(scores: Tensor, count: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``k`` entries of a bank by ``scores`` (B, S) (e.g. the query's similarity to
    each entry) -> (indices (B, k) oldest first, their scores (B, k), exists (B, k): False
    where the bank holds fewer than k entries)."""
    k = min(k, scores.shape[1])
    held = count > 0  # (B, S)
    top = scores.masked_fill(~held, float("-inf")).topk(k, dim=1).indices  # (B, k)
    idx = top.sort(1).values  # (B, k) oldest first
    return idx, scores.gather(1, idx), held.gather(1, idx)


def bank_attend(scores: Tensor, count: Tensor) -> Tensor:
    """Attention weights (B, K, S) of K queries over a bank from their ``scores`` (B, K, S)
    (e.g. scaled cosine similarities): a softmax over the held entries (``count`` (B, S) > 0);
    all zero for a sample whose bank is empty."""
    held = (count > 0)[:, None]  # (B, 1, S)
    w = scores.masked_fill(~held, float("-inf")).softmax(-1)  # (B, K, S)
    return torch.where(held.any(-1, keepdim=True), w, torch.zeros_like(w))  # no NaN rows


def bank_attend_ref(scores: Tensor, count: Tensor) -> Tensor:
    """Loop twin of :func:`bank_attend`: per sample and query, exp over the held entries."""
    out = torch.zeros_like(scores)
    for b in range(scores.shape[0]):
        held = [i for i in range(scores.shape[2]) if count[b, i] > 0]
        for q in range(scores.shape[1]):
            if held:
                e = [float(torch.exp(scores[b, q, i] - scores[b, q, held].max())) for i in held]
                for i, v in zip(held, e, strict=True):
                    out[b, q, i] = v / sum(e)
    return out


def bank_newest(keys: Tensor, count: Tensor) -> Tensor:
    """The newest entry (B, D) of each sample's bank (keys (B, S, D), count (B, S); entries
    are held oldest first in slots 0 … n−1); zero for an empty bank."""
    n = (count > 0).sum(1)  # (B,)
    rows = torch.arange(keys.shape[0], device=keys.device)
    newest = keys[rows, (n - 1).clamp_min(0)]  # (B, D)
    return newest * (n > 0)[:, None].to(keys.dtype)  # (B, D)
