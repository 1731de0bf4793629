"""``memvla demo``: data, training, evaluation and a report of what memory buys."""

from __future__ import annotations

HELP = "the main job: train the plain and memory VLAs on remember-color and compare them"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny budget that runs in seconds (for tests; no conclusions)")
    parser.add_argument("--steps", type=int, help="training steps per variant")
    parser.add_argument("--episodes", type=int, help="expert episodes per dataset")
    parser.add_argument("--eval-episodes", type=int, help="evaluation episodes per variant")
    parser.add_argument("--delay", type=int, help="empty steps between cue and choice")
    parser.add_argument("--layout", choices=["fixed", "random"],
                        help="disc places: the same every episode (fixed, default) or drawn "
                        "per episode (random: a much harder visual problem)")
    parser.add_argument("--palette-size", type=int,
                        help="colours drawn from the first N of the palette (default 3)")
    parser.add_argument("--colors", choices=["fixed", "shuffled"],
                        help="each place keeps its colour in every episode (fixed, default: the "
                        "cue alone says where to go) or the colours swap places (shuffled: the "
                        "policy must also match the remembered colour to a disc)")
    parser.add_argument("--variants", help="comma-separated variants to run (e.g. "
                        "plain,memory-bptt), or '+name,...' to add to the demo's (e.g. +mamba)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override of every variant (repeatable), e.g. "
                        "--set policy.context.frame_stride=4 (a policy.context option "
                        "reaches only the variants of its kind)")
    parser.add_argument("--lanes", type=int, help="variants trained at the same time (2)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="where the policies train and are evaluated: cpu, "
                        "cuda or cuda:N (default: CUDA when available, else cpu)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..demo import DemoSettings, run_demo, variant_names

    s = DemoSettings.quick() if args.quick else DemoSettings()
    for key in ("steps", "episodes", "eval_episodes", "delay", "seed", "layout", "palette_size",
                "colors", "device", "lanes"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    if args.variants:
        s.variants = variant_names(args.variants, s.variants)
    s.overrides = [*s.overrides, *args.set]
    run_demo(args.out, s, progress=not args.no_progress, overwrite=args.overwrite)
    return 0
