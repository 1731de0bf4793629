"""Run in the LeRobot environment (``scripts/lerobot-env``): write a small video dataset
with LeRobot's own ``LeRobotDataset`` and its encoder (``vcodec``: libsvtav1 (AV1) or h264),
and save the frames it was given, in dataset order (LeRobot's loader cannot decode here:
its torchcodec build does not load beside the CPU torch and torchvision 0.28 has no
VideoReader, so the reference is the frames LeRobot encoded).

    python make_video_dataset.py OUT VCODEC  ->  OUT/dataset, OUT/frames.safetensors
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tv_ops  # noqa: E402,F401  (before LeRobot)
from safetensors.torch import save_file  # noqa: E402

H, W, FPS = 48, 64, 10
LENGTHS = [17, 9, 23]


def main(out: Path, vcodec: str) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {"observation.images.top": {"dtype": "video", "shape": (H, W, 3),
                                           "names": ["height", "width", "channels"]},
                "observation.state": {"dtype": "float32", "shape": (2,), "names": None},
                "action": {"dtype": "float32", "shape": (2,), "names": None}}
    ds = LeRobotDataset.create("local/video", FPS, root=out / "dataset", features=features,
                               use_videos=True, vcodec=vcodec)
    rng, given = np.random.default_rng(0), []
    for length in LENGTHS:
        for t in range(length):  # a moving square on a noisy background
            img = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
            y, x = (3 * t) % (H - 8), (5 * t) % (W - 8)
            img[y:y + 8, x:x + 8] = [220, 40, 40]
            given.append(img)
            ds.add_frame({"observation.images.top": img,
                          "observation.state": rng.normal(size=2).astype(np.float32),
                          "action": rng.normal(size=2).astype(np.float32),
                          "task": "follow the square"})
        ds.save_episode()
    ds.finalize()
    save_file({"frames": torch.from_numpy(np.stack(given))}, out / "frames.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
