"""``memvla import``: a checkpoint of LeRobot (or another project) -> a memvla checkpoint."""

from __future__ import annotations

HELP = ("convert a checkpoint directory of LeRobot (SmolVLA) or OpenVLA-OFT / LightVLA into "
        "a memvla checkpoint")


def add_arguments(parser) -> None:
    parser.add_argument("format", help="the source's format: lerobot-smolvla, openvla-oft "
                        "or lightvla (OFT with LightVLA's token pruner on)")
    parser.add_argument("source", help="the checkpoint directory to import (local)")
    parser.add_argument("--out", required=True, help="the memvla checkpoint to write")
    parser.add_argument("--vlm", help="local directory of the VLM the checkpoint names "
                        "(its config.json and tokenizer files), when vlm_model_name is a hub "
                        "id (e.g. a copy of SmolVLM2-500M-Video-Instruct)")
    parser.add_argument("--unnorm-key", help="OpenVLA-OFT: the dataset of "
                        "dataset_statistics.json whose statistics the actions use, when "
                        "there are several")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted option of the imported policy config (repeatable), e.g. "
                        "--set model.vision.position_buckets=false for a checkpoint trained "
                        "under transformers 5")


def run(args) -> int:
    from ..interop.importer import import_checkpoint

    report = import_checkpoint(args.format, args.source, args.out, vlm=args.vlm,
                               overrides=args.set, unnorm_key=args.unnorm_key)
    print(f"imported {args.source} ({args.format}) -> {args.out}")
    print(report.table())
    return 0
