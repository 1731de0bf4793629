"""``memvla bench NAME [options]``: benchmarks that print measured figures (and write them
as JSON with ``--json FILE``). A benchmark module is imported only when it runs."""

from __future__ import annotations

import argparse
import importlib

from ..utils import did_you_mean

HELP = "run a benchmark and print its figures (see 'memvla bench --help')"

# benchmark name -> module under memvla.bench; each defines HELP, add_arguments, run
BENCHES = {
    "memory": "memory",
    "core": "core",
    "envs": "envs",
    "lm-copy": "lm_copy",
    "pruning": "pruning",
    "pruning-collapse": "pruning_collapse",
    "vision-reuse": "vision_reuse",
    "context": "context",
    "ssm": "ssm_speed",
    "scaling": "scaling",
    "lerobot": "lerobot",
    "data": "data",
    "retrieval": "retrieval",
    "serve": "serve",
}


def add_arguments(parser) -> None:
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(BENCHES)}")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="options of the benchmark ('memvla bench NAME --help')")


def run(args) -> int:
    if args.name not in BENCHES:
        raise ValueError(did_you_mean(args.name, BENCHES, what="benchmark"))
    module = importlib.import_module(f"memvla.bench.{BENCHES[args.name]}")
    parser = argparse.ArgumentParser(prog=f"memvla bench {args.name}", description=module.HELP)
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.options)) or 0)
