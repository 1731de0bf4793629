"""Load a Hugging Face ``MambaModel`` / ``MambaForCausalLM`` directory into
:class:`memvla.models.mamba.MambaBackbone`.

The directory holds ``config.json`` (transformers' ``MambaConfig``: hidden_size,
num_hidden_layers, state_size, conv_kernel, expand, intermediate_size, time_step_rank,
vocab_size, layer_norm_epsilon, use_bias, use_conv_bias, residual_in_fp32, hidden_act) and
the weights as safetensors: ``model.safetensors``, or shards listed by
``model.safetensors.index.json``. Pickled weights (``*.bin``) are refused, never loaded.
``MambaModel`` names its tensors ``embeddings.weight``, ``layers.{i}.norm.weight``,
``layers.{i}.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj}``,
``norm_f.weight``; ``MambaForCausalLM`` prefixes them with ``backbone.`` and adds
``lm_head.weight`` (absent when tied to the embeddings), which the backbone does not use.
A directory whose tensors are not this layout gets a ValueError naming the keys that are
missing, the ones that are unexpected and the shapes that differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.mamba import MambaBackbone, MambaConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_KEYS = ("lm_head.weight",)  # MambaForCausalLM's head: not part of the backbone
SHOW = 6  # keys named per kind in a layout error


def mamba_config_from_hf(hf: dict, kernels: str = "auto") -> MambaConfig:
    """memvla's :class:`MambaConfig` from the fields of transformers' ``MambaConfig``
    (missing optional fields take transformers' defaults)."""
    model_type = hf.get("model_type")
    if model_type not in (None, "mamba"):
        raise ValueError(f"config.json: model_type is {model_type!r}, expected 'mamba' "
                         "(transformers' Mamba-1 MambaModel / MambaForCausalLM)")
    missing = [k for k in ("hidden_size", "num_hidden_layers") if k not in hf]
    if missing:
        hint = (" (this looks like a state-spaces/mamba_ssm config, d_model / n_layer; use the "
                "'-hf' conversion of the checkpoint)" if "d_model" in hf else "")
        raise ValueError(f"config.json: missing {missing}, needed for a Mamba model{hint}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (Mamba uses 'silu')")
    hidden, expand = int(hf["hidden_size"]), int(hf.get("expand", 2))
    rank = hf.get("time_step_rank", "auto")
    return MambaConfig(
        d_model=hidden, n_layer=int(hf["num_hidden_layers"]),
        d_state=int(hf.get("state_size", 16)), d_conv=int(hf.get("conv_kernel", 4)),
        expand=expand, d_inner=int(hf.get("intermediate_size", expand * hidden)),
        dt_rank=rank if rank == "auto" else int(rank),
        vocab_size=int(hf.get("vocab_size", 50280)),
        rms_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        use_bias=bool(hf.get("use_bias", False)), conv_bias=bool(hf.get("use_conv_bias", True)),
        residual_in_fp32=bool(hf.get("residual_in_fp32", True)), kernels=kernels)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the index's shards)."""
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' of tensor name -> shard file")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index} lists shards that are not in {directory}: {absent}")
        return files
    pickled = sorted(p.name for p in directory.iterdir()
                     if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ValueError(f"{directory} has only pickled weights ({', '.join(pickled)}); memvla "
                         "loads safetensors only and never unpickles. Re-save the model with "
                         "transformers' save_pretrained(..., safe_serialization=True)")
    raise ValueError(f"{directory}: no {WEIGHTS_FILE} nor {INDEX_FILE}")


def backbone_key(key: str) -> str:
    """A checkpoint tensor name as the backbone's: without ``backbone.`` (MambaForCausalLM)
    and with ``embedding.`` spelt ``embeddings.`` (older checkpoints)."""
    key = key.removeprefix("backbone.")
    if key.startswith("embedding."):
        key = "embeddings." + key.removeprefix("embedding.")
    return key


def _layout_error(directory: Path, got: dict[str, tuple], want: dict[str, tuple]) -> str | None:
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = [f"{k}: checkpoint {got[k]} vs expected {want[k]}"
              for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    if not (missing or unexpected or shapes):
        return None

    def few(items: list[str]) -> str:
        more = f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else ""
        return ", ".join(items[:SHOW]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shapes differ: {few(shapes)}")
    return (f"{directory}: not a Mamba checkpoint of the layout its config.json describes "
            f"(MambaModel / MambaForCausalLM tensor names): " + "; ".join(parts))


def load_hf_mamba(directory: str | Path, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu",
                  kernels: str = "auto") -> tuple[MambaBackbone, MambaConfig]:
    """Build a :class:`MambaBackbone` from a Hugging Face Mamba directory and load its
    weights (cast to ``dtype``, moved to ``device``); returns the backbone (in eval mode)
    and its config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"load_hf_mamba: {directory} is not a directory")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"load_hf_mamba: {directory} has no {CONFIG_FILE}")
    cfg = mamba_config_from_hf(json.loads(config_path.read_text()), kernels)
    files = weight_files(directory)

    shapes: dict[str, tuple] = {}
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                name = backbone_key(key)
                if name in IGNORED_KEYS:
                    continue
                if name in shapes:
                    raise ValueError(f"{directory}: tensor {name!r} appears twice "
                                     f"({where[name].name} and {path.name})")
                shapes[name] = tuple(fh.get_slice(key).get_shape())
                where[name] = path

    model = MambaBackbone(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    error = _layout_error(directory, shapes, want)
    if error:
        raise ValueError(error)

    state = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                name = backbone_key(key)
                if name not in IGNORED_KEYS:
                    state[name] = fh.get_tensor(key).to(dtype)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval(), cfg
