"""``memvla bench NAME``: benchmarks that print measured figures (and write them as JSON)."""

from __future__ import annotations

import importlib

HELP = "run a benchmark and print its figures (core, envs, ...)"

# benchmark name -> module under memvla.bench; each defines HELP, add_arguments, run
BENCHES = {
    "core": "core",
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, module_name in BENCHES.items():
        module = importlib.import_module(f"memvla.bench.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
        module.add_arguments(p)
        p.set_defaults(_bench_run=module.run)


def run(args) -> int:
    return int(args._bench_run(args) or 0)
