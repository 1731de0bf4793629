"""The training loop behind ``memvla train``: Hugging Face Accelerate (single process, or
DDP under ``accelerate launch`` / ``torchrun``; gloo on CPU), AdamW with warmup + cosine
decay and gradient clipping, a step-indexed sampler, atomic checkpoints every K steps and
on SIGINT/SIGTERM (the newest ``train.keep_checkpoints`` kept), exact resumption, a
progress bar and metrics in ``RUN/metrics.jsonl``.

:func:`train` reads as its steps: :func:`setup` (the run's config, the accelerator, the
seeds, the dataset, the policy, the optimiser, the last checkpoint restored, the metrics
cut back to it, the data loader), then for every step :func:`train_step`, the
:class:`Log` and :func:`memvla.training.state.save_checkpoint`."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config_utils import apply_overrides, from_dict, to_dict
from ..policies.frames import FrameCollate, frame_delta_indices
from ..presets import get_preset
from ..utils import atomic_write_bytes, atomic_write_json
from .config import RunConfig, TrainConfig
from .init_from import checkpoint_policy_config, freeze, load_init_weights
from .sampler import StepBatchSampler
from .schedule import lr_at
from .state import (
    CHECKPOINTS,
    LAST,
    RUN_FILE,
    last_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    seed_process,
)

METRICS_FILE = "metrics.jsonl"

# Training defaults per preset where SmolVLA's (made for 450M parameters) do not fit.
PRESET_TRAIN_DEFAULTS = {
    "tiny": {"lr": 1e-3, "batch_size": 32, "warmup_steps": 100, "weight_decay": 1e-4,
             "save_every": 500},
    # (measured when tiny-oft regressed with L1, which at 1e-3 settled on the median chunk)
    "tiny-oft": {"lr": 3e-4, "batch_size": 32, "warmup_steps": 100, "weight_decay": 1e-4,
                 "save_every": 500},
}


# -- run configuration ----------------------------------------------------------------------
def dataset_features(root: str) -> dict:
    from ..data.v3_format import read_info

    return read_info(Path(root))["features"]


def fit_policy_to_dataset(cfg, features: dict, where: str):
    """Set cameras, image shape, state and action dims of the policy from the dataset."""
    cams = [k.split(".", 2)[2] for k, f in features.items()
            if k.startswith("observation.images.") and f["dtype"] in ("image", "video")]
    missing = [k for k in ("observation.state", "action") if k not in features]
    if missing or not cams:
        what = missing + ([] if cams else ["observation.images.<camera>"])
        raise ValueError(f"{where}: the dataset lacks the features {what} a VLA policy needs")
    h, w, c = features[f"observation.images.{cams[0]}"]["shape"]
    for cam in cams[1:]:
        if features[f"observation.images.{cam}"]["shape"] != [h, w, c]:
            raise ValueError(f"{where}: cameras have different image shapes; memvla needs one")
    overrides = [f"cameras={json.dumps(cams)}", f"image_shape=[{c}, {h}, {w}]",
                 f"state_dim={features['observation.state']['shape'][0]}",
                 f"action_dim={features['action']['shape'][0]}"]
    return apply_overrides(cfg, overrides)


def resume_run_config(saved: RunConfig, preset: str | None, dataset: str | None,
                      steps: int | None, overrides: list[str]) -> RunConfig:
    """The saved run config with what the resuming command line asks for applied; any
    difference from the saved config is an error naming it."""
    asked = saved
    if steps is not None:
        overrides = [f"train.steps={steps}", *overrides]
    if overrides:
        asked = apply_overrides(saved, overrides)
    if preset is not None and preset != saved.preset:
        asked = replace(asked, preset=preset)
    if dataset is not None and str(Path(dataset).resolve()) != saved.dataset:
        asked = replace(asked, dataset=str(Path(dataset).resolve()))
    diff = config_differences(saved, asked)
    if diff:
        raise ValueError("the run was made with a different config: " + "; ".join(diff))
    return saved


def make_run_config(preset: str | None, dataset: str, steps: int | None,
                    overrides: list[str], init_from: str | None = None) -> RunConfig:
    """Preset (or the config of checkpoint ``init_from``, whose weights the run starts
    from) + dataset features + per-preset training defaults + dotted overrides
    (``policy.model.chunk_size=8``, ``train.lr=3e-4``)."""
    from ..data.v3_format import read_info

    read_info(Path(dataset))  # a clear error for a directory that is not a v3.0 dataset
    if init_from:
        ckpt, base = checkpoint_policy_config(init_from)
        init_from, preset = str(ckpt.resolve()), preset or ""
    else:
        base = get_preset(preset)
    policy = fit_policy_to_dataset(base, dataset_features(dataset),
                                   str(Path(dataset) / "meta" / "info.json"))
    train = TrainConfig(**PRESET_TRAIN_DEFAULTS.get(preset, {}))
    rc = RunConfig(preset=preset, dataset=str(Path(dataset).resolve()), policy=policy,
                   train=train, init_from=init_from or "")
    if steps is not None:
        overrides = [f"train.steps={steps}", *overrides]
    bad = [o for o in overrides if not o.startswith(("policy.", "train."))]
    if bad:
        raise ValueError(f"overrides must start with 'policy.' or 'train.', got {bad} "
                         "(e.g. policy.model.chunk_size=8 or train.lr=3e-4)")
    return apply_overrides(rc, overrides)


def read_run_config(run: Path) -> RunConfig:
    path = run / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; is {run} a memvla training run?")
    try:
        return from_dict(RunConfig, json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt JSON ({e})") from e


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "normalization":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return [f"{k}: run has {fa.get(k)!r}, asked {fb.get(k)!r}" for k in sorted(fa)
            if fa.get(k) != fb.get(k)]


def create_run(out: Path, rc: RunConfig, overwrite: bool = False) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty; continue it with "
                             f"--resume {out}, or replace it with --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, to_dict(rc))


# -- helpers --------------------------------------------------------------------------------
@contextmanager
def stop_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks after every step."""
    caught: list[int] = []

    def handler(signum, frame):
        caught.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def params_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _on_cpu(device: str) -> bool:
    """``train.device`` -> whether to train on the CPU (a clear error for CUDA without one)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but CUDA is not available here; use "
                         "train.device=cpu (or auto)")
    return device == "cpu" or not torch.cuda.is_available()


def _mixed_precision(choice: str, device: str = "auto") -> str:
    if choice != "auto":
        return choice
    gpu = not _on_cpu(device)
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"


def trim_metrics(path: Path, step: int) -> None:
    """Drop the lines of ``path`` logged after ``step`` (by a run killed after its last
    checkpoint; the resumed run logs those steps again), and a line cut short."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and rec.get("step", 0) <= step:
            kept.append(line)
    if kept != lines:
        atomic_write_bytes(path, "".join(kept).encode())


# -- the run --------------------------------------------------------------------------------
@dataclass
class Training:
    """Everything a run's steps use, as :func:`setup` made it."""

    run: Path
    rc: RunConfig
    acc: object  # accelerate.Accelerator
    policy: object  # the policy (unwrapped)
    model: torch.nn.Module  # the policy as Accelerate prepared it (DDP-wrapped if several)
    params: list[torch.nn.Parameter]  # the trained parameters
    opt: torch.optim.Optimizer
    loader: object  # this process's batches of steps start .. train.steps - 1
    start: int  # the step of the restored checkpoint (0: a fresh run)

    @property
    def tc(self) -> TrainConfig:
        return self.rc.train


def setup(run: Path, progress: bool = True) -> Training:
    """Build the run in directory ``run`` or restore its last checkpoint (``progress``:
    bars for the slow parts of building it)."""
    from accelerate import Accelerator

    from ..policies import make_policy

    rc = read_run_config(run)
    tc = rc.train
    acc = Accelerator(cpu=_on_cpu(tc.device),
                      mixed_precision=_mixed_precision(tc.mixed_precision, tc.device))
    torch.manual_seed(tc.seed)  # the initial weights: the same on every process
    ds = _dataset(rc)
    policy = make_policy(rc.policy, stats=ds.stats)
    if policy.model.context.retrieves:  # the training set's items, never a sample's own
        policy.attach_experience(training_store(rc, progress and acc.is_main_process),
                                 exclude_own=True)
    if rc.init_from:  # (a resumed run's checkpoint then replaces these weights)
        load_init_weights(policy.model, rc.init_from)
    seed_process(tc.seed, acc.process_index)
    for name, p in policy.model.named_parameters():
        if name in policy.model.unused_parameter_names():
            p.requires_grad_(False)  # never reached by the loss (see unused_parameter_names)
    if tc.freeze:
        freeze(policy.model, tc.freeze)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, eps=tc.eps,
                            weight_decay=tc.weight_decay)
    # weights, optimiser state and this process's RNG states of the last checkpoint
    start = restore_checkpoint(run, policy, opt, acc.process_index)
    if acc.is_main_process:
        trim_metrics(run / METRICS_FILE, start)
    model, opt = acc.prepare(policy, opt)
    loader = make_loader(ds, policy, tc, start, acc.process_index, acc.num_processes,
                         pin_memory=acc.device.type == "cuda")
    return Training(run, rc, acc, policy, model, params, opt, loader, start)


CACHE_BYTES = 4e9  # decoded frames of a dataset kept in memory at most


def _dataset(rc: RunConfig):
    from ..data.lerobot_v3 import LeRobotV3Dataset

    # images stay uint8 until the policy converts them on its device; a dataset whose
    # decoded frames fit in CACHE_BYTES is decoded once (worker processes share the arrays),
    # a larger one is decoded per sample (videos by seeking), in bounded memory
    ds = LeRobotV3Dataset(rc.dataset, delta_indices=frame_delta_indices(rc.policy),
                          images_as="uint8")
    if ds.num_frames * _frame_bytes(ds) < CACHE_BYTES:
        ds.preload_images()
    else:
        ds.image_cache = False
    fitted = fit_policy_to_dataset(rc.policy, ds.features, str(Path(rc.dataset)))
    if fitted != rc.policy:
        raise ValueError(f"{rc.dataset}: the dataset's cameras/shapes no longer match the run "
                         f"({config_differences(rc, replace(rc, policy=fitted))})")
    return ds


def training_store(rc: RunConfig, progress: bool = True):
    """The experience store a ``context.kind="experience"`` run trains with: an item of
    the training set every ``n_action_steps`` frames (what a chunk executes), all
    successes, with the dataset's episode indices; and the items of ``train.store``."""
    from ..retrieval import ExperienceStore, ObservationEmbedder, store_from_dataset

    cfg = rc.policy
    store = store_from_dataset(rc.dataset, cfg.context.store_chunk, cfg.n_action_steps,
                               embedder=ObservationEmbedder(cameras=len(cfg.image_keys)),
                               progress=progress)
    if rc.train.store:
        store.extend(ExperienceStore.load(rc.train.store, embedder=store.embedder))
    return store


def train_step(t: Training, step: int, batch) -> tuple[torch.Tensor, float, float]:
    """One optimisation step -> (loss of this process, gradient norm before clipping, lr)."""
    tc, policy, model, opt = t.tc, t.policy, t.model, t.opt
    lr = lr_at(step, tc.lr, tc.steps, tc.effective_warmup, tc.decay_lr_ratio)
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    policy.set_training_progress(step / tc.steps)  # e.g. the pruner's noise decay
    if policy.is_recurrent:
        loss, _ = model(batch, bptt_depth=tc.bptt_depth,
                        max_segments=tc.max_segments(step))
    else:
        loss, _ = model(batch)
    t.acc.backward(loss)
    grad_norm = t.acc.clip_grad_norm_(t.params, tc.grad_clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, float(grad_norm), lr


class Log:
    """The progress bar, ``RUN/metrics.jsonl`` and TensorBoard, on the main process."""

    def __init__(self, t: Training, total: int, progress: bool, desc: str,
                 position: int | None):
        from tqdm.auto import tqdm

        self.t, self.main = t, t.acc.is_main_process
        self.bar = tqdm(total=total, desc=desc, position=position,
                        disable=not (progress and self.main), dynamic_ncols=True)
        self.writer = _tensorboard(t.run) if (t.tc.tensorboard and self.main) else None
        self.t_last = time.perf_counter()

    def step(self, done: int, loss: float, lr: float, grad_norm: float, write: bool) -> None:
        """Record step ``done`` (the bar every step; the files if ``write``)."""
        if not self.main:
            return
        now = time.perf_counter()
        rate = self.t.tc.batch_size * self.t.acc.num_processes / max(now - self.t_last, 1e-9)
        self.t_last = now
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if not write:
            return
        rec = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "samples_per_s": rate, "time": time.time()}
        with open(self.t.run / METRICS_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.writer is not None:
            for k in ("loss", "lr", "grad_norm", "samples_per_s"):
                self.writer.add_scalar(f"train/{k}", rec[k], done)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _stop_everywhere(t: Training, caught: list[int]) -> bool:
    """Whether any process caught a stop signal (every process stops at the same step)."""
    stop = bool(caught)
    if t.acc.num_processes > 1:
        flag = t.acc.reduce(torch.tensor(float(stop), device=t.acc.device), "sum")
        stop = flag.item() > 0
    return stop


# -- the loop -------------------------------------------------------------------------------
def train(run: str | Path, stop_at: int | None = None, progress: bool = True,
          desc: str = "train", position: int | None = None) -> dict:
    """Train (or resume) the run in directory ``run`` (made by :func:`create_run`) up to
    ``train.steps``, or only up to step ``stop_at``. Returns a summary dict. ``desc`` and
    ``position`` label and place the progress bar (several runs side by side)."""
    t = setup(Path(run), progress)
    tc, acc = t.tc, t.acc
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    log = Log(t, end - t.start, progress, desc, position)
    losses: list[float] = []
    interrupted, done = None, t.start
    with stop_signals() as caught:
        for step, batch in zip(range(t.start, end), t.loader, strict=False):
            loss, grad_norm, lr = train_step(t, step, batch)
            done = step + 1
            losses.append(acc.reduce(loss.detach(), "mean").item())
            stop = _stop_everywhere(t, caught)
            log.step(done, losses[-1], lr, grad_norm,
                     write=done % tc.log_every == 0 or done == end or stop)
            if done % tc.save_every == 0 or done == end or stop:
                save_checkpoint(t.run, done, acc.unwrap_model(t.model), t.opt,
                                tc.keep_checkpoints, acc.process_index, acc.wait_for_everyone)
            if stop:
                interrupted = signal.Signals(caught[0]).name if caught else "peer"
                break
    log.close()
    return _finish(t, done, losses, interrupted)


def _finish(t: Training, done: int, losses: list[float], interrupted: str | None) -> dict:
    acc = t.acc
    digests = acc.gather_for_metrics([params_digest(acc.unwrap_model(t.model))],
                                     use_gather_object=True)
    has_checkpoint = (t.run / CHECKPOINTS / LAST).is_file()
    summary = {"run": str(t.run), "start_step": t.start, "step": done,
               "losses": losses, "interrupted": interrupted, "world_size": acc.num_processes,
               "param_digests": list(digests),
               "checkpoint": str(last_checkpoint(t.run)) if has_checkpoint else None}
    if acc.is_main_process:
        atomic_write_json(t.run / "last_summary.json", summary)
    acc.end_training()
    return summary


def _frame_bytes(ds) -> int:
    return sum(int(np.prod(ds.features[k]["shape"])) for k in ds.image_keys)


class _Positions(torch.utils.data.Dataset):
    """Indexable stand-in whose items are their own indices (episode positions)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _CollateEpisodes:
    def __init__(self, segments):
        self.segments = segments

    def __call__(self, positions: list[int]):
        return self.segments.collate(np.asarray(positions))


def make_loader(ds, policy, tc: TrainConfig, start: int, rank: int, world: int,
                pin_memory: bool = False):
    """Frames with action chunks (plain policies) or whole episodes cut into segments
    (recurrent policies), batch by batch in the order the step-indexed sampler fixes.
    ``pin_memory`` when training on CUDA; worker processes (``train.num_workers``) live as
    long as the loader."""
    options = {"num_workers": tc.num_workers, "generator": torch.Generator().manual_seed(tc.seed),
               "pin_memory": pin_memory, "persistent_workers": tc.num_workers > 0}
    if policy.is_recurrent:
        from ..data.segments import EpisodeSegmentLoader

        # one segment per write of the memory, as at inference: every n_action_steps frames
        # (one chunk each), or every context.observe_every frames
        segs = EpisodeSegmentLoader(ds, policy.config.model.chunk_size, tc.batch_size,
                                    stride=policy.config.segment_stride)
        sampler = StepBatchSampler(ds.num_episodes, tc.batch_size, tc.steps, tc.seed, start,
                                   rank, world)
        return torch.utils.data.DataLoader(_Positions(ds.num_episodes), batch_sampler=sampler,
                                           collate_fn=_CollateEpisodes(segs), **options)
    sampler = StepBatchSampler(len(ds), tc.batch_size, tc.steps, tc.seed, start, rank, world)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler,
                                       collate_fn=FrameCollate(policy.config), **options)


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("train.tensorboard=true needs the tensorboard package: "
                          "pip install tensorboard") from e
    return SummaryWriter(str(run / "tensorboard"))
