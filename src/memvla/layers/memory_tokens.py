"""Recurrent memory tokens (RMT / "SmolVLA Memory").

M memory vectors (B, M, D) are placed in a sequence, and the hidden states at the write
positions become the next memory. Two layouts:

- ``smolvla``: the same M tokens at the start of the sequence are read and written. They
  attend to every real token of the sequence (``sees_all``) and every token sees them.
- ``rmt``: read tokens at the start (seen by every token, in the first attention block) and
  write tokens, initialised with the same memory, at the end in a block of their own: they
  see the whole sequence and nothing of the sequence sees them (the RMT decoder layout).
  What comes after the sequence may: the VLA's action expert reads the whole cached
  prefix, write tokens included (a summary of the current step beside the read memory).

What bounds the memory over a long episode is the model's choice (``context.write``): the
backbone's residual stream at the write positions with its per-token RMS clipped to a
bound (:func:`clip_rms`; the memory is the raw hidden state inside the bound), or the
output of the backbone's final RMSNorm (scale fixed by that norm's weight). The initial
memory is a learned parameter with a distinct small random value per token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .tokens import TokenSegment

LAYOUTS = ("smolvla", "rmt")


def insert_memory(parts: list[TokenSegment], memory: Tensor, layout: str) -> list[TokenSegment]:
    """Put memory (B, M, D) into a sequence given as parts."""
    if layout == "smolvla":
        return [TokenSegment.full(memory, 0, 0, sees_all=True), *parts]
    if layout == "rmt":
        return [TokenSegment.full(memory, 0, 0), *parts, TokenSegment.full(memory, 1, 0)]
    raise ValueError(f"memory layout must be one of {LAYOUTS}, got {layout!r}")


def extract_memory(hidden: Tensor, num_tokens: int, layout: str) -> Tensor:
    """The next memory (B, M, D) from the sequence's hidden states (B, N, D)."""
    if layout == "smolvla":
        return hidden[:, :num_tokens]
    if layout == "rmt":
        return hidden[:, hidden.shape[1] - num_tokens:]
    raise ValueError(f"memory layout must be one of {LAYOUTS}, got {layout!r}")


def gated_write(old: Tensor, new: Tensor, gate_logits: Tensor) -> Tensor:
    """The next memory as a learned interpolation: g·old + (1 − g)·new with g =
    sigmoid(gate_logits), all (B, M, D). A closed gate (g = 1) carries the old memory
    unchanged; an open one (g = 0) replaces it (the plain write)."""
    g = torch.sigmoid(gate_logits)  # (B, M, D)
    return g * old + (1 - g) * new  # (B, M, D)


class MemoryGate(nn.Module):
    """The gate of :func:`gated_write`: per channel, from the old and the written memory;
    it starts mostly open (``bias``: sigmoid(-2) = 0.12 of the old memory is kept)."""

    def __init__(self, width: int, bias: float = -2.0):
        super().__init__()
        self.proj = nn.Linear(2 * width, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, bias)

    def forward(self, old: Tensor, new: Tensor) -> Tensor:
        logits = self.proj(torch.cat([old, new.to(old.dtype)], -1))  # (B, M, D)
        return gated_write(old, new, logits)


def memory_noise(memory: Tensor, scale: float, generator: torch.Generator | None = None
                 ) -> Tensor:
    """``memory`` (B, M, D) plus Gaussian noise of ``scale`` × each token's RMS (a carried
    memory that must survive perturbation; training only)."""
    if scale == 0:
        return memory
    rms = memory.detach().pow(2).mean(-1, keepdim=True).sqrt()  # (B, M, 1)
    noise = torch.randn(memory.shape, generator=generator, device=memory.device,
                        dtype=memory.dtype)
    return memory + scale * rms * noise  # (B, M, D)


def hold_penalty(old: Tensor, new: Tensor, unchanged: Tensor) -> tuple[Tensor, Tensor]:
    """How far a write moved the memory where the observation did not change: per sample
    ‖new − old‖² / ‖old‖² over (M, D) (``old`` detached: the write is what must hold), summed
    over the samples where ``unchanged`` (B,) is True, and their count. A memory trained
    against it is a fixed point of the write while the world stands still
    (``context.hold_weight``). ``old``/``new``: (B, M, D), or any (B, ...) state."""
    old = old.detach()
    change = (new - old).pow(2).flatten(1).sum(1)  # (B,)
    change = change / old.pow(2).flatten(1).sum(1).clamp_min(1e-12)  # (B,)
    held = unchanged.to(change.dtype)  # (B,)
    return (change * held).sum(), held.sum()


def hold_penalty_reference(old: Tensor, new: Tensor, unchanged: Tensor
                           ) -> tuple[Tensor, Tensor]:
    """Loop twin of :func:`hold_penalty`, for tests."""
    total, count = torch.zeros((), dtype=new.dtype), torch.zeros((), dtype=new.dtype)
    for b in range(old.shape[0]):
        if unchanged[b]:
            o = old[b].detach().double()
            total = total + float(((new[b].double() - o) ** 2).sum() / (o ** 2).sum())
            count = count + 1
    return total, count


def clip_rms(memory: Tensor, max_rms: float) -> Tensor:
    """Scale down each token of ``memory`` (B, M, D) whose RMS over D exceeds ``max_rms``
    to exactly that RMS; tokens inside the bound pass unchanged. Returns (B, M, D)."""
    rms = memory.pow(2).mean(-1, keepdim=True).sqrt()  # (B, M, 1)
    return memory * (max_rms / rms.clamp_min(max_rms))  # (B, M, D)


def bound_written(memory: Tensor, write: str, max_rms: float) -> Tensor:
    """A written memory (B, M, D) bounded as ``context.write`` says: ``clip`` its residual
    stream to ``max_rms`` per token; ``norm``: it is the final norm's output already."""
    return memory if write == "norm" else clip_rms(memory, max_rms)


def clip_rms_reference(memory: Tensor, max_rms: float) -> Tensor:
    """Loop twin of :func:`clip_rms`, for tests."""
    out = memory.clone()
    for b in range(memory.shape[0]):
        for m in range(memory.shape[1]):
            rms = float(memory[b, m].pow(2).mean().sqrt())
            if rms > max_rms:
                out[b, m] = memory[b, m] * (max_rms / rms)
    return out


def match_scale(memory: Tensor, reference: Tensor, valid: Tensor, eps: float = 1e-6) -> Tensor:
    """``memory`` (B, M, D) with each token rescaled to the RMS of the real tokens of
    ``reference`` (B, N, D) (``valid`` (B, N)) of its sample: its direction unchanged, its
    scale that of the other prefix tokens (μVLA's scale matching). Returns (B, M, D)."""
    w = valid[..., None].to(reference.dtype)  # (B, N, 1)
    ref = (reference.pow(2) * w).sum((1, 2)) / (w.sum((1, 2)) * reference.shape[-1]).clamp_min(1)
    rms = memory.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(eps)  # (B, M, 1)
    return memory * (ref.sqrt()[:, None, None] / rms)  # (B, M, D)


def match_scale_reference(memory: Tensor, reference: Tensor, valid: Tensor,
                          eps: float = 1e-6) -> Tensor:
    """Loop twin of :func:`match_scale`, for tests."""
    out = memory.clone()
    for b in range(memory.shape[0]):
        target = float(reference[b][valid[b]].pow(2).mean().sqrt())
        for m in range(memory.shape[1]):
            out[b, m] = memory[b, m] * (target / max(float(memory[b, m].pow(2).mean().sqrt()),
                                                     eps))
    return out


def truncates_before(segment: int, depth: int) -> bool:
    """Truncated back-propagation through time of depth k = ``depth``: True when the
    carried memory is detached before ``segment``, i.e. s > 0 and s % (k + 1) == 0, so
    the loss of a segment back-propagates through at most k memory updates. k = 0 detaches
    every segment; k = -1 (and any k at least the number of segments) keeps the whole
    sequence. The one rule of the VLA's episodes and the text LM's segments."""
    if depth < -1:
        raise ValueError(f"back-propagation depth must be >= -1 (-1 = the whole sequence), "
                         f"got {depth}")
    return depth >= 0 and segment > 0 and segment % (depth + 1) == 0


class MemoryTokens(nn.Module):
    def __init__(self, num_tokens: int, dim: int, layout: str = "smolvla",
                 init_std: float = 0.02):
        super().__init__()
        if num_tokens <= 0:
            raise ValueError(f"memory tokens: num_tokens must be > 0, got {num_tokens}")
        if layout not in LAYOUTS:
            raise ValueError(f"memory tokens: layout must be one of {LAYOUTS}, got {layout!r}")
        self.num_tokens, self.layout = num_tokens, layout
        self.init = nn.Parameter(torch.randn(num_tokens, dim) * init_std)

    def initial(self, batch: int) -> Tensor:
        return self.init[None].expand(batch, -1, -1)  # (B, M, D)

    def insert(self, parts: list[TokenSegment], memory: Tensor) -> list[TokenSegment]:
        if memory.shape[1:] != self.init.shape:
            raise ValueError(f"memory: expected shape (B, {self.num_tokens}, "
                             f"{self.init.shape[1]}), got {tuple(memory.shape)}")
        return insert_memory(parts, memory, self.layout)

    def extract(self, hidden: Tensor) -> Tensor:
        return extract_memory(hidden, self.num_tokens, self.layout)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, layout={self.layout!r}"
