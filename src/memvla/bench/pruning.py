"""``memvla bench pruning``: what LightVLA's token pruner buys, and when it collapses.

Cost (no training): the ``smolvla-450m`` widths at reduced depth (``--depth`` text and
expert layers, ``--vision-depth`` SigLIP layers) with 512 visual tokens: 2 cameras at
512 px, patch 16 (a 32×32 grid), pixel shuffle 2 instead of 4 -> 16×16 = 256 tokens per
image (``--cameras`` / ``--connector-scale`` change this). The pruned variant keeps a forced
``--keep`` share of them (``pruner.min_keep = pruner.max_keep = round(keep · 512)``: the
most-voted patches), the same weights otherwise. Batch 1, on ``--device`` (default: CUDA
when available, else the CPU), ``torch.inference_mode()``, calls timed alternately in
rounds (:func:`memvla.bench.timing.time_interleaved`); medians of

- backbone: the backbone over the embedded prefix into a KV cache (for the pruned variant
  the pruner's own time is measured apart and added: ``backbone+pruner``);
- prefill: ``FlowMatchingVLA.prefill`` end to end (vision tower, connector, pruner,
  backbone) -- the vision tower does not get cheaper, so this speedup is smaller;
- chunk: ``FlowMatchingVLA.sample_actions`` (prefill + ``num_steps`` expert steps, which
  read a shorter cache).

With ``--parallel``, the parallel family too: one chunk (a single pass) of the
``openvla-oft-7b`` widths at ``--depth`` Llama layers and 2 blocks of each vision tower,
full and with the pruner forced to keep ``--keep`` of its 512 patches.

FLOPs of the same calls come from ``torch.utils.flop_counter.FlopCounterMode`` with a
formula added for the CPU attention kernel (dense: masked entries are computed too).

Collapse (no training): the kept count of the pruner at inference (no forced count) on the
same untrained stack's embeddings of random images, for a 3-word prompt ("pick up cup", 4
tokens with BOS, padded to the tokenizer's 48) and a LIBERO-length instruction, and on
Gaussian inputs with 3 and 20 task tokens: the released query ("lightvla") with the
padding keys unmasked (as released) and masked, and the residual query (the fix).

Success after training (``--success``, tens of minutes): both families (``tiny`` and
``tiny-oft``) without the pruner, with it (``--query``, default the released query, with
centred scores and duplicates dropped in training: the defaults) and with it as released
(uncentred, duplicates kept), trained on the same expert data of ``--task``'s memoryless
twin (default remember-color, the cue in view; 32×32, 16 visual tokens per image) for
``--steps`` and evaluated in closed loop on the same seeds: success with its 95% interval,
chunk latency, and the distribution of kept visual tokens over every predicted chunk of
the evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .timing import format_table, time_interleaved, torch_info

HELP = "token pruning (LightVLA): prefill latency/FLOPs at a forced keep ratio, kept-count collapse"

SHORT_PROMPT = "pick up cup"
LONG_PROMPT = "remember the colour and touch it later, then go back to the start"


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats of backbone, pruner and prefill (5)")
    parser.add_argument("--chunk-repeats", type=int, default=2,
                        help="timed repeats of the whole chunk (2; 0 skips it)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (1)")
    parser.add_argument("--keep", type=float, default=0.15,
                        help="share of the visual tokens the pruned variant keeps (0.15)")
    parser.add_argument("--depth", type=int, default=2, help="text and expert layers (2)")
    parser.add_argument("--vision-depth", type=int, default=1, help="vision layers (1)")
    parser.add_argument("--cameras", type=int, default=2, help="cameras (2)")
    parser.add_argument("--connector-scale", type=int, default=2,
                        help="pixel-shuffle factor (2: 256 tokens per 512 px image)")
    parser.add_argument("--collapse-samples", type=int, default=4,
                        help="random images / Gaussian samples per collapse row (4)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when "
                        "available, else cpu)")
    parser.add_argument("--parallel", action="store_true",
                        help="also time one chunk of the parallel family at the "
                             "openvla-oft-7b widths (--depth Llama layers), full and pruned")
    parser.add_argument("--success", action="store_true",
                        help="also train both families with and without pruning on a built-in "
                             "task and compare success and kept counts (long: tens of minutes)")
    parser.add_argument("--task", default="remember-color",
                        help="task of --success, on its memoryless twin (remember-color)")
    parser.add_argument("--steps", type=int, default=1500,
                        help="training steps per --success variant (1500)")
    parser.add_argument("--episodes", type=int, default=1500,
                        help="expert episodes of --success (1500)")
    parser.add_argument("--eval-episodes", type=int, default=100,
                        help="evaluation episodes per --success variant (100)")
    parser.add_argument("--query", default="lightvla",
                        help="pruner query of the pruned --success variants (lightvla)")
    parser.add_argument("--tower-layer", type=int, default=None,
                        help="the pruned variants vote after this many vision layers and run "
                             "the rest of the tower on the kept patches "
                             "(model.pruner.tower_layer; default: after the tower), in "
                             "--parallel's timing too; with --success the variants "
                             "'flow-tower' and 'oft-tower' are added")
    parser.add_argument("--max-keep", type=int, default=0,
                        help="the pruned --success variants keep at most this many visual "
                             "tokens, in training and at inference (model.pruner.max_keep; "
                             "0: no cap)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated --success variants to run (default all: flow, "
                             "flow-pruned, flow-released, oft, oft-pruned, oft-released"
                             "[, flow-tower, oft-tower])")
    parser.add_argument("--out", default="bench_pruning_success",
                        help="directory of the --success sweep")
    parser.add_argument("--no-progress", action="store_true")


# -- the stack -----------------------------------------------------------------------------------
def stack_overrides(args) -> list[str]:
    from ..presets import WORD_VOCAB

    cams = json.dumps([f"cam{i}" for i in range(args.cameras)])
    return [f"model.text.depth={args.depth}", f"model.expert.depth={args.depth}",
            f"model.vision.depth={args.vision_depth}",
            f"model.connector_scale={args.connector_scale}",
            f"model.text.vocab_size={WORD_VOCAB}", f"cameras={cams}"]


def forced_keep(keep: float, p: int) -> tuple[int, list[str]]:
    """The count a ``keep`` share of ``p`` visual tokens is (at least 1, at most p) and the
    model overrides of a pruner that keeps exactly that many (the most-voted)."""
    k = max(1, min(p, round(keep * p)))
    return k, ["model.pruner.enabled=true", f"model.pruner.min_keep={k}",
               f"model.pruner.max_keep={k}"]


def tower_overrides(tower_layer: int | None, prefix: str = "") -> list[str]:
    """The overrides of a pruner that votes after ``tower_layer`` vision layers (none for
    None: after the tower)."""
    return [] if tower_layer is None else [f"{prefix}model.pruner.tower_layer={tower_layer}"]


def build_models(args):
    """(unpruned model, pruned model with the same weights, visual tokens, kept count)."""
    import torch

    from ..models.flow_vla import FlowMatchingVLA
    from ..presets import get_preset

    base = get_preset("smolvla-450m", stack_overrides(args))
    p = args.cameras * base.model.tokens_per_image
    k, prune = forced_keep(args.keep, p)
    pruned_cfg = get_preset("smolvla-450m", [*stack_overrides(args), *prune,
                                             *tower_overrides(args.tower_layer)])
    torch.manual_seed(args.seed)
    full = FlowMatchingVLA(base.model).to(args.device).eval()
    pruned = FlowMatchingVLA(pruned_cfg.model, num_cameras=args.cameras).to(args.device).eval()
    pruned.load_state_dict(full.state_dict())
    return base, full, pruned, p, k


def model_inputs(cfg, prompt: str, batch: int, seed: int, device):
    """Model inputs on ``device``: random images per camera, the prompt's ids and padding,
    a random state."""
    import torch

    from ..data.tokenizers import make_tokenizer

    g = torch.Generator(device=device).manual_seed(seed)
    s = cfg.model.vision.image_size
    images = [torch.rand(batch, 3, s, s, generator=g, device=device) * 2 - 1
              for _ in cfg.cameras]  # (B, 3, S, S) each
    ids, pad = make_tokenizer(cfg.tokenizer)([prompt] * batch)  # (B, Nl)
    state = torch.randn(batch, cfg.model.max_state_dim, generator=g,
                        device=device)  # (B, Ds')
    return images, ids.to(device), pad.to(device), state


# -- FLOPs ---------------------------------------------------------------------------------------
def _cpu_attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """Dense attention: Q·Kᵀ and P·V, 2 FLOPs per multiply-add (shapes (B, H, N, Dh))."""
    b, h, n, d = q
    return 2 * b * h * n * k[-2] * (d + v[-1])


def count_flops(fn) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op.default] = _cpu_attention_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


# -- cost ----------------------------------------------------------------------------------------
def cost(args, models) -> dict:
    import torch

    from ..layers.kv_cache import KVCache
    from ..layers.tokens import TokenSegment
    from .timing import Timing, cuda_sync

    base, full, pruned, p, k = models
    images, ids, pad, state = model_inputs(base, LONG_PROMPT, 1, args.seed, args.device)
    depth = base.model.text.depth
    with torch.inference_mode():
        prefix_full = TokenSegment.cat(full.embed_prefix(images, ids, pad, state))
        prefix_pruned = TokenSegment.cat(pruned.embed_prefix(images, ids, pad, state))
        # the pruner's inputs, as embed_prefix builds them
        patches = torch.cat([pruned.vlm_with_expert.embed_images(im) for im in images], 1)
        patches = patches * math.sqrt(base.model.text.width)  # (1, P, D)
        positions = torch.arange(p, device=args.device)[None]  # (1, P)
        lang = pruned.vlm_with_expert.text_model.embed(ids) * math.sqrt(base.model.text.width)

    calls = {
        "backbone full": lambda: full.vlm_with_expert.prefill(prefix_full, KVCache(depth)),
        "backbone pruned": lambda: pruned.vlm_with_expert.prefill(prefix_pruned, KVCache(depth)),
        "pruner": lambda: pruned.pruner(patches, positions, lang, pad),
        "prefill full": lambda: full.prefill(images, ids, pad, state),
        "prefill pruned": lambda: pruned.prefill(images, ids, pad, state),
    }
    noise = torch.randn(1, base.model.chunk_size, base.model.max_action_dim, device=args.device,
                        generator=torch.Generator(device=args.device).manual_seed(args.seed))
    if args.chunk_repeats > 0:
        calls["chunk full"] = lambda: full.sample_actions(images, ids, pad, state, noise=noise)
        calls["chunk pruned"] = lambda: pruned.sample_actions(images, ids, pad, state,
                                                              noise=noise)
    reps = {n: (args.chunk_repeats if n.startswith("chunk") else args.repeats) for n in calls}
    with torch.inference_mode():
        flops = {n: count_flops(fn) for n, fn in calls.items()}
        times: dict[str, Timing] = time_interleaved(
            calls, reps, args.warmup, sync=cuda_sync if args.device.type == "cuda" else None)
    ms = {n: t.median_ms for n, t in times.items()}
    ms["backbone+pruner pruned"] = ms["backbone pruned"] + ms["pruner"]
    flops["backbone+pruner pruned"] = flops["backbone pruned"] + flops["pruner"]
    rows = []
    for what, pruned_name in [("backbone", "backbone+pruner pruned"),
                              ("prefill", "prefill pruned"), ("chunk", "chunk pruned")]:
        if f"{what} full" not in ms:
            continue
        f_full, f_pr = flops[f"{what} full"], flops[pruned_name]
        rows.append({"what": what, "full_ms": ms[f"{what} full"], "pruned_ms": ms[pruned_name],
                     "speedup": ms[f"{what} full"] / ms[pruned_name], "full_gflops": f_full / 1e9,
                     "pruned_gflops": f_pr / 1e9, "flops_ratio": f_full / max(f_pr, 1)})
    return {"stack": "smolvla-450m widths", "overrides": stack_overrides(args),
            "visual_tokens": p, "kept": k, "keep": k / p,
            "prefix_tokens_full": prefix_full.length, "prefix_tokens_pruned": prefix_pruned.length,
            "pruner_ms": ms["pruner"], "pruner_gflops": flops["pruner"] / 1e9, "rows": rows,
            "timings": {n: t.to_dict() for n, t in times.items()}, "flops": flops}


def parallel_cost(args) -> dict:
    """The parallel family at the ``openvla-oft-7b`` widths (``--depth`` Llama layers,
    ``--vision-depth`` blocks read of each vision tower, 2 cameras × 256 patches): one
    action chunk (a single parallel pass) full and with the pruner forced to keep
    ``--keep`` of the patches (voting after ``--tower-layer`` blocks of each tower)."""
    import torch

    from ..data.tokenizers import make_tokenizer
    from ..models.parallel_vla import ParallelVLA
    from ..presets import get_preset
    from .timing import cuda_sync

    read = get_preset("openvla-oft-7b").model.vision.feature_layer  # blocks after the read
    stack = [f"model.text.depth={args.depth}",
             f"model.vision.depth={args.vision_depth + read}",
             f"model.vision_fused.depth={args.vision_depth + read}"]
    base = get_preset("openvla-oft-7b", stack)
    p = 2 * base.model.tokens_per_image
    k, prune = forced_keep(args.keep, p)
    pruned_cfg = get_preset("openvla-oft-7b", [*stack, *prune,
                                               *tower_overrides(args.tower_layer)])
    torch.manual_seed(args.seed)
    full = ParallelVLA(base.model, num_cameras=2).to(args.device).eval()
    pruned = ParallelVLA(pruned_cfg.model, num_cameras=2).to(args.device).eval()
    pruned.load_state_dict(full.state_dict())
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    s = base.model.vision.image_size
    images = [torch.rand(1, 3, s, s, generator=g, device=args.device) * 2 - 1
              for _ in range(2)]  # (1, 3, S, S) each
    ids, pad = make_tokenizer(base.tokenizer)([LONG_PROMPT])  # (1, Nl)
    ids, pad = ids[:, 1:].to(args.device), pad[:, 1:].to(args.device)  # without BOS
    state = torch.randn(1, base.model.max_state_dim, generator=g, device=args.device)
    calls = {"chunk full": lambda: full.predict(images, ids, pad, state),
             "chunk pruned": lambda: pruned.predict(images, ids, pad, state)}
    with torch.inference_mode():
        flops = {n: count_flops(fn) for n, fn in calls.items()}
        times = time_interleaved(calls, args.chunk_repeats or 1, args.warmup,
                                 sync=cuda_sync if args.device.type == "cuda" else None)
    ms = {n: t.median_ms for n, t in times.items()}
    return {"stack": "openvla-oft-7b widths", "overrides": stack, "visual_tokens": p,
            "kept": k, "full_ms": ms["chunk full"], "pruned_ms": ms["chunk pruned"],
            "speedup": ms["chunk full"] / ms["chunk pruned"],
            "full_gflops": flops["chunk full"] / 1e9, "pruned_gflops": flops["chunk pruned"] / 1e9}


# -- collapse ------------------------------------------------------------------------------------
QUERY_VARIANTS = [("lightvla, pads unmasked (as released)", "lightvla", False),
                  ("lightvla, pads masked", "lightvla", True),
                  ("residual 0.5, pads masked", "residual:0.5", True),
                  ("residual 1, pads masked (the fix)", "residual", True),
                  ("residual 2, pads masked", "residual:2", True),
                  ("residual 1, pads masked, centred", "residual:1:centred", True)]


def _kept(query: str, patches, positions, task, valid) -> dict:
    from ..configs import PrunerConfig
    from ..layers.token_pruner import TokenPruner

    query, _, rest = query.partition(":")
    scale, _, centre = rest.partition(":")  # uncentred, as these rows were first measured
    cfg = PrunerConfig(enabled=True, query=query, residual_scale=float(scale or 1.0),
                       center=centre == "centred")
    out = TokenPruner(cfg, 0).eval()(
        patches, positions, task, valid)
    return {"kept_mean": out.stats["kept"], "kept": out.kept.tolist(),
            "top_vote_share": out.stats["top_vote_share"], "query_std": out.stats["query_std"]}


def collapse(args, models) -> list[dict]:
    import torch

    base, full, _, p, _ = models
    d = base.model.text.width
    b = args.collapse_samples
    rows = []
    with torch.inference_mode():
        for prompt in (SHORT_PROMPT, LONG_PROMPT):
            images, ids, pad, _ = model_inputs(base, prompt, b, args.seed + 1, args.device)
            vwe = full.vlm_with_expert
            patches = torch.cat([vwe.embed_images(im) for im in images], 1) * math.sqrt(d)
            task = vwe.text_model.embed(ids) * math.sqrt(d)  # (B, Nl, D)
            positions = torch.arange(p, device=args.device).expand(b, p)  # (B, P)
            for name, query, masked in QUERY_VARIANTS:
                valid = pad if masked else torch.ones_like(pad)
                rows.append({"inputs": f"stack, {int(pad[0].sum())}-token prompt", "variant": name,
                             "visual_tokens": p, **_kept(query, patches, positions, task,
                                                          valid)})
        g = torch.Generator(device=args.device).manual_seed(args.seed + 2)
        patches = torch.randn(b, p, d, generator=g, device=args.device)  # (B, P, D)
        positions = torch.arange(p, device=args.device).expand(b, p)  # (B, P)
        for t in (3, 20):
            task = torch.randn(b, t, d, generator=g, device=args.device)  # (B, T, D)
            valid = torch.ones(b, t, dtype=torch.bool, device=args.device)  # (B, T)
            for name, query, _ in QUERY_VARIANTS[1:]:
                rows.append({"inputs": f"Gaussian, {t} task tokens",
                             "variant": name.replace(", pads masked", ""),
                             "visual_tokens": p, **_kept(query, patches, positions, task,
                                                          valid)})
    return rows


# -- action contexts -------------------------------------------------------------------------------
def action_contexts(args, models) -> list[dict]:
    """Kept count at inference for every ``pruner.action_context`` on the untrained stack
    (short prompt, residual query): what each context adds to the pruner's keys. Options A
    (placeholders) and B (keys) read the initial noise there, as ``sample_actions`` does;
    prev_chunk reads a previous chunk; state the state token."""
    import torch

    from ..configs import PRUNER_ACTION_CONTEXTS
    from ..models.flow_vla import FlowMatchingVLA
    from ..presets import get_preset

    base, full, _, _, _ = models
    b = args.collapse_samples
    images, ids, pad, state = model_inputs(base, SHORT_PROMPT, b, args.seed + 3, args.device)
    g = torch.Generator(device=args.device).manual_seed(args.seed + 4)
    m = base.model
    shape = (b, m.chunk_size, m.max_action_dim)
    noise = torch.randn(shape, generator=g, device=args.device)  # (B, A, Da')
    prev = torch.randn(shape, generator=g, device=args.device)  # (B, A, Da')
    rows = []
    with torch.inference_mode():
        for ctx in PRUNER_ACTION_CONTEXTS:
            for query in ("lightvla", "residual"):
                cfg = get_preset("smolvla-450m", [
                    *stack_overrides(args), "model.pruner.enabled=true",
                    f"model.pruner.query={query}", f"model.pruner.action_context={ctx}",
                    "model.pruner.center=false"])
                torch.manual_seed(args.seed + 5)  # the same key projection for every query
                model = FlowMatchingVLA(cfg.model, num_cameras=args.cameras).to(args.device).eval()
                model.load_state_dict(full.state_dict(), strict=False)
                pa, _ = model.pruner_actions(noise, prev, None)
                model.prefill(images, ids, pad, state, pruner_actions=pa)
                st = model.last_prune_stats
                rows.append({"action_context": ctx, "query": query, "kept_mean": st["kept"],
                             "top_vote_share": st["top_vote_share"]})
    return rows


# -- success after training -----------------------------------------------------------------------
AS_RELEASED = ["policy.model.pruner.center=false", "policy.model.pruner.duplicates=keep"]


def success_variants(query: str = "lightvla", tower_layer: int | None = None,
                     max_keep: int = 0):
    """Both families, each without the pruner, with it (``query``, the defaults: centred
    scores, duplicates dropped in training) and with it as released (uncentred, duplicates
    kept), at 16 visual tokens per 32×32 image (patch 8, no pixel shuffle), trained and
    evaluated on the task's memoryless twin (remember-color: the cue stays in view, so what
    is left is to see it). With ``tower_layer`` also ``flow-tower``: the flow pruner voting
    after that many vision layers (the rest of the tower on the kept patches). ``max_keep``
    (0 = none) caps the kept count of the pruned variants, in training and at inference."""
    from ..demo import Variant

    pruner = ["policy.model.pruner.enabled=true", f"policy.model.pruner.query={query}",
              f"policy.model.pruner.max_keep={max_keep}"]
    what = query + (f", at most {max_keep} kept" if max_keep else "")  # for the labels
    flow = ["policy.model.connector_scale=1"]
    oft = ["train.lr=3e-4"]  # tiny-oft's training default (training.loop), not the demo's
    out = []
    for fam, label, extra, preset in (("flow", "flow matching", flow, None),
                                      ("oft", "parallel decoding", oft, "tiny-oft")):
        out += [Variant(fam, label, extra, twin=True, preset=preset),
                Variant(f"{fam}-pruned", f"{label} + pruner ({what})", extra + pruner,
                        twin=True, preset=preset),
                Variant(f"{fam}-released", f"{label} + pruner ({what}), as released",
                        extra + pruner + AS_RELEASED, twin=True, preset=preset)]
    if tower_layer is not None:
        tower = tower_overrides(tower_layer, "policy.")
        where = f"after {tower_layer} vision layer(s)"
        out.insert(2, Variant("flow-tower", f"flow matching + pruner ({what}) {where}",
                              flow + pruner + tower, twin=True))
        out.append(Variant("oft-tower", f"parallel decoding + pruner ({what}) {where}",
                           oft + pruner + tower, twin=True, preset="tiny-oft"))
    return out


def chosen_variants(args) -> list:
    """The --success variants ``--variants`` names (all by default), or a clear error."""
    variants = success_variants(args.query, args.tower_layer, args.max_keep)
    if not args.variants:
        return variants
    names = {v.name: v for v in variants}
    wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        hint = (" (flow-tower and oft-tower need --tower-layer)"
                if {"flow-tower", "oft-tower"} & set(unknown) else "")
        raise ValueError(f"--variants: unknown {unknown}; expected some of {list(names)}{hint}")
    return [names[n] for n in wanted]


def success_with_and_without_pruning(args) -> dict:
    """Train both families with and without the pruner on ``args.task`` (the sweep of
    :mod:`memvla.demo`: the same expert data, budget and evaluation seeds), evaluate in
    closed loop and report success and the kept-count distribution."""
    from ..demo import DemoSettings, run_sweep

    s = DemoSettings(task=args.task, episodes=args.episodes, steps=args.steps,
                     eval_episodes=args.eval_episodes, image_size=32, device=str(args.device))
    res = run_sweep(args.out, s, progress=not args.no_progress, overwrite=True, report=False,
                    variants=chosen_variants(args))
    rows = []
    for r in res["variants"]:
        e, k = r["eval"], r["eval"].get("pruner_kept")
        rows.append({"variant": r["variant"], "label": r["label"],
                     "success_rate": e["success_rate"], "ci95": e["ci95"],
                     "chunk_ms_p50": e["chunk_latency_ms"]["p50"],
                     "kept": k, "final_loss": r["final_loss"]})
    print(f"\nsuccess on {args.task} after {args.steps} steps ({args.eval_episodes} episodes, "
          f"chance {res['chance_level']:.1%}, expert {res['expert']['success_rate']:.0%}):")
    print(format_table(
        ["variant", "success", "95% CI", "chunk ms p50", "kept mean", "p10/p50/p90", "of"],
        [[r["variant"], f"{r['success_rate']:.1%}",
          f"{r['ci95'][0]:.0%}-{r['ci95'][1]:.0%}", f"{r['chunk_ms_p50']:.2f}",
          *((f"{r['kept']['mean']:.1f}",
             f"{r['kept']['p10']:.0f}/{r['kept']['p50']:.0f}/{r['kept']['p90']:.0f}",
             str(r["kept"]["visual_tokens"])) if r["kept"] else ("-", "-", "-"))]
         for r in rows]))
    return {"task": args.task, "steps": args.steps, "chance_level": res["chance_level"],
            "expert": res["expert"]["success_rate"], "rows": rows, "sweep": str(args.out)}


# -- entry -----------------------------------------------------------------------------------------
def run(args) -> int:
    import torch

    from ..policies import policy_device
    from ..utils import atomic_write_json

    if not 0.0 < args.keep <= 1.0:
        raise ValueError(f"--keep must be in (0, 1], got {args.keep}")
    if args.max_keep < 0:
        raise ValueError(f"--max-keep must be >= 0 (0: no cap), got {args.max_keep}")
    if args.success:
        chosen_variants(args)  # a bad --variants fails now, not after the timings
    args.device = policy_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models(args)
    c = cost(args, models)
    print(f"smolvla-450m widths, {args.depth} text/expert layers, {args.vision_depth} vision "
          f"layer(s); {args.cameras} cameras × {c['visual_tokens'] // args.cameras} tokens = "
          f"{c['visual_tokens']} visual tokens; pruned keeps {c['kept']} ({c['keep']:.1%}); "
          f"prefix {c['prefix_tokens_full']} -> {c['prefix_tokens_pruned']} tokens; the pruner "
          f"itself {c['pruner_ms']:.2f} ms, {c['pruner_gflops']:.3f} GFLOP")
    print(format_table(["call", "full ms", "pruned ms", "speedup", "full GFLOP", "pruned GFLOP",
                        "FLOP ratio"],
                       [[r["what"], f"{r['full_ms']:.1f}", f"{r['pruned_ms']:.1f}",
                         f"{r['speedup']:.2f}x", f"{r['full_gflops']:.2f}",
                         f"{r['pruned_gflops']:.2f}", f"{r['flops_ratio']:.2f}x"]
                        for r in c["rows"]]))
    rows = collapse(args, models)
    print("\nkept visual tokens at inference (no forced count), untrained weights:")
    print(format_table(["inputs", "query", "kept (mean)", "of", "top-vote share"],
                       [[r["inputs"], r["variant"], f"{r['kept_mean']:.1f}", r["visual_tokens"],
                         f"{r['top_vote_share']:.3f}"] for r in rows], align="llrrr"))
    ctx_rows = action_contexts(args, models)
    print(f"\nkept visual tokens per action context ({SHORT_PROMPT!r}, untrained weights):")
    print(format_table(["action context", "query", "kept (mean)", "top-vote share"],
                       [[r["action_context"], r["query"], f"{r['kept_mean']:.1f}",
                         f"{r['top_vote_share']:.3f}"] for r in ctx_rows], align="llrr"))
    out = {"cost": c, "collapse": rows, "action_contexts": ctx_rows, "torch": torch_info()}
    if args.parallel:
        pc = out["parallel_cost"] = parallel_cost(args)
        where = ("" if args.tower_layer is None else
                 f", voting after {args.tower_layer} tower block(s)")
        print(f"\nparallel family, openvla-oft-7b widths at {args.depth} Llama layers and "
              f"{args.vision_depth} block(s) read per vision tower, {pc['visual_tokens']} "
              f"visual tokens, pruned keeps {pc['kept']}{where}: one chunk "
              f"{pc['full_ms']:.0f} -> {pc['pruned_ms']:.0f} ms "
              f"({pc['speedup']:.2f}x), {pc['full_gflops']:.1f} -> {pc['pruned_gflops']:.1f} "
              "GFLOP")
    if args.success:
        out["success"] = success_with_and_without_pruning(args)
    if args.json:
        atomic_write_json(Path(args.json), json.loads(json.dumps(out, default=str)))
        print(f"wrote {args.json}")
    return 0
