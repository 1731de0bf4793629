"""``memvla exam``: every temporal-context kind on every memory task at 1×, 3×, 10× the
trained horizon (:mod:`memvla.exam`)."""

from __future__ import annotations

HELP = "the memory exam: every context kind on every memory task at 1×, 3×, 10× the horizon"


def add_arguments(parser) -> None:
    from ..exam import KINDS, TASKS

    parser.add_argument("--out", default="exam", help="directory of the exam: its cells are "
                        "cached there, so a rerun resumes (default: exam)")
    parser.add_argument("--quick", action="store_true", help="a small exam (minutes): every "
                        "cell runs, the figures mean little")
    parser.add_argument("--tasks", help=f"comma-separated subset of {', '.join(TASKS)}")
    parser.add_argument("--kinds", help=f"comma-separated subset of {', '.join(KINDS)}")
    parser.add_argument("--multiples", help="horizon multiples (default 1,3,10)")
    parser.add_argument("--episodes", type=int, help="expert episodes per task")
    parser.add_argument("--steps", type=int, help="training steps per cell")
    parser.add_argument("--eval-episodes", type=int, help="evaluation episodes per horizon")
    parser.add_argument("--workers", type=int, default=2, help="cells trained at the same "
                        "time, one process each (2)")
    parser.add_argument("--report", action="store_true", help="train nothing: the report of "
                        "the cells cached in --out, the others listed as not run")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from pathlib import Path

    from ..exam import ExamSettings, run_exam

    def listed(text):
        return [x.strip() for x in text.split(",") if x.strip()]

    changes = {k: v for k, v in {
        "tasks": listed(args.tasks) if args.tasks else None,
        "kinds": listed(args.kinds) if args.kinds else None,
        "multiples": [int(m) for m in listed(args.multiples)] if args.multiples else None,
        "episodes": args.episodes, "steps": args.steps,
        "eval_episodes": args.eval_episodes}.items() if v is not None}
    s = ExamSettings.quick(**changes) if args.quick else ExamSettings(**changes)
    results = run_exam(args.out, s, workers=args.workers, progress=not args.no_progress,
                       train=not args.report)
    print((Path(args.out) / "report.md").read_text())
    print(f"memvla exam: {len(results['cells'])} cells, {results['wall_seconds']:.0f} s; "
          f"wrote {args.out}/report.md, results.json, heatmap.png")
    return 0
