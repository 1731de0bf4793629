"""``memvla bench lerobot``: memvla against LeRobot's own SmolVLA on the same weights.

Runs where LeRobot is installed (``scripts/lerobot-env`` builds such an environment:
``.venv-lerobot/bin/memvla bench lerobot``). A SmolVLA at SmolVLA's real widths (SmolVLM2's
960-wide text stack and 768-wide SigLIP at 512 px, the 0.75-wide expert, a 50-step chunk)
but fewer layers (``--text-layers``, ``--vision-layers``: a CPU cannot run 16 + 12 in a
benchmark) is built and saved by LeRobot's classes, imported with ``memvla import``, and
both predict the action chunk for the same observation and noise, timed alternately:
median chunk latency of each, the ratio memvla / LeRobot, and the largest difference of the
actions.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

HELP = "memvla vs LeRobot's SmolVLA on the same imported weights (needs LeRobot installed)"

WORDS = ["pick", "up", "the", "red", "cube", "put", "it", "in", "box", "move", "left",
         "right", "touch"]
SPECIALS = ["<unk>", "<pad>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
            "<global-img>", "<video>"]


def write_smolvlm_dir(out: Path, text: dict, vision: dict, scale_factor: int) -> Path:
    """A SmolVLM directory LeRobot builds its VLM from (``load_vlm_weights=False``): the
    config (``text`` / ``vision`` overrides of a Llama text and a SigLIP vision config), the
    image and video processors, and a word-level tokenizer of :data:`WORDS` with SmolVLM's
    special tokens (and ``"\\n"``, which SmolVLA appends to every task)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig
    from transformers.models.smolvlm import SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken("\n", normalized=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>",
                              "image_token": "<image>", "global_image_token": "<global-img>",
                              "end_of_utterance_token": "<end_of_utterance>",
                              "video_token": "<video>"})
    cfg = SmolVLMConfig(text_config={"model_type": "llama", "vocab_size": len(fast),
                                     "pad_token_id": 1, **text},
                        vision_config=vision, scale_factor=scale_factor,
                        image_token_id=vocab["<image>"])
    grid = vision["image_size"] // vision["patch_size"] // scale_factor
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    SmolVLMProcessor(SmolVLMImageProcessor(), fast, SmolVLMVideoProcessor(),
                     image_seq_len=grid * grid).save_pretrained(out)
    return out


def declare_torchvision_ops() -> None:
    """Call before importing LeRobot beside the CPU torch. PyPI's torchvision wheel is built
    for CUDA: its C extension does not load, and torchvision's fake-op registrations then
    fail on ``torchvision::nms``. Declaring the two operator schemas first lets ``import
    torchvision`` succeed; the C ops stay unavailable, and LeRobot's policies do not use
    them."""
    import torch

    try:
        _ = torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        for name in ("nms", "qnms"):
            torch.library.define(f"torchvision::{name}",
                                 "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def add_arguments(parser) -> None:
    parser.add_argument("--text-layers", type=int, default=2,
                        help="VLM text layers kept (num_vlm_layers; SmolVLA: 16)")
    parser.add_argument("--vision-layers", type=int, default=2,
                        help="vision tower layers (SmolVLM2-500M: 12)")
    parser.add_argument("--num-steps", type=int, default=10, help="Euler steps (10)")
    parser.add_argument("--repeats", type=int, default=7, help="timed chunks of each (7)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")


def run(args) -> int:
    import torch

    declare_torchvision_ops()
    try:
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy  # noqa: F401
    except ImportError as e:
        raise ValueError("memvla bench lerobot needs LeRobot: run it in the environment "
                         "scripts/lerobot-env builds (.venv-lerobot/bin/memvla bench lerobot)"
                         f" ({e})") from e
    from .timing import format_table, time_interleaved, torch_info

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        lerobot_call, memvla_call, info = _build(Path(tmp), args)
        diff = (lerobot_call() - memvla_call()).abs().max().item()
        times = time_interleaved({"lerobot": lerobot_call, "memvla": memvla_call},
                                 args.repeats, warmup=1)
    ratio = times["memvla"].median_ms / times["lerobot"].median_ms
    rows = [[k, f"{t.median_ms:.1f}", f"{t.min_ms:.1f}"] for k, t in times.items()]
    print(format_table(["implementation", "chunk ms (median)", "min ms"], rows))
    print(f"memvla / LeRobot: {ratio:.2f}; actions differ by at most {diff:.2e}")
    env = torch_info()
    print(f"{info['summary']}; {env['threads']} threads, torch {env['torch']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "ratio_memvla_over_lerobot": ratio, "max_action_diff": diff, **info,
            "timings": {k: t.to_dict() for k, t in times.items()}, "torch": env}, indent=2))
    return 0


def _build(tmp: Path, args):
    """LeRobot's SmolVLA at real widths, saved, imported; -> the two chunk calls."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from ..interop.importer import import_checkpoint
    from ..policies import load_policy

    vlm = write_smolvlm_dir(
        tmp / "vlm", text={"hidden_size": 960, "intermediate_size": 2560,
                           "num_hidden_layers": args.text_layers, "num_attention_heads": 15,
                           "num_key_value_heads": 5, "head_dim": 64, "rms_norm_eps": 1e-5},
        vision={"hidden_size": 768, "intermediate_size": 3072,
                "num_hidden_layers": args.vision_layers, "num_attention_heads": 12,
                "image_size": 512, "patch_size": 16}, scale_factor=4)
    cfg = SmolVLAConfig(
        vlm_model_name=str(vlm), load_vlm_weights=False, num_vlm_layers=args.text_layers,
        num_steps=args.num_steps, device="cpu",
        input_features={"observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 480, 640)),
                        "observation.state": PolicyFeature(FeatureType.STATE, (6,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))})
    torch.manual_seed(0)
    policy = SmolVLAPolicy(cfg).eval()
    stats = {"observation.state": {"mean": torch.zeros(6), "std": torch.ones(6)},
             "action": {"mean": torch.zeros(6), "std": torch.ones(6)}}
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    for part in (policy, pre, post):
        part.save_pretrained(tmp / "checkpoint")
    import_checkpoint("lerobot-smolvla", tmp / "checkpoint", tmp / "memvla")
    mine = load_policy(tmp / "memvla", "cpu")
    obs = {"observation.images.top": torch.rand(1, 3, 480, 640),
           "observation.state": torch.randn(1, 6), "task": ["pick up the red cube"]}
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim)

    def lerobot_call():  # the processors as LeRobot runs them, then the model
        policy.reset()
        return post(policy.predict_action_chunk(pre(dict(obs)), noise=noise.clone()))

    def memvla_call():
        return mine.predict_action_chunk(dict(obs), noise=noise.clone())

    params = sum(p.numel() for p in mine.parameters())
    summary = (f"SmolVLA at real widths with {args.text_layers} text and {args.vision_layers} "
               f"vision layers ({params / 1e6:.1f} M parameters), one 480×640 camera, "
               f"chunk {cfg.chunk_size}, {args.num_steps} Euler steps")
    return lerobot_call, memvla_call, {"summary": summary, "parameters": params,
                                       "text_layers": args.text_layers,
                                       "vision_layers": args.vision_layers,
                                       "num_steps": args.num_steps}
