"""``memvla import FORMAT DIR --out CKPT``: a checkpoint of another project -> a memvla
checkpoint (``load_policy``, ``memvla eval`` and ``memvla train --init-from`` read it).

A format is a reader (the other project's files -> a memvla policy config, the weights
under memvla's names, the normalisation statistics) registered in :data:`FORMATS`; the
mapping is checked here, the same for every format: every memvla weight must be found at
its shape, and what the source holds beyond them is listed as unmapped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..configs import PolicyConfig
from ..policies.checkpoint import check_shapes
from ..policies.processor import Normalizer
from ..utils import did_you_mean


@dataclass
class Imported:
    """What a format's reader hands over."""

    config: PolicyConfig
    weights: dict[str, Tensor]  # under memvla's names
    stats: dict[str, dict[str, Tensor]]
    unused: tuple[str, ...] = ()  # source weights known to be unused (e.g. an LM head)


@dataclass
class ImportReport:
    source: Path
    out: Path
    format: str
    mapped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [("mapped", len(self.mapped), ""),
                ("unmapped (in the source, not used)", len(self.unmapped),
                 ", ".join(self.unmapped[:6]) + (" ..." if len(self.unmapped) > 6 else "")),
                ("missing (needed, not in the source)", len(self.missing),
                 ", ".join(self.missing[:6]))]
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{w}}  {n:>6}  {names}".rstrip() for name, n, names in rows)


def _smolvla(src: Path, vlm: str | None = None, **_) -> Imported:
    from .lerobot_files import read_checkpoint
    from .lerobot_smolvla import smolvla_config, vlm_directory

    ckpt = read_checkpoint(src, "lerobot-smolvla")
    config = smolvla_config(ckpt, vlm_directory(ckpt, vlm))
    return Imported(config, ckpt.weights, ckpt.stats)


def _oft(pruner: bool):
    def read(src: Path, unnorm_key: str | None = None, **_) -> Imported:
        from .openvla_oft import read_oft

        config, weights, stats = read_oft(src, pruner=pruner, unnorm_key=unnorm_key)
        return Imported(config, weights, stats)

    return read


# format -> reader(source directory, **options: vlm, unnorm_key) -> Imported
FORMATS: dict[str, Callable[..., Imported]] = {
    "lerobot-smolvla": _smolvla, "openvla-oft": _oft(pruner=False),
    "lightvla": _oft(pruner=True)}


def import_checkpoint(fmt: str, src: str | Path, out: str | Path, vlm: str | None = None,
                      overrides: list[str] | None = None,
                      unnorm_key: str | None = None) -> ImportReport:
    """Convert checkpoint directory ``src`` of format ``fmt`` into the memvla checkpoint
    ``out`` (written atomically). ``vlm``: the local VLM directory (config and tokenizer)
    where the checkpoint names a hub model (SmolVLA). ``unnorm_key``: the dataset whose
    statistics an OpenVLA-OFT checkpoint's actions use, when it has several.
    ``overrides``: dotted options of the policy
    config read from the source, applied before the weights are mapped (e.g.
    ``model.vision.position_buckets=false``, ``n_action_steps=10``). A missing weight or a
    shape that differs from the config is an error naming the tensor."""
    if fmt not in FORMATS:
        raise ValueError(f"import format {fmt!r} is not known; expected one of "
                         f"{sorted(FORMATS)} ({did_you_mean(fmt, FORMATS, 'format')})")
    src = Path(src)
    got = FORMATS[fmt](src, vlm=vlm, unnorm_key=unnorm_key)
    if overrides:
        from ..config_utils import apply_overrides

        got.config = apply_overrides(got.config, list(overrides))
    from ..policies import make_policy

    with torch.device("meta"):  # no random initialisation: every weight is imported
        policy = make_policy(got.config)
    policy.normalizer = Normalizer(got.config.normalization, _stats_for(got))
    own = policy.state_dict()
    report = ImportReport(src, Path(out), fmt)
    report.mapped = sorted(k for k in got.weights if k in own)
    report.unmapped = sorted(k for k in got.weights if k not in own)
    report.missing = sorted(k for k in own if k not in got.weights)
    if report.missing:
        raise ValueError(f"{src}: {len(report.missing)} weights the {fmt} config needs are "
                         f"not in the checkpoint: {report.missing[:8]}")
    unexpected = [k for k in report.unmapped if k not in got.unused]
    if unexpected:
        raise ValueError(f"{src}: weights that memvla's {fmt} model has no place for: "
                         f"{unexpected[:8]}")
    check_shapes(src, got.weights, own, "the config read from the checkpoint expects")
    policy.load_state_dict({k: got.weights[k].float() for k in own}, assign=True)
    policy.save_pretrained(out)
    return report


def _stats_for(got: Imported) -> dict[str, dict[str, Tensor]] | None:
    """The statistics of the features the config normalises (None when none does)."""
    keys = [k for k, m in got.config.normalization.items() if m != "identity"]
    if not keys:
        return None
    return {k: got.stats.get(k, {}) for k in keys}
