"""``memvla demo``: what memory buys, in one command.

1. records expert demonstrations of ``remember-color`` (a delay long enough that a
   memoryless policy cannot know the colour) and of its memoryless twin (the cue stays
   visible: the ceiling);
2. trains every variant of :data:`VARIANTS` on the same data and budget;
3. evaluates each in closed loop on the same seeds (on ``DemoSettings.device``), beside the
   scripted expert and chance;
4. prints a comparison table and writes ``DIR/report.md`` (table, training curves and a
   success plot as PNG) and ``DIR/results.json``.

A variant is a name, a label, the dataset it trains on and dotted config overrides, so
new temporal-context mechanisms join the comparison by adding one line.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .configs import ContextConfig
from .utils import atomic_write_json

TASK = "remember-color"  # the demo's task; sweeps may use any built-in task
EVAL_BATCH = 25  # evaluation environments in lockstep (the outcomes do not depend on it)


@dataclass
class Variant:
    name: str
    label: str
    overrides: list[str] = field(default_factory=list)
    twin: bool = False  # train and evaluate on the memoryless twin (the ceiling)
    preset: str | None = None  # None: the sweep's preset
    cost: float = 1.0  # training time relative to plain: the longest start first


VARIANTS = [
    Variant("plain", "plain VLA (no memory)"),
    Variant("memory-k0", "memory tokens, k=0 (segments detached)",
            ["policy.context.kind=memory_tokens", "train.bptt_depth=0"], cost=1.3),
    Variant("memory-bptt", "memory tokens, BPTT through the episode",
            ["policy.context.kind=memory_tokens", "train.bptt_depth=-1"], cost=1.3),
    Variant("memory-gated", "memory tokens, BPTT, gated write (old/new interpolation)",
            ["policy.context.kind=memory_tokens", "policy.context.memory_update=gated",
             "train.bptt_depth=-1"], cost=1.3),
    Variant("memory-noise", "memory tokens, BPTT, noise (0.1 RMS) on the carried memory",
            ["policy.context.kind=memory_tokens", "policy.context.memory_noise=0.1",
             "train.bptt_depth=-1"], cost=1.3),
    Variant("memory-assoc", "memory tokens, BPTT, an associative matrix written by the delta "
            "rule", ["policy.context.kind=memory_tokens",
                     "policy.context.memory_update=associative", "train.bptt_depth=-1"],
            cost=1.3),
    Variant("memory-norm", "memory tokens, BPTT, written after the backbone's final norm",
            ["policy.context.kind=memory_tokens", "policy.context.write=norm",
             "train.bptt_depth=-1"], cost=1.3),
    Variant("memory-scale", "memory tokens, BPTT, read at the other prefix tokens' RMS",
            ["policy.context.kind=memory_tokens", "policy.context.memory_scale=match",
             "train.bptt_depth=-1"], cost=1.3),
    Variant("memory-observe", "memory tokens, BPTT, also written 4 steps into each chunk",
            ["policy.context.kind=memory_tokens", "policy.context.observe_every=4",
             "train.bptt_depth=-1"], cost=2.0),
    Variant("memory-hold", "memory tokens, BPTT, taught to hold while the frame stands still",
            ["policy.context.kind=memory_tokens", "policy.context.hold_weight=1.0",
             "train.bptt_depth=-1"], cost=1.3),
    Variant("plain-twin", "plain VLA, cue visible (ceiling)", twin=True),
    Variant("frames", "frame history: 6 past frames every 10 steps as image tokens",
            ["policy.context.kind=frames"], cost=4.0),
    Variant("frames-3x8", "frame history: 3 past frames every 8 steps as image tokens",
            ["policy.context.kind=frames", "policy.context.num_frames=3",
             "policy.context.frame_stride=8"], cost=2.0),
    Variant("frames-mem", "frame history through MEM's space-time vision encoder",
            ["policy.context.kind=frames", "policy.context.frames_mode=mem"], cost=4.0),
    Variant("slow-fast", "slow-fast context: 8 turns in the KV cache, pooled older frames",
            ["policy.context.kind=slow_fast", "train.bptt_depth=-1"], cost=1.3),
    # a window shorter than the training episodes: training sees the cache reset and the
    # slow memory (with 8 turns, episodes of up to 8 chunks never do; docs/exam.md)
    Variant("slow-fast-4", "slow-fast context: 4 turns in the KV cache, pooled older frames",
            ["policy.context.kind=slow_fast", "policy.context.num_turns=4",
             "train.bptt_depth=-1"], cost=1.3),
    Variant("mamba", "Mamba backbone carrying its recurrent state (RoboMamba)",
            ["policy.model.backbone=mamba", "policy.context.kind=ssm_state",
             "train.bptt_depth=-1"], cost=1.5),
    Variant("mamba-twin", "Mamba backbone, cue visible (its ceiling)",
            ["policy.model.backbone=mamba", "policy.context.kind=ssm_state",
             "train.bptt_depth=-1"], twin=True, cost=1.5),
    Variant("bank", "memory bank: 16 pooled past observations, the 4 nearest in the prefix",
            ["policy.context.kind=bank", "train.bptt_depth=-1"], cost=1.3),
    Variant("bank-attn", "memory bank read by attention: 4 tokens, each a mix of every entry",
            ["policy.context.kind=bank", "policy.context.bank_read=attention",
             "train.bptt_depth=-1"], cost=1.3),
    Variant("bank-chain", "memory bank, each entry written from the newest one",
            ["policy.context.kind=bank", "policy.context.bank_chain=true",
             "train.bptt_depth=-1"], cost=1.3),
    Variant("slow-fast-voxel", "slow-fast context, older frames pruned by 0.5 m voxels "
            "(needs depth and pose)", ["policy.context.kind=slow_fast", "train.bptt_depth=-1",
                                       "policy.context.voxel_size=0.5"], cost=1.3),
]
# what the demo runs: the 4-step cue needs a frame stride below 10 (see README)
DEMO_VARIANTS = ["plain", "memory-bptt", "frames-3x8", "slow-fast", "plain-twin"]


@dataclass
class DemoSettings:
    """A sweep: one task, its expert data, every variant trained on the same budget and
    evaluated on the same seeds. The defaults are the demo's (about 4 minutes on a 2-core
    CPU); ``memvla bench memory`` runs bigger ones."""

    task: str = TASK
    episodes: int = 1500
    delay: int = 8  # remember-color: empty steps between cue and choice
    cue_steps: int = 4
    n_colors: int = 3
    palette_size: int = 3  # remember-color: the same three colours in every episode ...
    layout: str = "fixed"  # ... at the same places ...
    colors: str = "fixed"  # ... each with its own colour: what is left to learn is the memory
    options: dict = field(default_factory=dict)  # other task options (e.g. n_swaps)
    longer: dict = field(default_factory=dict)  # options of an extra evaluation, e.g. 3× delay
    data_options: dict = field(default_factory=dict)  # of the expert data only, e.g. max_swaps
    image_size: int = 32
    action_noise: float = 0.0  # perturbed demonstrations (DART), see memvla datagen
    steps: int = 1000  # memory tokens and slow-fast converge by ~600 (see README)
    frame_batch: int = 64  # frames per step for plain policies
    episode_batch: int = 16  # episodes per step for memory policies
    lr: float = 5e-4  # at 2e-3 the image tokens lose the cue before the memory can use it
    eval_episodes: int = 100
    seed: int = 0
    preset: str = "tiny"
    variants: list[str] = field(default_factory=lambda: list(DEMO_VARIANTS))
    overrides: list[str] = field(default_factory=list)  # extra dotted overrides, every run
    lanes: int = 2  # variants trained at the same time, one process (and thread) each
    device: str | None = None  # where the policies train and are evaluated (None: CUDA if any)

    @staticmethod
    def quick() -> DemoSettings:
        """A few seconds end to end: for tests, not for conclusions."""
        return DemoSettings(episodes=12, delay=3, steps=3, frame_batch=8, episode_batch=4,
                            eval_episodes=4, overrides=["policy.model.num_steps=2"], lanes=1)

    @property
    def eval_seed(self) -> int:
        """Evaluation episode i of every variant (and of the expert) uses seed eval_seed + i,
        apart from the data's seeds."""
        return 10_000 + self.seed

    def task_options(self, twin: bool, longer: bool = False, data: bool = False) -> dict:
        opts = {"image_size": self.image_size, "memoryless": twin}
        if self.task == "remember-color":
            opts.update(delay=self.delay, cue_steps=self.cue_steps, n_colors=self.n_colors,
                        palette_size=self.palette_size, layout=self.layout,
                        colors=self.colors)
        opts.update(self.options)
        if longer:
            opts.update(self.longer)
        if data:  # train on varied episodes (e.g. 0..3 swaps), evaluate on the fixed ones
            opts.update(self.data_options)
        return opts

    def policy_overrides(self, family: str = "flow") -> list[str]:
        # 32×32 images: patch 8 gives a 4×4 grid, pixel shuffle 2 -> 4 tokens per image;
        # `tiny` at 2 + 2 layers and 16 language tokens trains twice as fast on a CPU
        depth = ["policy.model.text.depth=2"]
        if family == "flow":
            depth.append("policy.model.expert.depth=2")
        return [f"policy.model.vision.image_size={self.image_size}", *depth,
                "policy.tokenizer.max_length=16"]


def variant_names(spec: str, default: list[str] | None = None) -> list[str]:
    """``--variants``: "a,b" runs a and b; "+a,+b" adds them to ``default`` (the demo's)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    added = [n[1:].strip() for n in names if n.startswith("+")]
    if added and len(added) != len(names):
        raise ValueError(f"--variants: either name the variants or add to the demo's with "
                         f"'+name', not both; got {spec!r}")
    if not added:
        return names
    base = list(DEMO_VARIANTS if default is None else default)
    return base + [n for n in added if n not in base]


def _variant(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    from .utils import did_you_mean

    raise ValueError(did_you_mean(name, [v.name for v in VARIANTS], what="demo variant"))


def run_sweep(out: str | Path, settings: DemoSettings | None = None, progress: bool = True,
              overwrite: bool = False, report: bool = True,
              variants: list[Variant] | None = None) -> dict:
    """Data, training and evaluation of every variant of ``settings`` in ``out``
    (``variants``: other variants than the demo's, e.g. those of a benchmark)."""
    from .evaluate import format_results
    from .policies import policy_device

    s = settings or DemoSettings()
    policy_device(s.device)  # a bad device fails before minutes of work
    if variants is None:
        variants = [_variant(n) for n in s.variants]
    else:
        s.variants = [v.name for v in variants]
    check_variants(s, variants)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another --out or pass "
                         "--overwrite")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    datasets, data_summaries = record_data(out, s, variants, progress, say)
    rows = train_variants(out, s, variants, datasets, progress, say)
    for r in rows:
        say(f"[demo] {r['variant']}: " + format_results(r["eval"]))
    say("[demo] evaluating the scripted expert")
    expert = evaluate_expert(s, progress)
    results = {"task": s.task, "settings": asdict(s), "variants": rows, "expert": expert,
               "chance_level": expert["chance_level"], "datasets": data_summaries,
               "wall_seconds": time.perf_counter() - t0}
    if report:
        write_report(out, results)
    else:
        atomic_write_json(out / "results.json", results)
    say(format_table(results))
    say(f"[demo] wrote {out / 'results.json'} ({results['wall_seconds']:.0f} s)")
    return results


def record_data(out: Path, s: DemoSettings, variants: list[Variant], progress: bool,
                say) -> tuple[dict[bool, Path], dict[str, dict]]:
    """1. The expert data: one dataset of the task (and one of its twin if a variant trains
    there) -> ({twin: dataset directory}, {dataset name: datagen summary})."""
    from .data.record import generate_dataset

    datasets, summaries = {}, {}
    for twin in sorted({v.twin for v in variants}):
        name = f"{s.task}-twin" if twin else s.task
        say(f"[demo] recording {s.episodes} expert episodes of {name}")
        summaries[name] = generate_dataset(s.task, s.episodes, out / "data" / name, seed=s.seed,
                                           options=s.task_options(twin, data=True),
                                           overwrite=True, progress=progress,
                                           action_noise=s.action_noise)
        datasets[twin] = out / "data" / name
    return datasets, summaries


def train_variants(out: Path, s: DemoSettings, variants: list[Variant],
                   datasets: dict[bool, Path], progress: bool, say) -> list[dict]:
    """2. training and 3. evaluation: each variant in its own process, ``lanes`` at a time
    (one thread each: on a small CPU this beats one process using every core)."""
    jobs = [(str(out), asdict(s), asdict(v), str(datasets[v.twin]), i % max(1, s.lanes),
             progress) for i, v in enumerate(variants)]
    if s.lanes <= 1 or len(jobs) <= 1:
        return [train_and_evaluate(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    say(f"[demo] training and evaluating {len(jobs)} variants, {s.lanes} at a time")
    ctx = multiprocessing.get_context("spawn")
    first = sorted(range(len(jobs)), key=lambda i: -variants[i].cost)  # longest first
    with ProcessPoolExecutor(max_workers=s.lanes, mp_context=ctx) as pool:
        futures = {i: pool.submit(train_and_evaluate, *jobs[i]) for i in first}
        return [futures[i].result() for i in range(len(jobs))]  # in the variants' order


def evaluate_expert(s: DemoSettings, progress: bool) -> dict:
    """The scripted expert on the variants' evaluation seeds: the ceiling of the task."""
    from .evaluate import evaluate

    expert, _ = evaluate(s.task, s.eval_episodes, None, batch=EVAL_BATCH, seed=s.eval_seed,
                         task_options=s.task_options(False), progress=progress)
    return expert


def run_demo(out: str | Path, settings: DemoSettings | None = None, progress: bool = True,
             overwrite: bool = False) -> dict:
    """The main job: the remember-color sweep with its report."""
    return run_sweep(out, settings or DemoSettings(), progress, overwrite, report=True)


def variant_kind(overrides: list[str]) -> str:
    """The context kind a variant's overrides set ("none" without one)."""
    kinds = [o.split("=", 1)[1] for o in overrides if o.startswith("policy.context.kind=")]
    return kinds[-1] if kinds else "none"


def for_context(overrides: list[str], variant: list[str]) -> list[str]:
    """The sweep's ``overrides`` that apply to a variant: a ``policy.context.X`` option only
    where X is an option of the variant's context kind (a plain variant takes no memory
    option), every other override as it is."""
    from .configs import CONTEXT_OPTIONS

    options = CONTEXT_OPTIONS[variant_kind(variant)]
    return [o for o in overrides if not o.startswith("policy.context.")
            or o.split("=", 1)[0].removeprefix("policy.context.") in (*options, "kind")]


def train_device(device: str | None) -> str:
    """The ``train.device`` of an evaluation device: "cpu", "cuda" (any GPU) or "auto"."""
    if device is None:
        return "auto"
    from .policies import policy_device

    return policy_device(device).type


def variant_overrides(s: DemoSettings, v: Variant) -> tuple[str, list[str]]:
    """A variant's preset and the dotted overrides of its run: the sweep's defaults, the
    variant's own, then the sweep's ``overrides`` (which win)."""
    from .presets import get_preset

    recurrent = ContextConfig(kind=variant_kind(v.overrides)).recurrent
    batch = s.episode_batch if recurrent else s.frame_batch
    preset = v.preset or s.preset
    family = get_preset(preset).family
    return preset, [*s.policy_overrides(family), f"train.batch_size={batch}",
                    f"train.lr={s.lr}", f"train.seed={s.seed}", "train.num_workers=0",
                    f"train.save_every={s.steps}", f"train.device={train_device(s.device)}",
                    *v.overrides, *for_context(s.overrides, v.overrides)]


def check_variants(s: DemoSettings, variants: list[Variant]) -> None:
    """Every variant's config, built before minutes of work: a bad override fails here."""
    from .config_utils import apply_overrides
    from .presets import get_preset
    from .training.config import RunConfig, TrainConfig

    for v in variants:
        preset, overrides = variant_overrides(s, v)
        bad = [o for o in overrides if not o.startswith(("policy.", "train."))]
        if bad:
            raise ValueError(f"variant {v.name}: overrides must start with 'policy.' or "
                             f"'train.', got {bad}")
        try:
            apply_overrides(RunConfig(preset, "", get_preset(preset), TrainConfig()), overrides)
        except ValueError as e:
            raise ValueError(f"variant {v.name}: {e}") from e


def train_and_evaluate(out: str, settings: dict, variant: dict, dataset: str, lane: int,
                       progress: bool) -> dict:
    """Train one variant (a :class:`Variant` as a dict) on ``dataset`` and evaluate it
    (runs in a worker process)."""
    import torch

    from .evaluate import evaluate, save_recordings
    from .policies import load_policy
    from .presets import count_parameters
    from .training.loop import create_run, make_run_config, read_run_config, train

    if settings["lanes"] > 1:
        torch.set_num_threads(1)
    s, v, out = DemoSettings(**settings), Variant(**variant), Path(out)
    run = out / "runs" / v.name
    preset, overrides = variant_overrides(s, v)
    rc = make_run_config(preset, dataset, s.steps, overrides)
    batch, recurrent = rc.train.batch_size, rc.policy.context.recurrent
    create_run(run, rc, overwrite=True)
    t_train = time.perf_counter()
    summary = train(run, progress=progress, desc=f"train {v.name}", position=lane)
    train_s = time.perf_counter() - t_train
    policy = load_policy(run, device=s.device).eval()
    res, recs = evaluate(s.task, s.eval_episodes, policy, batch=EVAL_BATCH, seed=s.eval_seed,
                         task_options=s.task_options(v.twin), record=2, progress=False)
    res["device"] = str(policy.device)
    vid_dir = out / "rollouts" / v.name
    vid_dir.mkdir(parents=True, exist_ok=True)
    res["videos"] = [str(Path("rollouts") / v.name / p) for p in save_recordings(recs, vid_dir)]
    longer = None
    if s.longer:
        longer, _ = evaluate(s.task, s.eval_episodes, policy, EVAL_BATCH, s.eval_seed,
                             s.task_options(v.twin, longer=True), progress=False)
    return {"variant": v.name, "label": v.label, "twin": v.twin,
            "parameters": count_parameters(read_run_config(run).policy),
            "train_seconds": train_s, "train_steps": s.steps,
            "samples_per_s": s.steps * batch / train_s,
            "sample": "episode" if recurrent else "frame",
            "final_loss": summary["losses"][-1], "eval": res, "eval_longer": longer,
            "run": str(run.relative_to(out))}


def latency_note(results: dict) -> str:
    wave = min(EVAL_BATCH, results["settings"]["eval_episodes"])
    return (f"chunk ms: one policy call that predicts an action chunk for {wave} environments "
            "in lockstep (median); step ms: the policy's time per environment step, averaged "
            "(one chunk call every n_action_steps steps, queue pops in between)")


def format_table(results: dict) -> str:
    head = (f"{'variant':<14}{'trained on':<12}{'success':>9}{'95% CI':>15}{'chunk ms':>10}"
            f"{'step ms':>9}{'params':>10}{'train s':>9}")
    lines = [head, "-" * len(head)]
    for r in results["variants"]:
        e = r["eval"]
        lo, hi = e["ci95"]
        lines.append(f"{r['variant']:<14}{'twin' if r['twin'] else 'memory task':<12}"
                     f"{e['success_rate']:>9.1%}{f'{lo:.0%}-{hi:.0%}':>15}"
                     f"{e['chunk_latency_ms']['p50']:>10.2f}{e['step_latency_ms']:>9.2f}"
                     f"{r['parameters']:>10,}{r['train_seconds']:>9.0f}")
    ex = results["expert"]
    lines.append(f"{'expert':<14}{'-':<12}{ex['success_rate']:>9.1%}")
    lines.append(f"{'chance':<14}{'-':<12}{results['chance_level']:>9.1%}")
    return "\n".join([*lines, latency_note(results)])


def write_report(out: Path, results: dict) -> None:
    """``report.md`` (the table, the plots, the rollouts), ``training_curves.png``,
    ``success.png`` and ``results.json`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    plot_training_curves(out, results)
    plot_success(out, results)
    (out / "report.md").write_text(report_markdown(results))
    atomic_write_json(out / "results.json", results)


def plot_training_curves(out: Path, results: dict) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in results["variants"]:
        lines = (out / r["run"] / "metrics.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        ax.plot([x["step"] for x in recs], [x["loss"] for x in recs], label=r["variant"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120)
    plt.close(fig)


def plot_success(out: Path, results: dict) -> None:
    """Success per variant with its 95% interval, chance and the expert."""
    import matplotlib.pyplot as plt

    evals = [r["eval"] for r in results["variants"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rates = [e["success_rate"] for e in evals]
    err = [[e["success_rate"] - e["ci95"][0] for e in evals],
           [e["ci95"][1] - e["success_rate"] for e in evals]]
    ax.bar([r["variant"] for r in results["variants"]], rates, yerr=err, capsize=4,
           color="#4c72b0")
    ax.axhline(results["chance_level"], color="red", ls="--", label="chance")
    ax.axhline(results["expert"]["success_rate"], color="green", ls=":", label="expert")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=15, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "success.png", dpi=120)
    plt.close(fig)


def report_markdown(results: dict) -> str:
    s = results["settings"]
    md = [f"# memvla demo: {results['task']}", "",
          f"Cue {s['cue_steps']} steps, delay {s['delay']} steps, {s['n_colors']} colours, "
          f"{s['image_size']}×{s['image_size']} images; {s['episodes']} expert episodes per "
          f"dataset; {s['steps']} training steps per variant (preset `{s['preset']}`); "
          f"{s['eval_episodes']} evaluation episodes per variant on the same seeds. "
          f"Wall time {results['wall_seconds']:.0f} s.", "",
          "| variant | what | success | 95% CI | chunk ms (p50) | step ms (mean) | parameters "
          "| train (s) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in results["variants"]:
        e = r["eval"]
        md.append(f"| {r['variant']} | {r['label']} | {e['success_rate']:.1%} | "
                  f"{e['ci95'][0]:.1%}–{e['ci95'][1]:.1%} | {e['chunk_latency_ms']['p50']:.2f} | "
                  f"{e['step_latency_ms']:.2f} | {r['parameters']:,} | "
                  f"{r['train_seconds']:.0f} |")
    md += [f"| expert | scripted | {results['expert']['success_rate']:.1%} | | | | | |",
           f"| chance | 1 / colours | {results['chance_level']:.1%} | | | | | |", "",
           f"Latency: {latency_note(results)}.", "",
           "![training curves](training_curves.png)", "", "![success](success.png)", "",
           "Rollouts: " + ", ".join(f"[{p}]({p})" for r in results["variants"]
                                    for p in r["eval"]["videos"]), ""]
    return "\n".join(md)
