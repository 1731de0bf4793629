"""Processor steps outside the model: normalisation with dataset statistics and image
preparation. Their state (the statistics) is saved beside the policy's weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8
# which statistics each mode needs
MODE_STATS = {"mean_std": ("mean", "std"), "min_max": ("min", "max"),
              "q01_q99": ("q01", "q99"), "identity": ()}
# statistics a mode reads when given, and their value when not (q01_q99: every dimension)
OPTIONAL_STATS = {"q01_q99": {"mask": torch.ones_like}}


class Normalizer:
    """Per-feature normalisation: ``mean_std`` -> (x − mean) / std, ``min_max`` -> [−1, 1],
    ``q01_q99`` -> [q01, q99] to [−1, 1], clipped there, only the dimensions where ``mask``
    is 1 (OpenVLA-OFT's BOUNDS_Q99; its gripper passes through; no mask: every dimension),
    ``identity``. ``stats`` maps feature -> {stat name -> tensor}; with ``stats=None``
    every feature is left as it is (and :attr:`has_stats` is False).

    Normalisation computes in float32 whatever the input dtype and returns float32. The
    statistics are copied once to each device they are used on (see :meth:`to`), not on
    every call."""

    def __init__(self, modes: dict[str, str], stats: dict[str, dict[str, Tensor]] | None = None):
        self.modes = dict(modes)
        self.has_stats = stats is not None
        self.stats: dict[str, dict[str, Tensor]] = {}
        self._on_device: dict[tuple[str, torch.device], dict[str, Tensor]] = {}
        if stats is None:
            return
        for key, mode in self.modes.items():
            need = MODE_STATS[mode]
            if not need:
                continue
            if key not in stats:
                raise ValueError(f"normalisation: no statistics for {key!r} (mode {mode!r} "
                                 f"needs {need}); statistics were given for {sorted(stats)}")
            missing = [s for s in need if s not in stats[key]]
            if missing:
                raise ValueError(f"normalisation: statistics of {key!r} lack {missing} "
                                 f"(mode {mode!r}); found {sorted(stats[key])}")
            self.stats[key] = {s: torch.as_tensor(stats[key][s], dtype=torch.float32).flatten()
                               for s in need}
            for name, default in OPTIONAL_STATS.get(mode, {}).items():
                given = stats[key].get(name)
                self.stats[key][name] = default(self.stats[key][need[0]]) if given is None \
                    else torch.as_tensor(given, dtype=torch.float32).flatten()

    def to(self, device: torch.device | str) -> Normalizer:
        """Place the statistics on ``device`` now (they are also placed on first use)."""
        for key in self.stats:
            self._stats_on(key, torch.device(device))
        return self

    def _stats_on(self, key: str, device: torch.device) -> dict[str, Tensor]:
        cached = self._on_device.get((key, device))
        if cached is None:
            cached = {k: v.to(device) for k, v in self.stats[key].items()}
            self._on_device[(key, device)] = cached
        return cached

    def _get(self, key: str, x: Tensor) -> tuple[str, dict[str, Tensor]]:
        mode = self.modes.get(key, "identity")
        if key not in self.stats:
            return "identity", {}
        st = self._stats_on(key, x.device)
        dim = x.shape[-1]
        for name, v in st.items():
            if v.numel() != dim:
                raise ValueError(f"normalisation of {key!r}: statistic {name!r} has {v.numel()} "
                                 f"values but the data has {dim} on its last axis")
        return mode, st

    def normalize(self, key: str, x: Tensor) -> Tensor:
        x = x.float()
        mode, st = self._get(key, x)
        if mode == "mean_std":
            return (x - st["mean"]) / (st["std"] + EPS)
        if mode == "min_max":
            return 2 * (x - st["min"]) / (st["max"] - st["min"] + EPS) - 1
        if mode == "q01_q99":
            y = (2 * (x - st["q01"]) / (st["q99"] - st["q01"] + EPS) - 1).clamp(-1, 1)
            return torch.where(st["mask"] > 0, y, x.clamp(-1, 1))
        return x

    def unnormalize(self, key: str, x: Tensor) -> Tensor:
        x = x.float()
        mode, st = self._get(key, x)
        if mode == "mean_std":
            return x * (st["std"] + EPS) + st["mean"]
        if mode == "min_max":
            return (x + 1) / 2 * (st["max"] - st["min"] + EPS) + st["min"]
        if mode == "q01_q99":
            y = (x + 1) / 2 * (st["q99"] - st["q01"] + EPS) + st["q01"]
            return torch.where(st["mask"] > 0, y, x)
        return x

    # -- persistence: flat {"<feature>/<stat>": tensor}, stored as safetensors ------------
    def state_dict(self) -> dict[str, Tensor]:
        return {f"{k}/{s}": v.contiguous() for k, d in self.stats.items() for s, v in d.items()}

    @classmethod
    def from_state_dict(cls, modes: dict[str, str], flat: dict[str, Tensor]) -> Normalizer:
        if not flat:
            return cls(modes, None)
        stats: dict[str, dict[str, Tensor]] = {}
        for name, v in flat.items():
            key, stat = name.rsplit("/", 1)
            stats.setdefault(key, {})[stat] = v
        return cls(modes, stats)


def resize_with_pad(images: Tensor, size: int, pad: str = "top_left") -> Tensor:
    """images (B, C, H, W) in [0, 1] -> (B, C, size, size): bilinear resize keeping the aspect
    ratio, padded with 0 on the left/top (``top_left``) or on both sides (``center``)."""
    b, c, h, w = images.shape
    if h == size and w == size:
        return images
    ratio = max(w / size, h / size)  # LeRobot's and openpi's arithmetic, floor included
    nh, nw = max(1, int(h / ratio)), max(1, int(w / ratio))
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False)
    ph, pw = size - nh, size - nw
    if pad == "center":
        return F.pad(out, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return F.pad(out, (pw, 0, ph, 0))  # (B, C, size, size)


STATE_BINS = 256  # π0.5's discretisation of the state in the prompt


def discretize_state(state: Tensor, bins: int = STATE_BINS) -> Tensor:
    """Normalised state (B, Ds) (meant to lie in [-1, 1]) -> bin indices (B, Ds) long: bin i
    covers [-1 + 2i / bins, -1 + 2(i + 1) / bins), as ``np.digitize(x,
    np.linspace(-1, 1, bins + 1)[:-1]) - 1`` (openpi, LeRobot): values at or above the last
    left edge fall into the last bin, values below -1 into -1."""
    edges = torch.linspace(-1, 1, bins + 1, dtype=torch.float64, device=state.device)[:-1]
    return torch.bucketize(state.double(), edges, right=True) - 1  # (B, Ds)


def state_prompts(tasks: list[str], state: Tensor) -> list[str]:
    """π0.5's prompt: the task and the discretised normalised state (B, Ds), as
    ``"Task: <task>, State: <i j ...>;\nAction: "``."""
    bins = discretize_state(state).tolist()
    return [f"Task: {t.strip().replace('_', ' ').replace(chr(10), ' ')}, State: "
            f"{' '.join(map(str, b))};\nAction: " for t, b in zip(tasks, bins, strict=True)]
