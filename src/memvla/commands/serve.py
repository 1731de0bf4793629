"""``memvla serve``: a checkpoint behind openpi's websocket protocol (docs/serving.md)."""

from __future__ import annotations

HELP = "serve a checkpoint to robots over websockets (openpi's protocol)"


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (127.0.0.1: this machine only; 0.0.0.0: every "
                        "interface, use it with --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument("--api-key", help="refuse connections without the header "
                        "'Authorization: Api-Key KEY' (default: the MEMVLA_API_KEY variable)")
    parser.add_argument("--keymap", nargs="+", default=[], metavar="ROBOT_KEY=MEMVLA_KEY",
                        help="rename a robot's observation keys, e.g. "
                        "image=observation.images.top prompt=task")
    parser.add_argument("--mode", choices=["step", "chunk"], default="step",
                        help="step: the client sends every observation and executes "
                        "actions[0]; chunk: every observation predicts a new chunk")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="longest wait for other sessions' requests to batch (5)")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="most sessions in one policy call (64; 1: one at a time)")
    parser.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                        help="close a session idle for S seconds (300; 0: never)")
    parser.add_argument("--max-message-mb", type=float, default=16.0,
                        help="largest observation message accepted (16 MB)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted option of the policy config changed for serving "
                        "(training-free, e.g. --set model.num_steps=5)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--log-level", default="INFO", help="logging level (INFO)")


def run(args) -> int:
    import logging
    import os
    import sys

    from ..policies import load_policy, policy_device
    from ..serving.observation import parse_keymap
    from ..serving.server import ServeConfig, serve_forever

    config = ServeConfig(host=args.host, port=args.port,
                         api_key=args.api_key or os.environ.get("MEMVLA_API_KEY") or None,
                         keymap=parse_keymap(args.keymap), mode=args.mode,
                         batch_wait_ms=args.batch_wait_ms, max_batch=args.max_batch,
                         idle_timeout_s=args.idle_timeout or None,
                         max_message_mb=args.max_message_mb)
    # a checkpoint that cannot be served fails here, before the port opens
    policy = load_policy(args.checkpoint, device=policy_device(args.device),
                         overrides=args.set).eval()

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def ready(port: int) -> None:
        print(f"memvla serve: ws://{args.host}:{port} ({policy.config.context.kind} context, "
              f"mode {args.mode}, {'API key required' if config.api_key else 'no API key'})",
              flush=True)

    try:
        serve_forever(policy, config, ready)
    except OSError as e:  # e.g. the port is taken
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e}") from e
    print("memvla serve: stopped", file=sys.stderr, flush=True)
    return 0
