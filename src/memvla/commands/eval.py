"""``memvla eval``: closed-loop success rate of a checkpoint (or the scripted expert)."""

from __future__ import annotations

HELP = "evaluate a checkpoint (or the scripted expert) in a built-in task"


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", help="a checkpoint directory or a training run")
    parser.add_argument("--server", metavar="HOST:PORT", help="evaluate the policy that "
                        "'memvla serve' serves there (instead of --checkpoint)")
    parser.add_argument("--api-key", help="the server's API key (with --server)")
    parser.add_argument("--policy", choices=["checkpoint", "expert"], default="checkpoint",
                        help="'expert' evaluates the task's scripted expert")
    parser.add_argument("--task", required=True, help="task name (e.g. remember-color)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8, help="environments run in lockstep")
    parser.add_argument("--seed", type=int, default=0, help="episode i uses seed + i")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="task option (repeatable), e.g. --opt delay=30")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted option of the checkpoint's policy config changed for this "
                        "evaluation (repeatable; the weights must fit), e.g. --set "
                        "context.voxel_size=0.5 or --set model.num_steps=5")
    parser.add_argument("--record", type=int, default=3, help="episodes saved as GIFs")
    parser.add_argument("--record-to", metavar="STORE", help="add every predicted chunk of "
                        "the rollouts (observation, actions, the episode's outcome) to the "
                        "experience store STORE (created when missing)")
    parser.add_argument("--store", metavar="STORE", help="the experience store a "
                        "context.kind=experience policy retrieves from (e.g. made by "
                        "'memvla store'); switching by confidence: --set "
                        "context.retrieve_below=0.5")
    parser.add_argument("--device", help="where the policy runs: cpu, cuda or cuda:N "
                        "(default: CUDA when available, else cpu)")
    parser.add_argument("--out", required=True, help="output directory (eval.json, GIFs)")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from pathlib import Path

    from ..envs import parse_options
    from ..evaluate import evaluate, format_results, write_results
    from ..policies import load_policy, policy_device, resolve_checkpoint

    if args.server:
        from ..serving.remote_eval import remote_evaluate

        results, recs = remote_evaluate(args.task, args.episodes, args.server, args.api_key,
                                        args.batch, args.seed, parse_options(args.opt),
                                        args.record, not args.no_progress)
        write_results(Path(args.out), results, recs)
        print(format_results(results))
        print(f"wrote {Path(args.out) / 'eval.json'}")
        return 0
    device = policy_device(args.device)
    policy = None
    if args.policy == "checkpoint":
        if not args.checkpoint:
            raise ValueError("give --checkpoint RUN (or --policy expert)")
        policy = load_policy(args.checkpoint, device=device, overrides=args.set).eval()
        if args.store:
            policy.attach_experience(args.store)
    elif args.store:
        raise ValueError("--store feeds a policy's retrieval: give --checkpoint")
    recorder = None
    if args.record_to:
        if policy is None:
            raise ValueError("--record-to records a policy's chunks: give --checkpoint")
        from ..retrieval import rollout_recorder

        recorder = rollout_recorder(args.record_to, policy)
    results, recs = evaluate(args.task, args.episodes, policy, args.batch, args.seed,
                             parse_options(args.opt), args.record, not args.no_progress,
                             recorder=recorder)
    if recorder is not None:
        recorder.store.save(args.record_to)
        print(f"experience store {args.record_to}: {len(recorder.store)} items")
    results["policy"] = ("expert" if policy is None
                         else str(resolve_checkpoint(args.checkpoint)))
    results["device"] = None if policy is None else str(device)
    results["overrides"] = list(args.set)
    write_results(Path(args.out), results, recs)
    print(format_results(results))
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0
