"""Run in the LeRobot environment (``scripts/lerobot-env``): build a tiny SmolVLA with
LeRobot's own classes (a tiny SmolVLM config, processor and word-level tokenizer in a local
directory; every weight re-drawn off its init; normalisation statistics), save it as LeRobot
does, and record LeRobot's action chunk for an observation and a noise.

    python make_smolvla.py OUT  ->  OUT/vlm, OUT/checkpoint, OUT/case.safetensors, OUT/case.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import tv_ops  # noqa: E402,F401  (before LeRobot)
from safetensors.torch import save_file  # noqa: E402

TASKS = ["pick up the red cube", "move left\n"]  # one with SmolVLA's newline, one without
IMAGE, STATE, ACTION, B = (3, 40, 48), 5, 3, 2


def make_vlm(out: Path) -> None:
    from memvla.bench.lerobot import write_smolvlm_dir

    write_smolvlm_dir(out, text={"hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 3, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5},
                      vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                      scale_factor=2)


def main(out: Path) -> None:
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    make_vlm(out / "vlm")
    cfg = SmolVLAConfig(
        vlm_model_name=str(out / "vlm"), load_vlm_weights=False, chunk_size=8, n_action_steps=8,
        max_state_dim=8, max_action_dim=8, resize_imgs_with_padding=(32, 32), num_steps=4,
        num_vlm_layers=2, tokenizer_max_length=16, device="cpu",
        input_features={"observation.images.top": PolicyFeature(FeatureType.VISUAL, IMAGE),
                        "observation.state": PolicyFeature(FeatureType.STATE, (STATE,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION,))})
    torch.manual_seed(0)
    policy = SmolVLAPolicy(cfg)
    with torch.no_grad():  # off the trivial init (norm weights at 1, biases at 0)
        for _, p in policy.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    stats = {"observation.state": {"mean": torch.randn(STATE), "std": torch.rand(STATE) + 0.5},
             "action": {"mean": torch.randn(ACTION), "std": torch.rand(ACTION) + 0.5}}
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    for part in (policy, pre, post):
        part.save_pretrained(out / "checkpoint")

    obs = {"observation.images.top": torch.rand(B, *IMAGE),
           "observation.state": torch.randn(B, STATE)}
    noise = torch.randn(B, cfg.chunk_size, cfg.max_action_dim)
    policy.eval()
    actions = post(policy.predict_action_chunk(pre({**obs, "task": list(TASKS)}),
                                               noise=noise.clone()))
    save_file({**obs, "noise": noise, "actions": actions.contiguous()}, out / "case.safetensors")
    (out / "case.json").write_text(json.dumps({"task": TASKS}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
