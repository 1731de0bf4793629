"""``memvla bench lm-copy``: RMT's copy and reverse tasks for the segment-recurrent text LM.

For every task and variant a fresh tiny LM (width 64, 4 heads, 2 layers by default) is
trained on the CPU on freshly drawn sequences for ``--steps`` steps, then evaluated on
``--eval`` held-out sequences: answer-token accuracy (argmax) and exact match (every
answer token right). The variants share the data, the seed and the budget:

- ``memory``: ``--mem-tokens`` RMT memory tokens (read at the start, write at the end),
  back-propagation through the whole sequence (mem_backprop_depth -1);
- ``cache``: no memory tokens, a Transformer-XL cache of the previous segment
  (mem_len = segment_len);
- ``none``: neither;
- ``memory+cache`` (not run by default): both.

Default task: 16 symbols of an alphabet of 8 in 2 segments of 8 tokens, 2 blank segments,
then the 2 answer segments (6 segments, 48 tokens). The answer is more than ``--depth``
segments from the input, so the one-segment cache has no path to it: expect memory well
above chance = 1/alphabet, cache and none at chance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

HELP = "copy / reverse accuracy of the text LM: memory tokens vs Transformer-XL cache vs none"


def add_arguments(parser) -> None:
    parser.add_argument("--tasks", default="copy,reverse", help="comma-separated: copy, reverse")
    parser.add_argument("--variants", default="memory,cache,none",
                        help="comma-separated: memory, cache, none, memory+cache")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run (600)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step (32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    parser.add_argument("--eval", type=int, default=1024, help="held-out sequences (1024)")
    parser.add_argument("--length", type=int, default=16, help="symbols to copy (16)")
    parser.add_argument("--alphabet", type=int, default=8, help="symbols in the alphabet (8)")
    parser.add_argument("--segment-len", type=int, default=8, help="tokens per segment (8)")
    parser.add_argument("--gap", type=int, default=2,
                        help="blank segments between input and answer (2)")
    parser.add_argument("--mem-tokens", type=int, default=8, help="memory tokens (8)")
    parser.add_argument("--width", type=int, default=64, help="model width (64)")
    parser.add_argument("--depth", type=int, default=2, help="decoder layers (2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: fastest for this tiny model, and steady "
                             "when other processes share the CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from memvla.configs import DecoderConfig
    from memvla.models.copy_tasks import (
        TASKS,
        VARIANTS,
        CopyTaskConfig,
        train_copy,
        variant_config,
    )
    from memvla.utils import did_you_mean

    tasks = [t for t in args.tasks.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    for t in tasks:
        if t not in TASKS:
            raise ValueError(did_you_mean(t, TASKS, what="task"))
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(did_you_mean(v, VARIANTS, what="variant"))
    if args.width % 4:
        raise ValueError(f"--width must be a multiple of 4 (4 heads), got {args.width}")
    torch.set_num_threads(args.threads)
    rows = []
    bar = tqdm(total=len(tasks) * len(variants) * args.steps, disable=args.no_progress,
               unit="step")
    header = (f"{'task':<8} {'variant':<13} {'token acc':>9} {'exact':>6} {'chance':>6} "
              f"{'steps':>6} {'seconds':>8}")
    lines = []
    start = time.perf_counter()
    for t in tasks:
        task = CopyTaskConfig(t, alphabet=args.alphabet, length=args.length,
                              segment_len=args.segment_len, gap_segments=args.gap)
        decoder = DecoderConfig(width=args.width, depth=args.depth, heads=4, kv_heads=4,
                                head_dim=args.width // 4, mlp_dim=2 * args.width,
                                vocab_size=task.vocab_size)
        for v in variants:
            cfg = variant_config(v, decoder, args.segment_len, mem_tokens=args.mem_tokens)
            bar.set_description(f"{t}/{v}")

            def tick(i: int, loss: float) -> None:
                bar.update(1)
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}")

            fig, _ = train_copy(cfg, task, args.steps, batch=args.batch, lr=args.lr,
                                seed=args.seed, eval_size=args.eval, on_step=tick)
            fig.update(task=t, variant=v, num_mem_tokens=cfg.num_mem_tokens,
                       mem_len=cfg.mem_len)
            rows.append(fig)
            lines.append(f"{t:<8} {v:<13} {fig['token_accuracy']:>9.3f} "
                         f"{fig['exact_match']:>6.3f} {fig['chance']:>6.3f} {fig['steps']:>6} "
                         f"{fig['seconds']:>8.1f}")
    bar.close()
    print(f"{args.length} symbols, alphabet {args.alphabet}, segments of {args.segment_len}, "
          f"{task.num_segments} segments ({args.gap} blank), width {args.width}, depth "
          f"{args.depth}, batch {args.batch}, {args.eval} held-out sequences")
    print(header)
    print("-" * len(header))
    print("\n".join(lines))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        figures = {"bench": "lm-copy", "settings": {k: v for k, v in vars(args).items()
                                                    if k != "json"}, "results": rows}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
