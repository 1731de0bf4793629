"""``memvla store``: build (or add to) an experience store for retrieval."""

from __future__ import annotations

HELP = "build or extend an experience store from a dataset or the scripted expert"


def add_arguments(parser) -> None:
    parser.add_argument("out", metavar="STORE", help="store directory (created, or added to)")
    parser.add_argument("--dataset", help="a LeRobot v3.0 dataset whose episodes to add")
    parser.add_argument("--failed", action="store_true", help="with --dataset: its episodes "
                        "are failures (default: successes)")
    parser.add_argument("--task", help="add the scripted expert's episodes of this task")
    parser.add_argument("--episodes", type=int, default=0, help="with --task: episodes")
    parser.add_argument("--each-word", type=int, default=0, metavar="N", help="with --task "
                        "unseen-names: N episodes with every word of its pool")
    parser.add_argument("--decoy", type=int, default=0, metavar="J", help="with --task: the "
                        "expert goes to the object J places from the target (failures)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="task option (repeatable), e.g. --opt names=test")
    parser.add_argument("--chunk", type=int, default=8, help="actions per item (a policy "
                        "reads its context.store_chunk first ones)")
    parser.add_argument("--stride", type=int, default=None, help="frames between items "
                        "(default: --chunk)")
    parser.add_argument("--seed", type=int, default=0, help="expert episode i uses seed + i")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from pathlib import Path

    from ..envs import parse_options
    from ..retrieval import ExperienceStore
    from ..retrieval.record import (
        expert_resets,
        next_seed,
        store_from_dataset,
        store_from_expert,
    )

    if bool(args.dataset) == bool(args.task):
        raise ValueError("give one of --dataset DIR or --task TASK")
    path = Path(args.out)
    store = ExperienceStore.load(path) if (path / "experience.json").is_file() else None
    stride, progress = args.stride or args.chunk, not args.no_progress
    if args.dataset:
        store = store_from_dataset(args.dataset, args.chunk, stride, not args.failed, store,
                                   progress=progress)
    else:
        options = parse_options(args.opt)
        resets = expert_resets(args.task, args.episodes, args.each_word, options, args.decoy)
        store = store_from_expert(args.task, resets, args.chunk, stride, options, store,
                                  seed=next_seed(store, args.seed), progress=progress)
    store.save(path)
    ok = int(store.success.sum())
    print(f"experience store {path}: {len(store)} items ({ok} of successful episodes) from "
          f"{len(store.episode.unique())} episodes")
    return 0
