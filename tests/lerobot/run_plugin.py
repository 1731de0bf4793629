"""Run in the LeRobot environment (``scripts/lerobot-env``, which installs memvla and the
``lerobot_policy_memvla`` plugin there): train a memvla policy for 2 steps with LeRobot's
own ``lerobot-train`` on a LeRobot v3.0 dataset, load the checkpoint LeRobot saved as a
``PreTrainedPolicy`` with its processors, and run it through ``reset`` / ``select_action``
on the dataset's first frames.

    python run_plugin.py DATASET OUT  ->  OUT/result.json
"""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import tv_ops  # noqa: E402,F401  (before LeRobot)


def main(dataset: Path, out: Path) -> None:
    train = out / "train"
    script = ("import sys, tv_ops; from lerobot.scripts.lerobot_train import main; "
              "sys.argv[0] = 'lerobot-train'; main()")
    subprocess.run([sys.executable, "-c", script, "--policy.type=memvla",
                    "--policy.overrides=[\"model.num_steps=2\"]", "--dataset.repo_id=local/memvla",
                    f"--dataset.root={dataset}", "--steps=2", "--batch_size=2",
                    f"--output_dir={train}", "--policy.push_to_hub=false",
                    "--wandb.enable=false", "--num_workers=0", "--policy.device=cpu",
                    "--save_freq=2", "--log_freq=1", "--eval_freq=0"],
                   check=True, cwd=Path(__file__).parent)

    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot_policy_memvla.modeling_memvla import MemvlaPolicy

    saved = train / "checkpoints" / "last" / "pretrained_model"
    policy = MemvlaPolicy.from_pretrained(saved).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(saved))
    ds = LeRobotDataset("local/memvla", root=dataset)
    policy.reset()
    actions = []
    for i in range(3):
        item = ds[i]
        obs = {k: v for k, v in item.items() if k.startswith("observation.")}
        obs["task"] = item["task"]
        actions.append(post(policy.select_action(pre(obs))).tolist())
    (out / "result.json").write_text(json.dumps({
        "type": policy.config.type, "actions": actions,
        "memvla_class": type(policy.memvla).__name__,
        "finite": bool(torch.isfinite(torch.tensor(actions)).all())}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
