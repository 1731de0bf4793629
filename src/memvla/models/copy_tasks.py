"""RMT-style copy and reverse tasks for the segment-recurrent LM, and a train/eval helper.

A sequence of ``length`` random symbols (an alphabet of ``alphabet``) fills the first
input segments (padded with BLANK to whole segments), ``gap_segments`` segments of BLANK
follow, then the answer segments: ``length`` positions holding the ANSWER token (the "go"
signal, at every answer position) where the model must output the symbols in order (copy)
or reversed (reverse), padded with BLANK to whole segments. The answer starts at the first
token of a segment. The loss and the accuracy are taken on the answer positions only.

With ``gap_segments`` >= the decoder's depth, no path through a Transformer-XL cache of one
segment reaches the input from the answer (each layer reaches one segment further back),
so only a memory carried across segments can solve the task; chance = 1 / alphabet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..configs import DecoderConfig, _positive, _require
from .text_lm import SegmentRecurrentLM, TextLMConfig

BLANK, ANSWER = 0, 1  # special ids; the symbols are 2 .. alphabet + 1
TASKS = ("copy", "reverse")
VARIANTS = ("memory", "cache", "none", "memory+cache")


@dataclass
class CopyTaskConfig:
    task: str = "copy"
    alphabet: int = 8
    length: int = 8  # symbols to copy
    segment_len: int = 8
    gap_segments: int = 2  # segments of BLANK between the input and the answer

    def __post_init__(self):
        _require(self.task in TASKS, f"copy task: task must be one of {TASKS}, got "
                 f"{self.task!r}")
        _positive("copy task", alphabet=self.alphabet, length=self.length,
                  segment_len=self.segment_len)
        _require(self.alphabet >= 2, f"copy task: alphabet must be >= 2, got {self.alphabet}")
        _require(self.gap_segments >= 0, f"copy task: gap_segments must be >= 0, got "
                 f"{self.gap_segments}")

    @property
    def vocab_size(self) -> int:
        return self.alphabet + 2

    @property
    def chance(self) -> float:
        return 1.0 / self.alphabet

    @property
    def io_segments(self) -> int:
        """Segments taken by the input (and by the answer)."""
        return -(-self.length // self.segment_len)

    @property
    def num_segments(self) -> int:
        return 2 * self.io_segments + self.gap_segments

    @property
    def answer_start(self) -> int:
        return (self.io_segments + self.gap_segments) * self.segment_len


def make_batch(task: CopyTaskConfig, batch: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """-> ids (B, T), targets (B, T), loss_mask (B, T) bool (True on the answer)."""
    n, seg = task.length, task.segment_len
    total = task.num_segments * seg
    symbols = torch.randint(2, task.vocab_size, (batch, n), generator=generator)  # (B, n)
    ids = torch.full((batch, total), BLANK, dtype=torch.long)  # (B, T)
    ids[:, :n] = symbols
    a = task.answer_start
    ids[:, a:a + n] = ANSWER
    targets = torch.full_like(ids, BLANK)  # (B, T)
    targets[:, a:a + n] = symbols if task.task == "copy" else symbols.flip(1)
    loss_mask = torch.zeros(batch, total, dtype=torch.bool)  # (B, T)
    loss_mask[:, a:a + n] = True
    return ids, targets, loss_mask


def variant_config(variant: str, decoder: DecoderConfig, segment_len: int,
                   mem_tokens: int = 8, mem_backprop_depth: int = -1) -> TextLMConfig:
    """The LM of one compared variant: ``memory`` (memory tokens), ``cache`` (a
    Transformer-XL cache of the previous segment only), ``none``, ``memory+cache``."""
    _require(variant in VARIANTS, f"variant must be one of {VARIANTS}, got {variant!r}")
    memory = variant.startswith("memory")
    _require(not memory or mem_tokens > 0, f"variant {variant!r} needs mem_tokens > 0 "
             f"(memory tokens on), got {mem_tokens}")
    return TextLMConfig(decoder, segment_len=segment_len,
                        num_mem_tokens=mem_tokens if memory else 0,
                        mem_len=segment_len if variant.endswith("cache") else 0,
                        mem_backprop_depth=mem_backprop_depth)


@torch.no_grad()
def evaluate(model: SegmentRecurrentLM, task: CopyTaskConfig, size: int, seed: int,
             batch: int = 256) -> dict:
    """Token accuracy and exact match (every answer token right) on ``size`` sequences."""
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    right = total = exact = 0
    for start in range(0, size, batch):
        ids, targets, mask = make_batch(task, min(batch, size - start), g)
        pred = model(ids).predictions  # (B, T)
        ok = (pred == targets) & mask  # (B, T)
        right += int(ok.sum())
        total += int(mask.sum())
        exact += int((ok.sum(1) == mask.sum(1)).sum())
    model.train(was_training)
    return {"token_accuracy": right / total, "exact_match": exact / size}


def train_copy(cfg: TextLMConfig, task: CopyTaskConfig, steps: int, batch: int = 64,
               lr: float = 3e-3, seed: int = 0, eval_size: int = 1024,
               on_step: Callable[[int, float], None] | None = None,
               ) -> tuple[dict, SegmentRecurrentLM]:
    """Train a fresh model on freshly drawn sequences for ``steps`` AdamW steps (linear
    warm-up over 10%, cosine decay, gradient clipping at 1), then evaluate it on
    ``eval_size`` held-out sequences (another random stream). Seeds torch's global
    generator with ``seed`` (the initial weights). -> (figures, model)."""
    _require(cfg.decoder.vocab_size >= task.vocab_size, f"decoder.vocab_size "
             f"({cfg.decoder.vocab_size}) must be >= the task's {task.vocab_size}")
    _require(cfg.segment_len == task.segment_len, f"model segment_len ({cfg.segment_len}) "
             f"must equal the task's ({task.segment_len})")
    _positive("train_copy", steps=steps, batch=batch, lr=lr, eval_size=eval_size)
    torch.manual_seed(seed)
    model = SegmentRecurrentLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)

    def lr_factor(i: int) -> float:
        return min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for i in range(steps):
        ids, targets, mask = make_batch(task, batch, g)
        loss = model(ids, targets, mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(i, loss.item())
    seconds = time.perf_counter() - start
    figures = evaluate(model, task, eval_size, seed=seed + 10_000)
    figures.update(chance=task.chance, steps=steps, seconds=seconds,
                   final_loss=float(loss.item()))
    return figures, model
