"""The ``memvla`` command line. Each subcommand lives in ``memvla.commands.<name>``.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run`` so that ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name on the command line -> module under memvla.commands
COMMANDS = {
    "presets": "presets",
    "bench": "bench",
    "datagen": "datagen",
    "train": "train",
    "eval": "eval",
    "demo": "demo",
    "exam": "exam",
    "import": "import_",
    "serve": "serve",
    "store": "store",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memvla",
        description="Efficient, memory-augmented Vision-Language-Action robot policies.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"memvla.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after options too (``--out RUN train.lr=3e-4``)
    if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"memvla {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
