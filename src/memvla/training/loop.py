"""The training loop behind ``memvla train``: Hugging Face Accelerate (single process, or
DDP under ``accelerate launch`` / ``torchrun``; gloo on CPU), AdamW with warmup + cosine
decay and gradient clipping, a step-indexed sampler, atomic checkpoints every K steps and
on SIGINT/SIGTERM, exact resumption, a progress bar and metrics in ``RUN/metrics.jsonl``."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..config_utils import apply_overrides, from_dict, to_dict
from ..presets import get_preset
from ..utils import atomic_write_json
from .config import RunConfig, TrainConfig
from .sampler import StepBatchSampler
from .schedule import lr_at
from .state import (
    last_checkpoint,
    load_optimizer,
    publish,
    read_training_state,
    set_rng_state,
    step_dir_name,
    write_rng,
    write_training_state,
)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"

# Training defaults per preset where SmolVLA's (made for 450M parameters) do not fit.
PRESET_TRAIN_DEFAULTS = {
    "tiny": {"lr": 1e-3, "batch_size": 32, "warmup_steps": 100, "weight_decay": 1e-4,
             "save_every": 500},
    # L1 regression: at 1e-3 tiny-oft can settle on the median chunk and ignore the state
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
        asked = RunConfig(preset, asked.dataset, asked.policy, asked.train)
    if dataset is not None and str(Path(dataset).resolve()) != saved.dataset:
        asked = RunConfig(asked.preset, str(Path(dataset).resolve()), asked.policy, asked.train)
    diff = config_differences(saved, asked)
    if diff:
        raise ValueError("the run was made with a different config: " + "; ".join(diff))
    return saved


def make_run_config(preset: str, dataset: str, steps: int | None,
                    overrides: list[str]) -> RunConfig:
    """Preset + dataset features + per-preset training defaults + dotted overrides
    (``policy.model.chunk_size=8``, ``train.lr=3e-4``)."""
    from ..data.v3_format import read_info

    read_info(Path(dataset))  # a clear error for a directory that is not a v3.0 dataset
    policy = fit_policy_to_dataset(get_preset(preset), dataset_features(dataset),
                                   str(Path(dataset) / "meta" / "info.json"))
    train = TrainConfig(**PRESET_TRAIN_DEFAULTS.get(preset, {}))
    rc = RunConfig(preset=preset, dataset=str(Path(dataset).resolve()), policy=policy,
                   train=train)
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


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# -- the loop -------------------------------------------------------------------------------
def train(run: str | Path, stop_at: int | None = None, progress: bool = True,
          desc: str = "train", position: int | None = None) -> dict:
    """Train (or resume) the run in directory ``run`` (made by :func:`create_run`) up to
    ``train.steps``, or only up to step ``stop_at``. Returns a summary dict. ``desc`` and
    ``position`` label and place the progress bar (several runs side by side)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..data.lerobot_v3 import LeRobotV3Dataset
    from ..policies import make_policy

    run = Path(run)
    rc = read_run_config(run)
    tc = rc.train
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      mixed_precision=_mixed_precision(tc.mixed_precision))
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process

    # seed first: the model's initial weights come from it (the same on every process)
    torch.manual_seed(tc.seed)
    chunk = rc.policy.model.chunk_size
    deltas = None if rc.policy.context.recurrent else {"action": list(range(chunk))}
    ds = LeRobotV3Dataset(rc.dataset, delta_indices=deltas)
    if ds.num_frames * _frame_bytes(ds) < 4e9:
        ds.preload_images()  # decode once; worker processes share the arrays
    fitted = fit_policy_to_dataset(rc.policy, ds.features, str(Path(rc.dataset)))
    if fitted != rc.policy:
        raise ValueError(f"{rc.dataset}: the dataset's cameras/shapes no longer match the run "
                         f"({config_differences(rc, RunConfig(rc.preset, rc.dataset, fitted))})")
    policy = make_policy(rc.policy, stats=ds.stats)
    # then one stream per process for the flow-matching noise and times
    torch.manual_seed(tc.seed + 1 + rank)
    np.random.seed(tc.seed + rank)
    random.seed(tc.seed + rank)
    for name, p in policy.model.named_parameters():
        if name in policy.model.unused_parameter_names():
            p.requires_grad_(False)  # never reached by the loss (see unused_parameter_names)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, eps=tc.eps,
                            weight_decay=tc.weight_decay)

    start = 0
    ckpt_root = run / "checkpoints"
    if (ckpt_root / "last").is_file():
        ckpt = last_checkpoint(run)
        from ..policies.checkpoint import read_tensors

        weights = read_tensors(ckpt / "model.safetensors")
        policy.model.load_state_dict(weights)
        meta, opt_state, rng, rng_extra = read_training_state(ckpt, rank)
        load_optimizer(opt, opt_state, meta["param_groups"])
        set_rng_state(rng, rng_extra)
        start = meta["step"]

    model, opt = acc.prepare(policy, opt)
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    loader = make_loader(ds, policy, tc, start, rank, world)
    writer = _tensorboard(run) if (tc.tensorboard and main) else None
    warmup = tc.effective_warmup
    losses: list[float] = []
    interrupted = None

    def save(step: int) -> Path:
        tmp = ckpt_root / f".tmp-{step_dir_name(step)}"
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        write_rng(tmp, rank)
        acc.wait_for_everyone()
        final = ckpt_root / step_dir_name(step)
        if main:
            write_training_state(tmp, acc.unwrap_model(model), opt, step)
            final = publish(ckpt_root, tmp, step)
        acc.wait_for_everyone()
        return final

    bar = tqdm(total=end - start, desc=desc, position=position, disable=not (progress and main),
               dynamic_ncols=True)
    t_last, done = time.perf_counter(), start
    with stop_signals() as caught, open(run / METRICS_FILE, "a") as metrics:
        for step, batch in zip(range(start, end), loader, strict=False):
            lr = lr_at(step, tc.lr, tc.steps, warmup, tc.decay_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            model.train()
            if hasattr(policy, "set_training_progress"):  # e.g. the pruner's noise decay
                policy.set_training_progress(step / tc.steps)
            if policy.is_recurrent:
                loss, _ = model(batch, bptt_depth=tc.bptt_depth,
                                max_segments=tc.max_segments(step))
            else:
                loss, _ = model(batch)
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(params, tc.grad_clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            loss_all = acc.reduce(loss.detach(), "mean").item()
            losses.append(loss_all)
            stop = bool(caught)
            if world > 1:  # every process stops at the same step
                flag = acc.reduce(torch.tensor(float(stop), device=acc.device), "sum")
                stop = flag.item() > 0
            if main:
                now = time.perf_counter()
                rate = tc.batch_size * world / max(now - t_last, 1e-9)
                t_last = now
                bar.update(1)
                bar.set_postfix(loss=f"{loss_all:.4f}", lr=f"{lr:.2e}")
                if done % tc.log_every == 0 or done == end or stop:
                    rec = {"step": done, "loss": loss_all, "lr": lr,
                           "grad_norm": float(grad_norm), "samples_per_s": rate,
                           "time": time.time()}
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    if writer is not None:
                        for k in ("loss", "lr", "grad_norm", "samples_per_s"):
                            writer.add_scalar(f"train/{k}", rec[k], done)
            if done % tc.save_every == 0 or done == end or stop:
                save(done)
            if stop:
                interrupted = signal.Signals(caught[0]).name if caught else "peer"
                break
    bar.close()
    if writer is not None:
        writer.close()
    digests = acc.gather_for_metrics([params_digest(acc.unwrap_model(model))],
                                     use_gather_object=True)
    summary = {"run": str(run), "start_step": start, "step": done,
               "losses": losses, "interrupted": interrupted, "world_size": world,
               "param_digests": list(digests),
               "checkpoint": str(last_checkpoint(run)) if (ckpt_root / "last").is_file()
               else None}
    if main:
        atomic_write_json(run / "last_summary.json", summary)
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


def make_loader(ds, policy, tc: TrainConfig, start: int, rank: int, world: int):
    """Frames with action chunks (plain policies) or whole episodes cut into segments
    (recurrent policies), batch by batch in the order the step-indexed sampler fixes."""
    g = torch.Generator().manual_seed(tc.seed)
    if policy.is_recurrent:
        from ..data.segments import EpisodeSegmentLoader

        segs = EpisodeSegmentLoader(ds, policy.config.model.chunk_size, tc.batch_size)
        sampler = StepBatchSampler(ds.num_episodes, tc.batch_size, tc.steps, tc.seed, start,
                                   rank, world)
        return torch.utils.data.DataLoader(_Positions(ds.num_episodes), batch_sampler=sampler,
                                           num_workers=tc.num_workers, generator=g,
                                           collate_fn=_CollateEpisodes(segs))
    sampler = StepBatchSampler(len(ds), tc.batch_size, tc.steps, tc.seed, start, rank, world)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=tc.num_workers,
                                       generator=g)


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("train.tensorboard=true needs the tensorboard package: "
                          "pip install tensorboard") from e
    return SummaryWriter(str(run / "tensorboard"))
