"""``memvla train``: train a policy on a LeRobot v3.0 dataset (or resume a run)."""

from __future__ import annotations

HELP = "train a policy on a LeRobot v3.0 dataset, or resume a run"


def add_arguments(parser) -> None:
    parser.add_argument("--preset", help="model preset (see 'memvla presets')")
    parser.add_argument("--dataset", help="LeRobot v3.0 dataset directory")
    parser.add_argument("--steps", type=int, help="optimisation steps (train.steps)")
    parser.add_argument("--out", help="run directory to create")
    parser.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint")
    parser.add_argument("--init-from", metavar="CKPT",
                        help="start from a checkpoint's config and weights (an imported or "
                        "trained policy) instead of a preset; overrides may add to it, e.g. "
                        "policy.context.kind=memory_tokens 'train.freeze=[\"vlm\"]'")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (never done otherwise)")
    parser.add_argument("--stop-at", type=int, metavar="STEP",
                        help="stop (with a checkpoint) at STEP without changing the schedule")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides: policy.model.chunk_size=8, "
                             "train.lr=3e-4, train.batch_size=64, train.num_workers=0, ...")


def run(args) -> int:
    from pathlib import Path

    from ..training.loop import (
        create_run,
        make_run_config,
        read_run_config,
        resume_run_config,
        train,
    )

    if args.resume:
        run_dir = Path(args.resume)
        try:
            resume_run_config(read_run_config(run_dir), args.preset, args.dataset, args.steps,
                              args.overrides)
        except ValueError as e:
            raise ValueError(f"--resume {run_dir}: {e}") from e
    else:
        need = ("dataset", "out") if args.init_from else ("preset", "dataset", "out")
        missing = [f"--{k}" for k in need if not getattr(args, k)]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (or give --resume RUN)")
        run_dir = Path(args.out)
        rc = make_run_config(args.preset, args.dataset, args.steps, args.overrides,
                             init_from=args.init_from)
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        if state.is_main_process:  # under DDP one process creates the run
            create_run(run_dir, rc, overwrite=args.overwrite)
        state.wait_for_everyone()
    summary = train(run_dir, stop_at=args.stop_at, progress=not args.no_progress)
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if summary["interrupted"]:
        print(f"interrupted ({summary['interrupted']}) at step {summary['step']}; checkpoint "
              f"{summary['checkpoint']}; continue with: memvla train --resume {run_dir}")
        return 130 if summary["interrupted"] == "SIGINT" else 143
    losses = summary["losses"]
    if losses:
        print(f"trained steps {summary['start_step']}..{summary['step']}: loss "
              f"{losses[0]:.4f} -> {losses[-1]:.4f}; checkpoint {summary['checkpoint']}")
    return 0
