"""Reading an OpenVLA-OFT (or LightVLA) Hugging Face directory (no OpenVLA code needed).

A fine-tune is published as ``config.json`` (``model_type: openvla``: the timm ids of the
two vision towers, their image sizes, the Llama ``text_config``), the VLA's weights as
``model.safetensors`` or shards ``model-*.safetensors`` with ``model.safetensors.index.json``
(already under the names memvla's parallel family uses), the action head and the proprio
projector as their own files (``action_head--<step>_checkpoint.pt``, saved from a DDP
module, so every key starts with ``module.``), ``dataset_statistics.json`` (per dataset:
``action`` and ``proprio`` with q01 / q99 / mask, OFT's BOUNDS_Q99 normalisation),
``preprocessor_config.json`` (each tower's pixel mean and std) and a Llama tokenizer.
A ``.pt`` file is read with ``torch.load(weights_only=True)``: tensors only, never an
unpickled object.

What the files do not say is taken as OFT does: the chunk size and the cameras from the
platform the statistics name (LIBERO 8 steps, two cameras; ALOHA 25, three; Bridge 5,
one; LIBERO otherwise), the prompt ``In: What action should the robot take to
<task>?\\nOut:`` with Llama's empty token 29871 after it, and the head's read one position
after the placeholders (``model.action_offset=1``: the released inference). LightVLA's
pruner has no weights: ``lightvla`` is the same import with ``model.pruner.enabled``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ..configs import (
    DecoderConfig,
    ParallelVLAConfig,
    PolicyConfig,
    PrunerConfig,
    TokenizerConfig,
    VisionConfig,
)
from ..policies.checkpoint import read_tensors
from ..utils import read_json
from .lerobot_files import guess_format

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# timm id -> the tower's structure (its sizes are read from the weights)
TOWERS = {
    "vit_large_patch14_reg4_dinov2.lvd142m": dict(
        heads=16, act="gelu", class_token=True, reg_tokens=4, layer_scale=True),
    "vit_so400m_patch14_siglip_224": dict(heads=16, act="gelu", attn_pool=True),
}
# a word of the statistics' dataset name -> (chunk size, cameras), OFT's platform constants
PLATFORMS = {"aloha": (25, ["cam_high", "cam_left_wrist", "cam_right_wrist"]),
             "bridge": (5, ["image"]), "libero": (8, ["image", "wrist_image"])}
PROMPT = "In: What action should the robot take to {task_lower}?\nOut:"
EMPTY_TOKEN = 29871  # Llama's "▁", which OFT appends to every prompt
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def read_pt(path: Path) -> dict[str, Tensor]:
    """A state dict saved with ``torch.save``: tensors only (``weights_only``), the DDP
    ``module.`` prefix removed."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error names the refused global
        raise ValueError(f"{path}: not a plain state dict of tensors ({type(e).__name__}: "
                         f"{e})") from e
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict {{name: tensor}}, got "
                         f"{type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def module_file(root: Path, name: str, required: bool = True) -> Path | None:
    """``<name>--<step>_checkpoint.pt`` (or ``.safetensors``) in ``root``: the one of the
    highest step when there are several."""
    found = [p for p in root.iterdir()
             if re.fullmatch(rf"{name}--(\d+)_checkpoint\.(pt|safetensors)", p.name)]
    if not found:
        if required:
            raise FileNotFoundError(f"{root}: no {name}--<step>_checkpoint.pt")
        return None
    return max(found, key=lambda p: int(p.name.split("--")[1].split("_")[0]))


def read_module(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return {k.removeprefix("module."): v for k, v in read_tensors(path).items()}
    return read_pt(path)


def read_vla_weights(root: Path) -> dict[str, Tensor]:
    """The VLA's weights: ``model.safetensors``, or the shards its index names (every
    shard it names must be there and hold the keys it says)."""
    from safetensors.torch import load_file

    index = root / "model.safetensors.index.json"
    if not index.is_file():
        return read_tensors(root / "model.safetensors")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map'")
    weights: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = root / shard
        if not path.is_file():
            raise FileNotFoundError(f"{index}: names shard {shard}, which is missing")
        try:
            weights |= load_file(path)  # memory-mapped, not read twice
        except Exception as e:
            raise ValueError(f"{path}: corrupt safetensors file ({e})") from e
    missing = sorted(k for k in weight_map if k not in weights)
    if missing:
        raise ValueError(f"{index}: keys it maps are in no shard: {missing[:6]}")
    return weights


def tower_config(weights: dict[str, Tensor], prefix: str, model_id: str, image_size: int,
                 pixel: tuple | None) -> VisionConfig:
    """One tower's config: its structure from the timm id, its sizes from the weights."""
    if model_id not in TOWERS:
        raise ValueError(f"config.json: timm_model_ids names {model_id!r}; memvla reads "
                         f"the towers {sorted(TOWERS)}")
    depth = sum(1 for k in weights if re.fullmatch(rf"{re.escape(prefix)}blocks\.\d+\.norm1"
                                                   r"\.weight", k))
    try:
        patch = weights[f"{prefix}patch_embed.proj.weight"]  # (D, C, p, p)
        pos = weights[f"{prefix}pos_embed"]  # (1, P, D)
        mlp = weights[f"{prefix}blocks.0.mlp.fc1.weight"]  # (F, D)
    except KeyError as e:
        raise ValueError(f"the checkpoint has no {e.args[0]} (the {model_id} tower)") from None
    grid = image_size // patch.shape[-1]
    if pos.shape[1] != grid * grid:
        raise ValueError(f"{prefix}pos_embed: expected {grid * grid} patch positions "
                         f"({image_size} px / {patch.shape[-1]} px patches), got "
                         f"{pos.shape[1]}")
    mean, std = pixel if pixel is not None else (None, None)
    return VisionConfig(width=patch.shape[0], depth=depth, mlp_dim=mlp.shape[0],
                        image_size=image_size, patch_size=patch.shape[-1],
                        channels=patch.shape[1], layout="timm", feature_layer=1,
                        pixel_mean=mean, pixel_std=std, **TOWERS[model_id])


def pixel_stats(root: Path, n: int) -> list[tuple | None]:
    """Each tower's (mean, std) from ``preprocessor_config.json`` (None: SigLIP's 0.5 /
    0.5, what memvla's [-1, 1] images already are); without the file, DINOv2's ImageNet
    statistics for a fused first tower."""
    path = root / "preprocessor_config.json"
    if not path.is_file():
        return [IMAGENET, None] if n == 2 else [None]
    pre = read_json(path)
    out = []
    for mean, std in zip(pre.get("means", []), pre.get("stds", []), strict=True):
        half = all(abs(v - 0.5) < 1e-9 for v in [*mean, *std])
        out.append(None if half else (tuple(mean), tuple(std)))
    if len(out) != n:
        raise ValueError(f"{path}: 'means'/'stds' describe {len(out)} towers, config.json "
                         f"{n}")
    return out


def text_config(cfg: dict) -> DecoderConfig:
    t = cfg.get("text_config")
    if not isinstance(t, dict):
        raise ValueError("config.json: no text_config (the Llama backbone's config)")
    heads = t["num_attention_heads"]
    return DecoderConfig(width=t["hidden_size"], depth=t["num_hidden_layers"], heads=heads,
                         kv_heads=t.get("num_key_value_heads") or heads,
                         head_dim=t.get("head_dim") or t["hidden_size"] // heads,
                         mlp_dim=t["intermediate_size"], vocab_size=t["vocab_size"],
                         rms_eps=t.get("rms_norm_eps", 1e-6),
                         rope_base=t.get("rope_theta", 10_000.0), lm_head=True)


def dataset_stats(root: Path, unnorm_key: str | None) -> tuple[str, dict]:
    """The statistics of one dataset (``unnorm_key``, or the only one)."""
    path = root / "dataset_statistics.json"
    stats = read_json(path)
    if unnorm_key is None:
        if len(stats) != 1:
            raise ValueError(f"{path}: statistics of {len(stats)} datasets {sorted(stats)}; "
                             "name one with --unnorm-key")
        unnorm_key = next(iter(stats))
    if unnorm_key not in stats:
        raise ValueError(f"{path}: no statistics for {unnorm_key!r}; found {sorted(stats)}")
    return unnorm_key, stats[unnorm_key]


def q99_stats(entry: dict, what: str, path: Path) -> dict[str, Tensor]:
    missing = [k for k in ("q01", "q99") if k not in entry]
    if missing:
        raise ValueError(f"{path}: {what} lacks {missing}")
    q01 = torch.tensor(entry["q01"], dtype=torch.float32)
    mask = torch.tensor(entry.get("mask", [True] * len(q01)), dtype=torch.float32)
    return {"q01": q01, "q99": torch.tensor(entry["q99"], dtype=torch.float32), "mask": mask}


def check_head(head: dict[str, Tensor], path: Path, width: int) -> tuple[int, int, int]:
    """-> (action_dim, hidden, blocks) of an L1 action head, checked against the decoder
    width (its input is action_dim × width)."""
    try:
        fc1, fc2 = head["model.fc1.weight"], head["model.fc2.weight"]  # (H, Da·D), (Da, H)
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]}; an L1-regression action head is expected "
                         f"(keys found: {sorted(head)[:6]})") from None
    action_dim = fc2.shape[0]
    if fc1.shape[1] != action_dim * width:
        raise ValueError(f"{path}: model.fc1.weight takes {fc1.shape[1]} inputs; expected "
                         f"action_dim × text_config.hidden_size = {action_dim} × {width} = "
                         f"{action_dim * width}")
    blocks = len({k.split(".")[2] for k in head if k.startswith("model.mlp_resnet_blocks.")})
    return action_dim, fc1.shape[0], blocks


def read_oft(root: str | Path, pruner: bool = False, unnorm_key: str | None = None):
    """-> (the policy config, the weights under the policy's names (``model.`` + the
    published ones), the statistics)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such checkpoint directory")
    looks = guess_format(root)
    if looks != "hf-openvla":
        raise ValueError(f"{root}: not an OpenVLA-OFT checkpoint (config.json model_type "
                         f"'openvla'); it looks like {looks}")
    cfg = read_json(root / "config.json")
    if cfg.get("use_film") or module_file(root, "noisy_action_projector", False):
        raise ValueError(f"{root}: a FiLM or diffusion-head OFT variant; memvla imports the "
                         "L1-regression OFT (and LightVLA)")
    weights = read_vla_weights(root)
    ids, sizes = cfg.get("timm_model_ids", []), cfg.get("image_sizes", [])
    fused = bool(cfg.get("use_fused_vision_backbone"))
    if len(ids) != 1 + fused or len(sizes) != len(ids):
        raise ValueError(f"{root / 'config.json'}: use_fused_vision_backbone={fused} wants "
                         f"{1 + fused} timm_model_ids and image_sizes, got {ids} / {sizes}")
    pixels = pixel_stats(root, len(ids))
    towers = [tower_config(weights, p, i, s, px) for p, i, s, px in
              zip(("vision_backbone.featurizer.", "vision_backbone.fused_featurizer."), ids,
                  sizes, pixels, strict=False)]
    text = text_config(cfg)
    head_path = module_file(root, "action_head")
    head = read_module(head_path)
    action_dim, hidden, blocks = check_head(head, head_path, text.width)
    weights |= {f"action_head.{k}": v for k, v in head.items()}
    proprio_path = module_file(root, "proprio_projector", required=False)
    state_dim = 0
    if proprio_path is not None:
        proprio = read_module(proprio_path)
        state_dim = proprio["fc1.weight"].shape[1]
        weights |= {f"proprio_projector.{k}": v for k, v in proprio.items()}
    key, entry = dataset_stats(root, unnorm_key)
    chunk, cameras = next((v for w, v in PLATFORMS.items() if w in key), PLATFORMS["libero"])
    path = root / "dataset_statistics.json"
    stats = {"action": q99_stats(entry.get("action", {}), f"{key}.action", path)}
    if state_dim:
        stats["observation.state"] = q99_stats(entry.get("proprio", {}), f"{key}.proprio",
                                               path)
    model = ParallelVLAConfig(
        vision=towers[0], vision_fused=towers[1] if fused else None, text=text,
        projector_layers=3 if fused else 2, chunk_size=chunk,
        max_state_dim=max(state_dim, 1), max_action_dim=action_dim, head_hidden=hidden,
        head_blocks=blocks, use_proprio=bool(state_dim), action_offset=1,
        pruner=PrunerConfig(enabled=pruner))
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{root}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    tokenizer = TokenizerConfig(kind="hf", path=str(root), max_length=64, prompt=PROMPT,
                                end_ids=[EMPTY_TOKEN])
    size = towers[0].image_size
    policy = PolicyConfig(
        family="parallel", model=model, cameras=cameras, image_shape=(3, size, size),
        state_dim=max(state_dim, 1), action_dim=action_dim, n_action_steps=chunk,
        tokenizer=tokenizer,
        normalization={"observation.state": "q01_q99" if state_dim else "identity",
                       "action": "q01_q99"})
    return policy, {f"model.{k}": v for k, v in weights.items()}, stats

