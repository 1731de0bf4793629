"""``memvla bench retrieval --success``: what an experience store does for a policy.

On ``unseen-names`` (:mod:`memvla.envs.unseen_names`): policies are trained on expert
episodes with the training words; then evaluated (``--eval-episodes``, test words never in
training, seeds 10000+) with stores of test-word episodes made by the scripted expert, no
training in between:

- variants: ``none`` (no retrieval), ``experience`` (trained retrieving successes of
  other training episodes), ``experience+failures`` (its training store also holds failed
  episodes: the expert sent to a wrong object, ``train.store``), and the same with the
  token pruner on (for the vote-entropy confidence);
- stores: none, ``successes`` (``--per-word`` successful episodes per test word),
  ``mixed`` (as many failures per word added, towards either wrong object), ``failures``
  (only failures, ``--per-word`` towards each wrong object: what is left is the answer);
- switching: the ``experience+failures`` policies with the ``successes`` store at each
  threshold of ``--thresholds``, per confidence measure (flow-sample spread; the pruner's
  vote entropy): success, the share of chunks that retrieved, the chunk latency;
- latency: the chunk latency (p50 of one lockstep call for ``--batch`` episodes) with
  retrieval always on against switching at ``--switch-at``, with the store grown to each
  of ``--store-sizes`` items by unrelated filler items (exact search).
"""

from __future__ import annotations

from pathlib import Path

import torch

TASK = "unseen-names"
# 32×32 images; 2 + 2 layers; a chunk every 4 steps, the item of a store its 4 actions
POLICY = ["policy.model.vision.image_size=32", "policy.model.text.depth=2",
          "policy.model.expert.depth=2", "policy.tokenizer.max_length=16",
          "policy.n_action_steps=4"]
EXPERIENCE = ["policy.context.kind=experience", "policy.context.store_chunk=4",
              "policy.context.store_dropout=0.25"]
PRUNER = ["policy.model.pruner.enabled=true"]


def add_arguments(parser) -> None:
    g = parser.add_argument_group("--success")
    g.add_argument("--success", action="store_true", help="train and evaluate policies with "
                   "and without stores on unseen-names (instead of the latency table)")
    g.add_argument("--out", default="bench-retrieval", help="runs, data and stores (--success)")
    g.add_argument("--episodes", type=int, default=1000, help="training episodes")
    g.add_argument("--failures", type=int, default=1000, help="failed training episodes in "
                   "the +failures variants' training store")
    g.add_argument("--steps", type=int, default=1500, help="training steps per variant")
    g.add_argument("--per-word", type=int, default=5, help="stored episodes per test word")
    g.add_argument("--eval-episodes", type=int, default=100)
    g.add_argument("--batch", type=int, default=8, help="episodes run in lockstep")
    g.add_argument("--thresholds", default="0.5,0.7,0.8,0.9",
                   help="confidence thresholds of the switching sweep")
    g.add_argument("--switch-at", type=float, default=0.8, help="the threshold of the "
                   "latency comparison")
    g.add_argument("--store-sizes", default="1000,100000,1000000",
                   help="store sizes of the latency comparison")
    g.add_argument("--no-progress", action="store_true")


def _train(out: Path, data: Path, overrides: list[str], steps: int, progress: bool):
    from ..policies import load_policy
    from ..training.loop import create_run, make_run_config, train

    if not (out / "checkpoints").is_dir():
        rc = make_run_config("tiny", str(data), steps, [
            *POLICY, "train.batch_size=32", "train.lr=1e-3", "train.num_workers=0",
            f"train.save_every={steps}", *overrides])
        create_run(out, rc, overwrite=True)
        train(out, progress=progress, desc=out.name)
    return load_policy(out, device="cpu").eval()


def _stores(root: Path, per_word: int, options: dict) -> dict:
    from ..retrieval import ExperienceStore
    from ..retrieval.record import store_from_expert, word_resets

    test = {**options, "names": "test"}

    def expert(resets, seed, store=None):
        return store_from_expert(TASK, resets, 4, 4, test, store, seed=seed, progress=False)

    def words(decoy: int = 0):
        return word_resets(TASK, per_word, test, decoy)

    successes = expert(words(), 0)
    wrong = [{**r, "decoy": 1 + i % 2} for i, r in enumerate(words())]  # both wrong objects
    mixed = expert(wrong, 50_000, ExperienceStore.load(successes.save(root / "successes")))
    failures = expert(words(2), 70_000, expert(words(1), 60_000))
    mixed.save(root / "mixed")
    failures.save(root / "failures")
    return {"successes": successes, "mixed": mixed, "failures": failures}


def _grown(store, size: int):
    """``store`` with unrelated filler items (random unit embeddings) up to ``size``."""
    from ..retrieval import ExperienceStore

    big = ExperienceStore(store.embedder, store.chunk, store.action_dim)
    big.add(store.embeddings, store.actions, store.success, store.episode)
    n = size - len(store)
    if n > 0:
        g = torch.Generator().manual_seed(0)
        filler = torch.nn.functional.normalize(torch.randn(n, store.dim, generator=g), dim=-1)
        big.add(filler, torch.zeros(n, store.chunk, store.action_dim),
                torch.zeros(n, dtype=torch.bool), torch.arange(n) + 10**7)
    return big


def run_success(args) -> dict:
    from ..data.record import generate_dataset
    from ..evaluate import evaluate
    from ..retrieval.record import store_from_expert

    out, progress = Path(args.out), not args.no_progress
    out.mkdir(parents=True, exist_ok=True)
    options = {"image_size": 32}
    data = out / "data"
    if not (data / "meta" / "info.json").is_file():
        generate_dataset(TASK, args.episodes, data, options=options, overwrite=True,
                         progress=progress)
    fails = out / "train-failures"
    if not (fails / "experience.json").is_file():
        half = args.failures // 2
        store = store_from_expert(TASK, [{"decoy": 1}] * half, 4, 4, options, seed=50_000,
                                  progress=progress)
        store_from_expert(TASK, [{"decoy": 2}] * (args.failures - half), 4, 4, options,
                          store, seed=50_000 + half, progress=progress).save(fails)
    variants = {"none": [], "experience": EXPERIENCE,
                "experience+failures": [*EXPERIENCE, f"train.store={fails}"],
                "experience+failures+pruner": [*EXPERIENCE, f"train.store={fails}", *PRUNER]}
    policies = {name: _train(out / "runs" / name.replace("+", "_"), data, o, args.steps,
                             progress) for name, o in variants.items()}
    stores = _stores(out / "stores", args.per_word, options)
    test = {**options, "names": "test"}

    def score(policy, store, threshold=None, confidence="spread"):
        if policy.model.context.retrieves:
            policy.config.context.retrieve_below = threshold
            policy.config.context.confidence = confidence
            policy.attach_experience(store)
        r, _ = evaluate(TASK, args.eval_episodes, policy, args.batch, 10_000, test,
                        progress=False)
        row = {"success": r["success_rate"], "ci95": r["ci95"],
               "chunk_ms_p50": r["chunk_latency_ms"]["p50"]}
        if "retrieval" in r:
            row["retrieved_share"] = r["retrieval"]["retrieved_share"]
        return row

    results = {"chance": 1 / 3, "stores": {k: len(v) for k, v in stores.items()},
               "success": {}, "switching": {}, "latency": {}}
    for name, policy in policies.items():
        cases = {"no store": None}
        if policy.model.context.retrieves:
            cases.update(stores)
        results["success"][name] = {case: score(policy, store) for case, store in cases.items()}
        print(name, results["success"][name], flush=True)
    for name, confidence in (("experience+failures", "spread"),
                             ("experience+failures+pruner", "spread"),
                             ("experience+failures+pruner", "entropy")):
        sweep = {f"{t:g}": score(policies[name], stores["successes"], t, confidence)
                 for t in (float(s) for s in args.thresholds.split(","))}
        results["switching"][f"{name} / {confidence}"] = sweep
        print(name, confidence, sweep, flush=True)
    policy = policies["experience+failures"]
    for size in (int(float(s)) for s in args.store_sizes.split(",")):
        big = _grown(stores["successes"], size)
        results["latency"][str(size)] = {"always": score(policy, big),
                                         "switching": score(policy, big, args.switch_at)}
        print(size, results["latency"][str(size)], flush=True)
        del big
    return results


def render(r: dict) -> str:
    from .timing import format_table

    lines = []
    cases = ["no store", "successes", "mixed", "failures"]
    rows = [[name, *(f"{v[c]['success']:.0%}" if c in v else "-" for c in cases)]
            for name, v in r["success"].items()]
    lines.append(format_table(["policy", *(f"store: {c}" for c in cases)], rows))
    lines.append(f"unseen-names, test words only; chance {r['chance']:.0%}; stores: "
                 + ", ".join(f"{k} {n} items" for k, n in r["stores"].items()))
    rows = [[name, t, f"{v['success']:.0%}", f"{v.get('retrieved_share', 0):.0%}",
             f"{v['chunk_ms_p50']:.1f}"]
            for name, sweep in r["switching"].items() for t, v in sweep.items()]
    lines.append(format_table(["policy / confidence", "threshold", "success",
                               "chunks retrieving", "chunk ms p50"], rows))
    rows = [[f"{int(size):,}", f"{v['always']['chunk_ms_p50']:.1f}",
             f"{v['switching']['chunk_ms_p50']:.1f}", f"{v['always']['success']:.0%}",
             f"{v['switching']['success']:.0%}",
             f"{v['switching'].get('retrieved_share', 0):.0%}"]
            for size, v in r["latency"].items()]
    lines.append(format_table(["store items", "always ms p50", "switching ms p50",
                               "always success", "switching success", "switching retrieves"],
                              rows))
    return "\n\n".join(lines)
