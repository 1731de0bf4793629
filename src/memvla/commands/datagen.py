"""``memvla datagen``: record scripted-expert episodes of a built-in task as a LeRobot v3.0
dataset (the library side is :mod:`memvla.data.record`)."""

from __future__ import annotations

HELP = "record expert episodes of a built-in task as a LeRobot v3.0 dataset"


def add_arguments(parser) -> None:
    parser.epilog = (
        "Attempt i uses seed SEED + i. With --keep success (the default) only episodes the "
        "expert finished successfully are recorded, and attempts continue until N are kept "
        "(or --max-attempts); the success rate is reported. Frames hold observation.* "
        "(PNG images, state), action, next.reward/done/success and the task string."
    )
    parser.add_argument("--task", required=True, help="built-in task name (memvla.envs)")
    parser.add_argument("--episodes", type=int, required=True, metavar="N",
                        help="number of episodes to record")
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    parser.add_argument("--seed", type=int, default=0, help="attempt i uses seed SEED + i (0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it exists and is not empty")
    parser.add_argument(
        "--opt", action="append", default=[], metavar="KEY=VALUE",
        help="task option passed to the environment, repeatable, e.g. --opt delay=30 "
        "--opt n_colors=3; VALUE is read as JSON (numbers, true/false, lists) or else a string",
    )
    parser.add_argument(
        "--keep", choices=["success", "all"], default="success",
        help="keep only the expert's successful episodes (default) or every attempt",
    )
    parser.add_argument("--max-attempts", type=int, default=None, metavar="M",
                        help="with --keep success, stop after M attempts (default 2*N + 10)")
    parser.add_argument("--workers", type=int, default=1, metavar="W",
                        help="run the episodes in W processes (1); the dataset is the same")
    parser.add_argument("--action-noise", type=float, default=0.0, metavar="SIGMA",
                        help="perturbed demonstrations (DART): execute the expert's action plus "
                        "N(0, SIGMA²) noise on the motion axes, record the expert's own (0)")
    parser.add_argument("--no-video", action="store_true",
                        help="store the cameras as PNG columns (exact pixels) instead of MP4 "
                        "videos (AV1 where PyAV has it, else H.264, as LeRobot writes them)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import sys

    from ..data.record import format_summary, generate_dataset
    from ..envs import parse_options

    try:
        s = generate_dataset(
            args.task, args.episodes, args.out, seed=args.seed, options=parse_options(args.opt),
            keep=args.keep, max_attempts=args.max_attempts, overwrite=args.overwrite,
            progress=not args.no_progress, workers=args.workers,
            action_noise=args.action_noise, video=not args.no_video,
        )
    except FileExistsError as e:
        print(f"memvla datagen: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(s))
    if s["episodes"] < s["requested"]:
        print(f"memvla datagen: error: only {s['episodes']} of {s['requested']} episodes were "
              f"successful within {s['attempts']} attempts (see --max-attempts, --keep all)",
              file=sys.stderr)
        return 1
    return 0
