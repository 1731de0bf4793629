"""``memvla bench pruning-collapse``: why a trained flow-matching pruner kept 1–4 tokens.

Each variant of the flow-matching ``tiny`` policy (16 visual tokens per 32×32 image) trains
on the same expert data of ``--task``'s memoryless twin at ``--lr`` (2e-3, where the
collapse shows within a few hundred steps). Every ``--every`` steps, on one fixed batch:
the visual tokens the pruner would keep at inference and the mean cosine between two
patches of an image (how aligned training has made the visual tokens). The variants:

- ``unpruned``: no pruner in the loop; a released-config pruner only *measures* the
  model's own visual tokens (does the task loss alone make them collapse?);
- ``released``: uncentred scores, duplicates kept (as LightVLA's code);
- ``no-gradient``: released, but the scores get no gradient (``pruner.gradient=none``):
  is it the pruner's straight-through path that drives the collapse?
- ``dropped``: uncentred scores, duplicates dropped in training;
- ``centred``: centred scores, duplicates kept;
- ``default``: centred scores, duplicates dropped in training (the defaults).

The patches and task tokens are read with module hooks (the connector's output, the
model's language ids), so every variant is measured the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from .timing import format_table

HELP = "why the trained pruner collapses: kept tokens and patch alignment through training"

RELEASED = ["policy.model.pruner.center=false", "policy.model.pruner.duplicates=keep"]
VARIANTS = {
    "unpruned": [],
    "released": ["policy.model.pruner.enabled=true", *RELEASED],
    "no-gradient": ["policy.model.pruner.enabled=true", *RELEASED,
                    "policy.model.pruner.gradient=none"],
    "dropped": ["policy.model.pruner.enabled=true", "policy.model.pruner.center=false"],
    "centred": ["policy.model.pruner.enabled=true", "policy.model.pruner.duplicates=keep"],
    "default": ["policy.model.pruner.enabled=true"],
}


def add_arguments(parser) -> None:
    parser.add_argument("--task", default="remember-color",
                        help="task, trained on its memoryless twin (remember-color)")
    parser.add_argument("--episodes", type=int, default=1500, help="expert episodes (1500)")
    parser.add_argument("--steps", type=int, default=800, help="training steps (800)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (2e-3)")
    parser.add_argument("--every", type=int, default=100, help="measure every N steps (100)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="bench_pruning_collapse", help="work directory")
    parser.add_argument("--no-progress", action="store_true")


class Probe:
    """Reads a flow-matching model's visual tokens and language ids through hooks and
    measures them with a pruner of ``cfg`` (in inference mode)."""

    def __init__(self, model, cfg):
        from ..layers.token_pruner import TokenPruner

        self.model, self.pruner = model, TokenPruner(cfg, 0).eval()
        self.patches, self.lang = [], None
        inner = model.vlm_with_expert.vlm.model
        inner.connector.register_forward_hook(lambda m, i, o: self.patches.append(o.detach()))
        model.register_forward_pre_hook(self._lang, with_kwargs=True)

    def _lang(self, module, args, kwargs):
        self.lang = (args[1], args[2]) if len(args) > 2 else (kwargs["lang_ids"],
                                                               kwargs["lang_pad"])

    def measure(self, policy, batch) -> dict:
        import torch

        from ..layers.token_pruner import plain_rms_norm

        self.patches = []
        was = policy.training
        policy.eval()
        with torch.no_grad():
            policy(batch)
            patches = torch.cat(self.patches, 1)  # (B, P, D)
            ids, pad = self.lang
            task = self.model.vlm_with_expert.text_model.embed(ids)  # (B, Nl, D)
            b, p, _ = patches.shape
            pos = torch.arange(p, device=patches.device).expand(b, p)  # (B, P)
            kept = self.pruner(patches, pos, task, pad).kept.float()  # (B,)
            n = plain_rms_norm(patches)
            cos = (n @ n.transpose(1, 2)) / n.shape[-1]  # (B, P, P)
            off = (cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)) / (p * (p - 1))
        policy.train(was)
        return {"kept": float(kept.mean()), "kept_min": float(kept.min()),
                "cos": float(off.mean()), "of": p}


def trace(out: Path, s, name: str, dataset: Path, args) -> list[dict]:
    """Train variant ``name`` and measure it every ``args.every`` steps."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from ..configs import PrunerConfig
    from ..demo import Variant, variant_overrides
    from ..training.loop import create_run, make_run_config, setup, train_step

    v = Variant(name, name, ["policy.model.connector_scale=1", *VARIANTS[name]], twin=True)
    preset, overrides = variant_overrides(s, v)
    rc = make_run_config(preset, str(dataset), args.steps, overrides)
    run = out / "runs" / name
    create_run(run, rc, overwrite=True)
    t = setup(run, progress=False)
    model = t.policy.model
    probe_cfg = model.pruner.cfg if model.pruner is not None else replace(
        PrunerConfig(enabled=True), center=False)
    probe, fixed, rows = Probe(model, probe_cfg), None, []
    bar = tqdm(total=args.steps, desc=name, disable=args.no_progress)
    for step, batch in zip(range(args.steps), t.loader, strict=False):
        fixed = fixed or batch
        if step % args.every == 0:
            rows.append({"step": step, **probe.measure(t.policy, fixed)})
        train_step(t, step, batch)
        bar.update(1)
    bar.close()
    return [*rows, {"step": args.steps, **probe.measure(t.policy, fixed)}]


def run(args) -> int:
    from ..demo import DemoSettings, Variant, record_data
    from ..utils import atomic_write_json, did_you_mean

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    for n in names:
        if n not in VARIANTS:
            raise ValueError(did_you_mean(n, VARIANTS, what="variant"))
    out = Path(args.out)
    s = DemoSettings(task=args.task, episodes=args.episodes, steps=args.steps, lr=args.lr,
                     image_size=32, device="cpu")
    datasets, _ = record_data(out, s, [Variant("twin", "twin", twin=True)],
                              not args.no_progress, print)
    traces = {n: trace(out, s, n, datasets[True], args) for n in names}
    steps = [r["step"] for r in traces[names[0]]]
    print(f"\nkept of {traces[names[0]][0]['of']} visual tokens at inference (mean) / mean "
          f"cosine between two patches of an image, {args.task} twin, lr {args.lr}:")
    print(format_table(["step", *names],
                       [[st, *(f"{traces[n][i]['kept']:.1f} / {traces[n][i]['cos']:.2f}"
                               for n in names)] for i, st in enumerate(steps)]))
    if args.json:
        atomic_write_json(Path(args.json), json.loads(json.dumps(
            {"task": args.task, "lr": args.lr, "steps": args.steps, "traces": traces})))
        print(f"wrote {args.json}")
    return 0
