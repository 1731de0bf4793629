"""``memvla exam``: every temporal-context kind on every memory task, at 1×, 3× and 10× the
trained horizon, on the same data, steps and seeds.

A **cell** is one kind on one task: trained once on the task's expert data (the horizon
varied up to the trained one where the task allows it), then evaluated on the same seeds
at each multiple of the trained horizon (:data:`HORIZONS`: remember-color's delay,
shell-game's swaps, seq-of-colors' sequence length, take-it-back's delay, memory-maze's
tour length); a multiple the task cannot take (seq-of-colors has 9 colours, memory-maze 4
markers) is reported as such. Beside the kinds, each task's memoryless twin trained
without memory (``plain-twin``: the cue stays visible) is the ceiling, and chance is the
task's.

Each cell writes ``cells/<task>/<kind>.json`` when done, so an interrupted exam resumes
where it stopped; the settings are in ``exam.json``, and a directory of other settings is
refused, naming the keys that differ. Cells run in ``workers`` processes (one thread
each). The report: ``report.md`` (success with 95% intervals per horizon, the cost
columns: per-step latency, carried-state bytes per episode, parameters) and
``results.json``, and ``heatmap.png`` (kind × task × horizon).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .context import state_batch, state_leaves
from .utils import atomic_write_json, did_you_mean, read_json

FORMAT = "memvla-exam-1"
# the kinds: demo variants (memvla.demo.VARIANTS), and the ceiling; the memory-token
# variants of memory beyond training run when asked for (--kinds)
DEFAULT_KINDS = ("plain", "memory-k0", "memory-bptt", "frames-3x8", "slow-fast-4", "mamba",
                 "bank")
KINDS = (*DEFAULT_KINDS, "slow-fast", "memory-gated", "memory-noise", "memory-assoc",
         "memory-scale", "memory-norm", "memory-observe", "memory-hold", "bank-attn",
         "bank-chain")
CEILING = "plain-twin"


@dataclass(frozen=True)
class Horizon:
    """A task's horizon: the option, its trained value, the largest value the task takes,
    the options of the training data (``{H}``: the trained value) and of every run, the
    cell's overrides, and its training steps as a multiple of the exam's (a task whose
    ceiling needs more: every kind on it gets the same)."""

    option: str
    trained: int
    limit: int | None = None
    data: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    overrides: tuple = ()
    steps: int = 1


HORIZONS = {
    "remember-color": Horizon("delay", 30, data={"delay": 0, "max_delay": "{H}"}),
    # a swap lasts one chunk (8 frames, as the sweeps): the memory is written once per chunk
    "shell-game": Horizon("n_swaps", 3, data={"n_swaps": 0, "max_swaps": "{H}"},
                          options={"swap_steps": 8}),
    # touch three discs in order: the ceiling is 14% at 3,000 steps, 58% at 9,000
    "seq-of-colors": Horizon("n_items", 3, limit=9, steps=3),
    # grasp, carry and return: the ceiling is 21% at 3,000 steps, 73% at 9,000
    "take-it-back": Horizon("delay", 4, steps=3),
    # the display shows the next move only: replan every 2 steps (as the sweeps do)
    "memory-maze": Horizon("n_markers", 1, limit=4,
                           overrides=("policy.n_action_steps=2", "policy.context.pool_stride=1",
                                      "policy.tokenizer.max_length=32")),
}
TASKS = tuple(HORIZONS)


@dataclass
class ExamSettings:
    """What every cell shares. The defaults are the full exam; :meth:`quick` a small one."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    multiples: list[int] = field(default_factory=lambda: [1, 3, 10])
    episodes: int = 1500
    steps: int = 3000
    eval_episodes: int = 100
    image_size: int = 32
    seed: int = 0
    preset: str = "tiny"
    scale: float = 1.0  # the trained horizons × scale (rounded, at least 1): quick exams
    task_steps_multiple: bool = True  # some tasks train for Horizon.steps × steps (not quick)

    def __post_init__(self):
        for name, known, what in (("tasks", TASKS, "exam task"), ("kinds", KINDS, "exam kind")):
            for x in getattr(self, name):
                if x not in known:
                    raise ValueError(did_you_mean(x, known, what=what))
        if not self.multiples or any(m < 1 for m in self.multiples):
            raise ValueError(f"exam multiples must be integers >= 1, got {self.multiples}")
        for name in ("episodes", "steps", "eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"exam {name} must be >= 1, got {getattr(self, name)}")

    @staticmethod
    def quick(**changes) -> ExamSettings:
        """Minutes on a 2-core CPU: a check that every cell runs, not a result."""
        return ExamSettings(**{"episodes": 100, "steps": 150, "eval_episodes": 10,
                               "scale": 0.25, "task_steps_multiple": False, **changes})

    def trained(self, task: str) -> int:
        return max(1, round(HORIZONS[task].trained * self.scale))

    def task_steps(self, task: str) -> int:
        """The training steps of the task's cells."""
        return self.steps * (HORIZONS[task].steps if self.task_steps_multiple else 1)

    def identity(self) -> dict:
        """What a cached cell depends on (compared with a resumed directory's)."""
        return {"format": FORMAT, **asdict(self)}


def horizon_value(s: ExamSettings, task: str, multiple: int) -> int | None:
    """The horizon option's value at ``multiple`` × the trained one (None: beyond what the
    task takes)."""
    value = s.trained(task) * multiple
    limit = HORIZONS[task].limit
    return None if limit is not None and value > limit else value


def task_settings(s: ExamSettings, task: str, kind: str):
    """The :class:`memvla.demo.DemoSettings` of one cell (its data, training, evaluation)."""
    from .demo import DemoSettings

    h = HORIZONS[task]
    trained = s.trained(task)
    d = DemoSettings(task=task, episodes=s.episodes, steps=s.task_steps(task),
                     eval_episodes=s.eval_episodes, image_size=s.image_size, seed=s.seed,
                     preset=s.preset, episode_batch=8, lanes=1, variants=[kind],
                     overrides=list(h.overrides))
    d.options = {**h.options, h.option: trained}
    d.data_options = {k: trained if v == "{H}" else v for k, v in h.data.items()}
    return d


def cell_path(out: Path, task: str, kind: str) -> Path:
    return out / "cells" / task / f"{kind}.json"


def check_directory(out: Path, s: ExamSettings) -> None:
    """Write ``exam.json``, or check the one there is of the same settings."""
    path = out / "exam.json"
    if path.is_file():
        saved = read_json(path)
        mine = s.identity()
        diff = sorted(k for k in {*saved, *mine} if saved.get(k) != mine.get(k)
                      and k not in ("tasks", "kinds"))
        if diff:
            raise ValueError(f"{out}: an exam of other settings ("
                             + "; ".join(f"{k} is {saved.get(k)!r} there, {mine.get(k)!r} here"
                                         for k in diff)
                             + "); its cells would be mixed with these: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, s.identity())


def cell_definition(s: ExamSettings, task: str, kind: str) -> tuple[str, list[str]]:
    """The preset and the overrides a cell trains with (what its cache must match)."""
    from .demo import _variant, variant_overrides

    preset, overrides = variant_overrides(task_settings(s, task, kind), _variant(kind))
    return preset, list(overrides)


def task_version(task: str) -> int:
    """The version of a task's episodes (:attr:`memvla.envs.TaskEnv.version`)."""
    from .envs import TASKS

    return TASKS[task].env_class.version


def check_version(where: Path, recorded: int, task: str) -> None:
    """Refuse a cached cell or dataset recorded from another version of its task."""
    if recorded != task_version(task):
        raise ValueError(f"{where}: recorded with version {recorded} of {task!r}, this memvla "
                         f"has version {task_version(task)} (its episodes changed); delete it "
                         "to record and train it again")


def check_cached(path: Path, s: ExamSettings, task: str, kind: str) -> dict:
    """A cached cell, refused when it was trained with another definition of its kind or
    another version of its task (a cell of an earlier exam records neither: version 1, its
    overrides taken as they are)."""
    cell = read_json(path)
    check_version(path, cell.get("task_version", 1), task)
    if cell.get("steps", s.steps) != s.task_steps(task):
        raise ValueError(f"{path}: this cell was trained for {cell.get('steps', s.steps)} "
                         f"steps, {task!r} cells now train for {s.task_steps(task)}; delete "
                         "the file to train it again")
    if "overrides" in cell:
        preset, overrides = cell_definition(s, task, kind)
        if (cell.get("preset"), cell["overrides"]) != (preset, overrides):
            extra = sorted(set(cell["overrides"]) ^ set(overrides))
            raise ValueError(f"{path}: this cell was trained with another definition of "
                             f"{kind!r} (differing: {extra or [cell.get('preset'), preset]}); "
                             "delete the file to train it again")
    return cell


def record_task_data(out: Path, s: ExamSettings, task: str, progress: bool) -> dict:
    """The task's expert data and its twin's (recorded once, shared by its cells)."""
    from .data.record import generate_dataset

    d = task_settings(s, task, "plain")
    paths = {}
    for twin in (False, True):
        path = out / "data" / (f"{task}-twin" if twin else task)
        info = path / "meta" / "info.json"
        if info.is_file():
            check_version(path, read_json(info).get("memvla", {}).get("task_version", 1), task)
        else:
            generate_dataset(task, s.episodes, path, seed=s.seed,
                             options=d.task_options(twin, data=True), overwrite=True,
                             progress=progress)
        paths[twin] = path
    return paths


def state_bytes(state) -> int:
    """Bytes of a carried temporal-context state (every tensor leaf)."""
    return sum(t.numel() * t.element_size() for t in state_leaves(state))


def run_cell(out: str, settings: dict, task: str, kind: str, dataset: str,
             threads: int = 1) -> dict:
    """Train one cell and evaluate it at every multiple; writes its JSON (a worker)."""
    import torch

    from .demo import _variant
    from .evaluate import evaluate
    from .policies import load_policy
    from .presets import count_parameters
    from .training.loop import create_run, make_run_config, read_run_config, train

    torch.set_num_threads(threads)
    start = time.perf_counter()
    s, out = ExamSettings(**settings), Path(out)
    d = task_settings(s, task, kind)
    v = _variant(kind)
    run = out / "runs" / task / kind
    preset, overrides = cell_definition(s, task, kind)
    rc = make_run_config(preset, dataset, s.task_steps(task), overrides)
    create_run(run, rc, overwrite=True)
    t0 = time.perf_counter()
    summary = train(run, progress=False)
    train_s = time.perf_counter() - t0
    policy = load_policy(run, device="cpu").eval()
    h, horizons = HORIZONS[task], {}
    cost = {}
    for m in s.multiples:
        value = horizon_value(s, task, m)
        if value is None:
            horizons[str(m)] = {"value": s.trained(task) * m, "skipped": f"{h.option} "
                                f"<= {h.limit} in {task}"}
            continue
        options = {**d.task_options(v.twin), h.option: value}  # a fixed horizon
        res, _ = evaluate(task, s.eval_episodes, policy, batch=25, seed=d.eval_seed,
                          task_options=options, progress=False)
        horizons[str(m)] = {"value": value, "success": res["success_rate"],
                            "ci95": res["ci95"], "episodes": res["episodes"],
                            "outcomes": res["outcomes"]}
        if not cost:  # at the trained horizon
            state = policy.context_state  # of the last wave's episodes
            cost = {"step_ms": res["step_latency_ms"],
                    "chunk_ms_p50": res["chunk_latency_ms"]["p50"],
                    "state_bytes": state_bytes(state) // (state_batch(state) or 1),
                    "chance": res["chance_level"]}
    result = {"task": task, "task_version": task_version(task), "kind": kind, "label": v.label,
              "horizon": h.option, "trained_horizon": s.trained(task), "horizons": horizons,
              "parameters": count_parameters(read_run_config(run).policy),
              "preset": preset, "overrides": list(overrides),
              "steps": s.task_steps(task), "final_loss": summary["losses"][-1],
              "train_seconds": train_s,
              "cell_seconds": time.perf_counter() - start, **cost}
    atomic_write_json(cell_path(out, task, kind), result)
    return result


def run_exam(out: str | Path, s: ExamSettings, workers: int = 2, progress: bool = True,
             train: bool = True) -> dict:
    """Every cell of ``s`` (cached ones read back), then the report. ``train=False``: the
    report of the cached cells only, the others listed as not run."""
    from tqdm import tqdm

    out = Path(out)
    check_directory(out, s)
    t0 = time.perf_counter()
    cells, todo, missing = {}, [], []
    for task in s.tasks:
        data = record_task_data(out, s, task, progress) if train else {}
        for kind in [*s.kinds, CEILING]:
            path = cell_path(out, task, kind)
            if path.is_file():
                cells[task, kind] = {**check_cached(path, s, task, kind), "cached": True}
            elif train:
                todo.append((str(out), asdict(s), task, kind, str(data[kind == CEILING])))
            else:
                missing.append(f"{task}/{kind}")
    bar = tqdm(total=len(todo), desc="exam cells", disable=not progress)

    def done(task: str, kind: str, cell: dict) -> None:
        cells[task, kind] = cell
        if progress:
            bar.write(f"{task}/{kind}: " + ", ".join(f"{m}× {_rate(cell, m)}"
                                                     for m in s.multiples)
                      + f" ({cell['cell_seconds']:.0f} s)")
        bar.update(1)

    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            done(job[2], job[3], run_cell(*job, threads=max(1, workers)))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(run_cell, *job): job for job in todo}
            for f in as_completed(futures):
                job = futures[f]
                try:
                    cell = f.result()
                except Exception as e:  # stop now: the finished cells stay cached
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise RuntimeError(f"exam cell {job[2]}/{job[3]} failed ({e!r}); the "
                                       "finished cells are cached: rerun to resume") from e
                done(job[2], job[3], cell)
    bar.close()
    results = {"settings": asdict(s), "wall_seconds": time.perf_counter() - t0,
               "cells": [cells[t, k] for t in s.tasks for k in [*s.kinds, CEILING]
                         if (t, k) in cells], "not_run": missing}
    write_report(out, results)
    return results


def _rate(cell: dict, m: int) -> str:
    h = cell["horizons"].get(str(m))
    if h is None:
        return "-"
    if "skipped" in h:
        return "n/a"
    lo, hi = h["ci95"]
    return f"{h['success']:.0%} ({lo:.0%}–{hi:.0%})"


def _timeouts(cells: list[dict], ms: list[int]) -> list[str]:
    """A line on the failures that ran out of steps (the others chose wrong), per horizon."""
    parts = []
    for c in cells:
        counts = [c["horizons"].get(str(m), {}).get("outcomes") for m in ms]
        if any(counts):
            parts.append(f"{c['kind']} " + " / ".join(
                "-" if o is None else f"{o['timeout']} of {o['failed'] + o['timeout']}"
                for o in counts))
    if not parts:  # cells of an older version count no outcomes
        return []
    return ["Failed episodes that ran out of steps (the others chose wrong), per horizon: "
            + "; ".join(parts) + ".", ""]


def _cell_seconds(cells: list[dict]) -> float:
    return sum(c.get("cell_seconds", c.get("train_seconds", 0.0)) for c in cells)


def report_markdown(results: dict) -> str:
    s = ExamSettings(**results["settings"])
    ms = s.multiples
    md = ["# memvla exam", "",
          f"{s.episodes} expert episodes per task, {s.steps} training steps per cell "
          f"(preset `{s.preset}`, {s.image_size} px), {s.eval_episodes} evaluation episodes "
          f"per horizon on the same seeds. Wall time {results['wall_seconds']:.0f} s (cached "
          f"cells not counted); the cells took {_cell_seconds(results['cells']):,.0f} s of "
          "one core each in all, cached ones included (training and evaluation; a cell of an "
          "earlier version counts its training only).", ""]
    for task in s.tasks:
        cells = [c for c in results["cells"] if c["task"] == task]
        h = HORIZONS[task]
        if not cells:
            md += [f"## {task}", "", "Not run.", ""]
            continue
        md += [f"## {task}", "",
               f"Horizon: `{h.option}`, trained at {s.trained(task)}"
               + (f" for {s.task_steps(task):,} steps" if s.task_steps(task) != s.steps
                  else "") + "; chance "
               f"{cells[0].get('chance', float('nan')):.0%}.", "",
               "| kind | " + " | ".join(f"{m}× ({s.trained(task) * m})" for m in ms)
               + " | step ms | state bytes | parameters |",
               "|---" * (len(ms) + 4) + "|"]
        for c in cells:
            name = f"{c['kind']} (ceiling)" if c["kind"] == CEILING else c["kind"]
            md.append(f"| {name} | " + " | ".join(_rate(c, m) for m in ms)
                      + f" | {c.get('step_ms', float('nan')):.2f} | {c.get('state_bytes', 0):,}"
                      f" | {c['parameters']:,} |")
        md += ["", *_timeouts(cells, ms)]
    if results.get("not_run"):
        md += ["Not run (no cached cell): " + ", ".join(results["not_run"]) + ".", ""]
    md += ["![success by kind, task and horizon](heatmap.png)", ""]
    return "\n".join(md)


def plot_heatmap(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = ExamSettings(**results["settings"])
    kinds = [*s.kinds, CEILING]
    cols = [(t, m) for t in s.tasks for m in s.multiples]
    grid = np.full((len(kinds), len(cols)), np.nan)
    for c in results["cells"]:
        for j, (t, m) in enumerate(cols):
            h = c["horizons"].get(str(m), {})
            if c["task"] == t and "success" in h:
                grid[kinds.index(c["kind"]), j] = h["success"]
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(cols), 1 + 0.4 * len(kinds)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xticks(range(len(cols)), [f"{t}\n{m}×" for t, m in cols], fontsize=6, rotation=90)
    for i in range(len(kinds)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=5,
                        color="white" if grid[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="success")
    fig.tight_layout()
    fig.savefig(out / "heatmap.png", dpi=120)
    plt.close(fig)


def write_report(out: Path, results: dict) -> None:
    plot_heatmap(out, results)
    (out / "report.md").write_text(report_markdown(results))
    atomic_write_json(out / "results.json", results)
