"""``memvla import``: a checkpoint of LeRobot (or another project) -> a memvla checkpoint."""

from __future__ import annotations

HELP = "convert a LeRobot SmolVLA checkpoint directory into a memvla checkpoint"


def add_arguments(parser) -> None:
    parser.add_argument("format", help="the source's format: lerobot-smolvla")
    parser.add_argument("source", help="the checkpoint directory to import (local)")
    parser.add_argument("--out", required=True, help="the memvla checkpoint to write")
    parser.add_argument("--vlm", help="local directory of the VLM the checkpoint names "
                        "(its config.json and tokenizer files), when vlm_model_name is a hub "
                        "id (e.g. a copy of SmolVLM2-500M-Video-Instruct)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted option of the imported policy config (repeatable), e.g. "
                        "--set model.vision.position_buckets=false for a checkpoint trained "
                        "under transformers 5")


def run(args) -> int:
    from ..interop.importer import import_checkpoint

    report = import_checkpoint(args.format, args.source, args.out, vlm=args.vlm,
                               overrides=args.set)
    print(f"imported {args.source} ({args.format}) -> {args.out}")
    print(report.table())
    return 0
