"""``memvla bench data``: reading a video dataset of real size, against the PNG path.

A synthetic camera stream (a lit gradient with moving shapes, so that the codecs see
motion) of ``--episodes`` × ``--frames`` frames at ``--height`` × ``--width`` (default
50 × 400 at 480×640: 18 GB once decoded) is written as a video dataset (and, with
``--png``, as PNG columns). Each read mode then runs in its own process, so that its peak
resident memory is its own:

- ``seek``: random frames (``--samples``), decoded by seeking (``image_cache=False``), what
  a training loader does on a dataset that does not fit in memory;
- ``segments``: runs of ``--segment`` consecutive frames from random places (episode
  segments for recurrent training): one seek per run;
- ``png``: the same random frames from the PNG dataset (decoded per access).

Printed: frames/s and peak RSS per mode, the write speed and the size on disk.

``--train STEPS`` also trains the ``tiny`` preset STEPS steps (batch 8, no loader workers)
on a ``remember-color`` dataset at ``--train-size`` px written as PNG and as video, and on
the video once more decoded per sample by seeking (the path of a dataset too big to
cache), each in its own process: steps/s and their ratio to the PNG run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

HELP = "frames/s and peak memory reading a real-size video dataset (and the PNG path)"
IMG = "observation.images.top"


def add_arguments(parser) -> None:
    parser.add_argument("--episodes", type=int, default=50, help="episodes (50)")
    parser.add_argument("--frames", type=int, default=400, help="frames per episode (400)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--codec", default="auto", help="auto (AV1, else H.264), av1, h264")
    parser.add_argument("--samples", type=int, default=400, help="random frames read (400)")
    parser.add_argument("--segment", type=int, default=8, help="frames per segment (8)")
    parser.add_argument("--png", action="store_true", help="also write and read PNG columns")
    parser.add_argument("--out", help="keep the datasets here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="read the datasets already in --out instead of writing them")
    parser.add_argument("--train", type=int, default=0, metavar="STEPS",
                        help="also compare training steps/s on PNG and video datasets")
    parser.add_argument("--train-size", type=int, default=128,
                        help="image size of the training comparison's datasets (128)")


def synthetic_episode(t: int, h: int, w: int, seed: int) -> np.ndarray:
    """(t, h, w, 3) uint8: a gradient lit by a slow sweep, two squares moving across it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 // w, yy * 200 // h, (xx + yy) * 100 // (h + w)], -1)  # (h,w,3)
    out = np.empty((t, h, w, 3), np.uint8)
    (y0, x0), (vy, vx) = rng.integers(0, min(h, w) // 2, 2), rng.integers(2, 9, 2)
    side = max(4, min(h, w) // 8)
    for i in range(t):
        frame = (base + 30 * np.sin(i / 15)).clip(0, 255)
        y, x = (y0 + vy * i) % (h - side), (x0 + vx * i) % (w - side)
        y2 = (h - side - y) % (h - side)
        frame[y:y + side, x:x + side] = (230, 60, 40)
        frame[y2:y2 + side, x // 2:x // 2 + side] = (40, 200, 90)
        out[i] = frame
    return out


def write(root: Path, args, video: bool) -> dict:
    from ..data.lerobot_v3 import LeRobotV3Writer

    start, frames = time.perf_counter(), 0
    with LeRobotV3Writer(root, fps=30, video=video, video_codec=args.codec,
                         overwrite=True) as writer:
        for e in range(args.episodes):
            images = synthetic_episode(args.frames, args.height, args.width, e)
            t = len(images)
            writer.add_episode({IMG: images, "observation.state": np.zeros((t, 2), np.float32),
                                "action": np.zeros((t, 2), np.float32)}, task="watch")
            frames += t
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {"frames": frames, "write_fps": frames / seconds, "disk_mb": size / 2**20}


def _read(queue, root: str, mode: str, samples: int, segment: int, seed: int) -> None:
    from ..data.lerobot_v3 import LeRobotV3Dataset

    ds = LeRobotV3Dataset(root, image_cache=False)
    rng = np.random.default_rng(seed)
    n, read = len(ds), 0
    start = time.perf_counter()
    if mode == "segments":
        for _ in range(max(1, samples // segment)):
            first = int(rng.integers(0, n - segment))
            read += len(ds.get_numpy(IMG, np.arange(first, first + segment)))
    else:
        for i in rng.integers(0, n, samples):
            read += len(ds.get_numpy(IMG, np.array([int(i)])))
    seconds = time.perf_counter() - start
    queue.put({"frames_per_s": read / seconds, "frames": read, "peak_rss_mb": peak_rss_mb()})


def peak_rss_mb() -> float:
    """This process's peak resident memory: ``VmHWM`` where /proc has it (ru_maxrss is
    kept across exec, so a spawned child would report its parent's peak), else
    ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read(root: Path, mode: str, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read, args=(queue, str(root), mode, args.samples, args.segment,
                                           0))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _train(queue, dataset: str, run: str, steps: int, seek: bool) -> None:
    from ..training import loop

    if seek:  # as for a dataset larger than the decoded-frame cache
        loop.CACHE_BYTES = 0
    rc = loop.make_run_config("tiny", dataset, steps, ["train.batch_size=8",
                                                       "train.num_workers=0"])
    loop.create_run(Path(run), rc, overwrite=True)
    start = time.perf_counter()
    loop.train(run, progress=False)
    queue.put({"steps_per_s": steps / (time.perf_counter() - start)})


def train_compare(base: Path, args) -> dict:
    """Steps/s of the same training on PNG, video (cached as the loop chooses) and video
    decoded by seeking."""
    from ..data.record import generate_dataset

    for kind in ("png", "video"):
        generate_dataset("remember-color", 60, base / f"train-{kind}", seed=0,
                         options={"image_size": args.train_size}, overwrite=True,
                         progress=False, video=kind == "video")
    ctx, out = mp.get_context("spawn"), {}
    for name, kind, seek in (("png", "png", False), ("video", "video", False),
                             ("video-seek", "video", True)):
        queue = ctx.Queue()
        proc = ctx.Process(target=_train, args=(queue, str(base / f"train-{kind}"),
                                                str(base / f"run-{name}"), args.train, seek))
        proc.start()
        out[name] = queue.get()
        proc.join()
    for r in out.values():
        r["ratio_to_png"] = r["steps_per_s"] / out["png"]["steps_per_s"]
    return out


def run(args) -> int:
    if args.reuse and not args.out:
        raise ValueError("--reuse reads the datasets of --out DIR: give --out")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        decoded_gb = args.episodes * args.frames * args.height * args.width * 3 / 1e9
        print(f"{args.episodes} episodes × {args.frames} frames at {args.height}×{args.width} "
              f"({decoded_gb:.2f} GB decoded)", flush=True)
        results = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                   "decoded_gb": decoded_gb, "write": {}, "read": {}}
        if not args.reuse:
            results["write"]["video"] = write(base / "video", args, video=True)
        from ..data.v3_format import read_info

        results["codec"] = read_info(base / "video")["features"][IMG]["info"]["video.codec"]
        modes = [("seek", "video"), ("segments", "video")]
        if args.png:
            if not args.reuse:
                results["write"]["png"] = write(base / "png", args, video=False)
            modes.append(("png", "png"))
        for mode, kind in modes:
            results["read"][mode] = read(base / kind, mode, args)
        if args.train:
            results["train"] = train_compare(base, args)
    rows = []
    for kind, w in results["write"].items():
        name = f"video ({results['codec']})" if kind == "video" else "PNG"
        rows.append(f"written: {name} {w['write_fps']:.0f} frames/s, {w['disk_mb']:.0f} MB on "
                    "disk")
    for mode, r in results["read"].items():
        rows.append(f"read {mode:<8} {r['frames_per_s']:8.1f} frames/s   peak RSS "
                    f"{r['peak_rss_mb']:.0f} MB")
    for name, r in results.get("train", {}).items():
        rows.append(f"train on {name:<10} {r['steps_per_s']:6.2f} steps/s  "
                    f"({r['ratio_to_png']:.2f} × PNG)")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
