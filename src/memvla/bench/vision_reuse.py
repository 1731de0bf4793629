"""``memvla bench vision-reuse``: what reusing the unchanged patches' tower states buys.

The vision tower is most of a pruned policy's cost (the pruner cuts the backbone, not the
tower). With ``model.vision.reuse`` (:mod:`memvla.layers.vision_reuse`) a frame's
unchanged patches keep the previous frame's tower states; only the changed ones are
computed.

Cost (no training): the ``smolvla-450m`` widths at reduced depth (``--depth`` text and
expert layers, ``--vision-depth`` SigLIP layers; SmolVLA has 16 + 16 and 12), 2 cameras of
512 px, patch 16 (1024 patches per image), pixel shuffle 2 (256 tokens per image). The
previous frame is random; the current one differs from it in a ``--shares`` share of the
patches of each camera (random patches). Timed, interleaved (medians): the vision tower of
one camera, the prefill and the whole chunk (prefill + 10 Euler steps), full and with
reuse (the cache of the previous frame restored before every call), and with the pruner
keeping ``--keep`` of the tokens too.

Closed loop (``--run RUN --task TASK``): the policy of a training run evaluated with and
without reuse on the same seeds: success, the changed share it met, chunk latency.
"""

from __future__ import annotations

import json
from pathlib import Path

from .timing import format_table, time_interleaved, torch_info

HELP = "vision-token reuse across frames (VLA-Cache-like): tower/prefill/chunk latency"


def add_arguments(parser) -> None:
    parser.add_argument("--shares", default="0.5,0.25,0.1",
                        help="changed shares of the patches to time (0.5,0.25,0.1)")
    parser.add_argument("--keep", type=float, default=0.39,
                        help="share of the visual tokens the pruned rows keep (0.39)")
    parser.add_argument("--depth", type=int, default=2, help="text and expert layers (2)")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision layers (2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when "
                        "available, else cpu)")
    parser.add_argument("--run", help="a training run (or checkpoint) to evaluate in closed "
                        "loop with and without reuse")
    parser.add_argument("--task", help="the task of --run")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="a task option of --run's evaluation (repeatable)")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="vision.reuse_threshold of the closed-loop run (0.05)")
    parser.add_argument("--episodes", type=int, default=100,
                        help="evaluation episodes of --run (100)")


def _models(args, keep: float):
    """(config, {name: model}) with the same weights: full, reuse, pruned, pruned + reuse."""
    import torch

    from ..models.flow_vla import FlowMatchingVLA
    from ..presets import WORD_VOCAB, get_preset
    from .pruning import forced_keep

    stack = [f"model.text.depth={args.depth}", f"model.expert.depth={args.depth}",
             f"model.vision.depth={args.vision_depth}", "model.connector_scale=2",
             f"model.text.vocab_size={WORD_VOCAB}", 'cameras=["cam0","cam1"]']
    base = get_preset("smolvla-450m", stack)
    p = 2 * base.model.tokens_per_image
    k, prune = forced_keep(keep, p)
    reuse = ["model.vision.reuse=true"]
    variants = {"full": [], "reuse": reuse, "pruned": prune, "pruned+reuse": prune + reuse}
    torch.manual_seed(args.seed)
    models = {}
    for name, extra in variants.items():
        cfg = get_preset("smolvla-450m", stack + extra)
        models[name] = FlowMatchingVLA(cfg.model, num_cameras=2).to(args.device).eval()
        if name != "full":
            models[name].load_state_dict(models["full"].state_dict())
    return base, models, k, p


def _frames(base, share: float, seed: int, device):
    """(previous images, current images) per camera: the current differs in a random
    ``share`` of the patches."""
    import torch

    v = base.model.vision
    g = torch.Generator(device=device).manual_seed(seed)
    side = v.image_size // v.patch_size
    prev, cur = [], []
    for _ in range(2):
        a = torch.rand(1, 3, v.image_size, v.image_size, generator=g, device=device) * 2 - 1
        moved = torch.rand(1, 1, side, side, generator=g, device=device) < share
        mask = moved.repeat_interleave(v.patch_size, 2).repeat_interleave(v.patch_size, 3)
        prev.append(a)
        cur.append(torch.where(mask, -a, a))  # (1, 3, S, S)
    return prev, cur


def _calls(models, vit, caches, cur, ids, pad, state, noise) -> dict:
    """The timed calls on the current frames ``cur``; a reusing model gets the previous
    frame's ``caches`` back before every call."""
    from ..layers.vision_reuse import reuse_forward

    def restored(name):
        m = models[name]
        if m.vision_reuse is not None:
            m.vision_reuse.caches = dict(caches)
        return m

    calls = {"tower full": lambda: vit(cur[0]),
             "tower reuse": lambda: reuse_forward(vit, cur[0], caches[0], 0.05)}
    for name in models:
        calls[f"prefill {name}"] = lambda n=name: restored(n).prefill(cur, ids, pad, state)
        calls[f"chunk {name}"] = lambda n=name: restored(n).sample_actions(
            cur, ids, pad, state, noise=noise)
    return calls


def cost(args) -> dict:
    import torch

    from ..data.tokenizers import make_tokenizer
    from ..layers.vision_reuse import full_forward, reuse_forward
    from .timing import cuda_sync

    base, models, k, p = _models(args, args.keep)
    ids, pad = make_tokenizer(base.tokenizer)(["pick up the red cup and put it in the box"])
    ids, pad = ids.to(args.device), pad.to(args.device)
    state = torch.randn(1, base.model.max_state_dim, device=args.device)
    noise = torch.randn(1, base.model.chunk_size, base.model.max_action_dim, device=args.device)
    vit = models["full"].vlm_with_expert.vlm.model.vision_model
    rows = []
    for share in [float(s) for s in args.shares.split(",")]:
        prev, cur = _frames(base, share, args.seed + 1, args.device)
        with torch.inference_mode():
            caches = {cam: full_forward(vit, img)[1] for cam, img in enumerate(prev)}
            met = float(reuse_forward(vit, cur[0], caches[0], 0.05)[2].float().mean())
            times = time_interleaved(_calls(models, vit, caches, cur, ids, pad, state, noise),
                                     args.repeats, args.warmup,
                                     sync=cuda_sync if args.device.type == "cuda" else None)
        rows.append({"share": share, "changed_met": met,
                     "ms": {n: t.median_ms for n, t in times.items()}})
    return {"stack": "smolvla-450m widths", "depth": args.depth,
            "vision_depth": args.vision_depth, "visual_tokens": p, "kept": k, "rows": rows}


def closed_loop(args) -> dict:
    from ..envs.registry import parse_options
    from ..evaluate import evaluate
    from ..layers.vision_reuse import VisionReuse
    from ..policies import load_policy

    opts = parse_options(args.opt)
    out = {}
    for reuse in (False, True):
        policy = load_policy(args.run, device=args.device).eval()
        if reuse:
            policy.model.vision_reuse = VisionReuse(args.threshold)
        res, _ = evaluate(args.task, args.episodes, policy, batch=25, seed=10_000,
                          task_options=opts, progress=False)
        changed = policy.model.vision_reuse.changed if reuse else []
        out["reuse" if reuse else "full"] = {
            "success_rate": res["success_rate"], "ci95": res["ci95"],
            "chunk_ms_p50": res["chunk_latency_ms"]["p50"],
            "changed_share": sum(changed) / len(changed) if changed else None}
    return out


def run(args) -> int:
    import torch

    from ..policies import policy_device
    from ..utils import atomic_write_json

    args.device = policy_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.run) != bool(args.task):
        raise ValueError("--run and --task go together (the policy and the task it solves)")
    c = cost(args)
    print(f"smolvla-450m widths, {args.depth} text/expert layers, {args.vision_depth} vision "
          f"layer(s); 2 cameras × {c['visual_tokens'] // 2} tokens; pruned rows keep "
          f"{c['kept']}; medians of {args.repeats} (ms)")
    head = ["changed", "tower", "reuse", "x", "prefill", "reuse", "x", "chunk", "reuse", "x",
            "pruned", "+reuse", "x vs full"]
    table = []
    for r in c["rows"]:
        m = r["ms"]
        table.append([f"{r['changed_met']:.0%}", f"{m['tower full']:.1f}",
                      f"{m['tower reuse']:.1f}", f"{m['tower full'] / m['tower reuse']:.2f}",
                      f"{m['prefill full']:.0f}", f"{m['prefill reuse']:.0f}",
                      f"{m['prefill full'] / m['prefill reuse']:.2f}",
                      f"{m['chunk full']:.0f}", f"{m['chunk reuse']:.0f}",
                      f"{m['chunk full'] / m['chunk reuse']:.2f}", f"{m['chunk pruned']:.0f}",
                      f"{m['chunk pruned+reuse']:.0f}",
                      f"{m['chunk full'] / m['chunk pruned+reuse']:.2f}"])
    print(format_table(head, table))
    out = {"cost": c, "torch": torch_info()}
    if args.run:
        out["closed_loop"] = loop = closed_loop(args)
        print(f"\n{args.task}, {args.episodes} episodes, threshold {args.threshold}:")
        print(format_table(["tower", "success", "95% CI", "changed share", "chunk ms p50"],
                           [[k, f"{v['success_rate']:.1%}",
                             f"{v['ci95'][0]:.0%}-{v['ci95'][1]:.0%}",
                             "-" if v["changed_share"] is None else f"{v['changed_share']:.1%}",
                             f"{v['chunk_ms_p50']:.2f}"]
                            for k, v in loop.items()]))
    if args.json:
        atomic_write_json(Path(args.json), json.loads(json.dumps(out, default=str)))
        print(f"wrote {args.json}")
    return 0
