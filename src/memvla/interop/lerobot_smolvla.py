"""LeRobot's SmolVLA (0.4.x) -> a memvla flow-matching policy config.

SmolVLA's shapes come from two places: the policy's ``config.json`` (chunk, state and
action sizes, ``num_vlm_layers``, ``expert_width_multiplier``, ``self_attn_every_n_layers``,
...) and the VLM's ``config.json`` (SmolVLM: ``text_config``, ``vision_config``,
``scale_factor``) in the directory ``vlm_model_name`` names, which also holds the
tokenizer. memvla's module names mirror LeRobot's, so the weights map one to one (the VLM's
``lm_head``, saved by LeRobot though unused, is kept).
"""

from __future__ import annotations

from pathlib import Path

from ..configs import (
    ContextConfig,
    DecoderConfig,
    FlowVLAConfig,
    PolicyConfig,
    TokenizerConfig,
    VisionConfig,
)
from ..presets import smolvla_expert_mlp_dim
from ..utils import read_json
from .lerobot_files import NORM_MODES, LeRobotCheckpoint

VISION_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CAMERA_PREFIX = "observation.images."


def vlm_directory(ckpt: LeRobotCheckpoint, vlm: str | Path | None) -> Path:
    """The local VLM directory (its ``config.json`` and tokenizer): ``vlm``, else the
    checkpoint's ``vlm_model_name`` when that is a local directory."""
    name = ckpt.config.get("vlm_model_name")
    d = Path(vlm) if vlm is not None else Path(name) if name else None
    if d is None or not (d / "config.json").is_file():
        raise FileNotFoundError(
            f"{ckpt.root}: the VLM configuration and tokenizer are needed (vlm_model_name is "
            f"{name!r}, not a local directory here); pass --vlm DIR, a local copy of that "
            "model's config.json and tokenizer files")
    missing = [f for f in TOKENIZER_FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: the tokenizer files {missing} are missing (expected "
                                f"those of {name!r})")
    return d


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_supported(c: dict, where: Path) -> None:
    for key, want in (("attention_mode", "cross_attn"), ("add_image_special_tokens", False),
                      ("empty_cameras", 0), ("adapt_to_pi_aloha", False),
                      ("use_delta_joint_actions_aloha", False)):
        _require(c.get(key, want) == want, f"{where}: {key} is {c.get(key)!r}; memvla imports "
                 f"SmolVLA with {key}={want!r}")
    _require(c.get("n_obs_steps", 1) == 1, f"{where}: n_obs_steps is {c.get('n_obs_steps')}, "
             "expected 1 (temporal context is memvla's context.kind)")


def smolvla_config(ckpt: LeRobotCheckpoint, vlm_dir: Path) -> PolicyConfig:
    """The memvla policy config of a LeRobot SmolVLA checkpoint."""
    c, where = ckpt.config, ckpt.root / "config.json"
    _check_supported(c, where)
    vlm = read_json(vlm_dir / "config.json")
    t, v = vlm.get("text_config", {}), vlm.get("vision_config", {})
    heads = t["num_attention_heads"]
    head_dim = t.get("head_dim") or t["hidden_size"] // heads
    depth = c.get("num_vlm_layers", -1)
    depth = depth if depth > 0 else t["num_hidden_layers"]
    experts = c.get("num_expert_layers", -1)
    _require(experts <= 0 or experts == depth, f"{where}: num_expert_layers is {experts}; "
             f"memvla's expert has one layer per VLM layer ({depth})")
    text = DecoderConfig(width=t["hidden_size"], depth=depth, heads=heads,
                         kv_heads=t.get("num_key_value_heads", heads), head_dim=head_dim,
                         mlp_dim=t["intermediate_size"], vocab_size=t["vocab_size"],
                         rms_eps=t.get("rms_norm_eps", 1e-5), rope_base=10_000.0,
                         lm_head="model.vlm_with_expert.vlm.lm_head.weight" in ckpt.weights)
    width = int(t["hidden_size"] * c.get("expert_width_multiplier", 0.75))
    expert = DecoderConfig(width=width, depth=depth, heads=heads, kv_heads=text.kv_heads,
                           head_dim=head_dim, mlp_dim=smolvla_expert_mlp_dim(width),
                           rms_eps=text.rms_eps, rope_base=10_000.0)
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    _require(act in VISION_ACTS, f"{vlm_dir / 'config.json'}: vision_config.hidden_act is "
             f"{act!r}; expected one of {sorted(VISION_ACTS)}")
    vision = VisionConfig(width=v["hidden_size"], depth=v["num_hidden_layers"],
                          heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
                          image_size=v["image_size"], patch_size=v["patch_size"],
                          eps=v.get("layer_norm_eps", 1e-6), act=VISION_ACTS[act],
                          position_buckets=True)
    size = list(c.get("resize_imgs_with_padding") or [vision.image_size] * 2)
    _require(size == [vision.image_size] * 2, f"{where}: resize_imgs_with_padding is {size}; "
             f"expected the vision tower's size {[vision.image_size] * 2}")
    model = FlowVLAConfig(
        vision=vision, text=text, expert=expert, connector_scale=vlm.get("scale_factor", 4),
        self_attn_every_n_layers=c.get("self_attn_every_n_layers", 2),
        chunk_size=c["chunk_size"], max_state_dim=c["max_state_dim"],
        max_action_dim=c["max_action_dim"], state_token="prefix", causal_actions=True,
        num_steps=c.get("num_steps", 10), time_min_period=c.get("min_period", 4e-3),
        time_max_period=c.get("max_period", 4.0))
    return PolicyConfig(
        family="flow", model=model, **_io(ckpt), image_pad="top_left",
        n_action_steps=c.get("n_action_steps", c["chunk_size"]),
        tokenizer=TokenizerConfig(kind="hf", path=str(vlm_dir),
                                  max_length=c.get("tokenizer_max_length", 48),
                                  append_newline=True),
        context=ContextConfig())


def _io(ckpt: LeRobotCheckpoint) -> dict:
    """Cameras, image shape, state and action sizes and normalisation modes."""
    where = ckpt.root / "config.json"
    images = ckpt.features("VISUAL")
    _require(bool(images), f"{where}: no VISUAL input feature (a camera) is declared")
    bad = [k for k in images if not k.startswith(CAMERA_PREFIX)]
    _require(not bad, f"{where}: camera keys must start with {CAMERA_PREFIX!r}, got {bad}")
    shapes = {tuple(s) for s in images.values()}
    _require(len(shapes) == 1, f"{where}: memvla needs one image shape for every camera, got "
             f"{images}")
    states, actions = ckpt.features("STATE"), ckpt.features("ACTION")
    _require(list(states) == ["observation.state"], f"{where}: expected one STATE feature "
             f"'observation.state', got {sorted(states)}")
    _require(list(actions) == ["action"], f"{where}: expected one ACTION feature 'action', "
             f"got {sorted(actions)}")
    modes = {}
    for kind, key in (("STATE", "observation.state"), ("ACTION", "action")):
        mode = ckpt.norm_map.get(kind, "IDENTITY")
        _require(mode in NORM_MODES, f"{ckpt.root}: normalisation of {kind} is {mode!r}; "
                 f"memvla supports {sorted(NORM_MODES)}")
        modes[key] = NORM_MODES[mode]
    return {"cameras": [k[len(CAMERA_PREFIX):] for k in images],
            "image_shape": shapes.pop(), "state_dim": states["observation.state"][0],
            "action_dim": actions["action"][0], "normalization": modes}
