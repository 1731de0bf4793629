"""A Mamba (selective state-space) stack: pre-RMSNorm residual blocks of
:class:`memvla.layers.mamba.MambaMixer`. Module names follow Hugging Face's ``MambaModel``:
``embeddings``, ``layers.{i}.norm``, ``layers.{i}.mixer.*``, ``norm_f``, so that its
checkpoints load by name (:func:`memvla.interop.hf_mamba.load_hf_mamba`).

Unlike attention, the stack carries a fixed-size state per layer whatever the length of the
episode (:class:`memvla.layers.mamba.MambaState`); ``forward`` continues a given list of
states over a sequence and ``step`` over one token, both returning the new list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..configs import _require
from ..layers.mamba import MambaMixer, MambaState
from ..layers.norm import RMSNorm
from ..layers.ssm import KERNEL_MODES


@dataclass
class MambaConfig:
    """Mamba-1 stack. ``d_inner = 0``: ``expand * d_model``; ``dt_rank = "auto"``:
    ``ceil(d_model / 16)``; ``vocab_size = 0``: no token embeddings. ``residual_in_fp32``
    keeps the residual stream in float32 (as Hugging Face's and mamba_ssm's blocks do).
    ``kernels``: "auto" | "pure" | "cuda" (see :func:`memvla.layers.ssm.cuda_kernels`)."""

    d_model: int = 768
    n_layer: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    d_inner: int = 0
    dt_rank: int | str = "auto"
    vocab_size: int = 0
    rms_eps: float = 1e-5
    use_bias: bool = False
    conv_bias: bool = True
    residual_in_fp32: bool = True
    kernels: str = "auto"

    def __post_init__(self):
        for name in ("d_model", "n_layer", "d_state", "d_conv", "expand"):
            v = getattr(self, name)
            _require(v > 0, f"mamba.{name} must be > 0, got {v}")
        _require(self.d_inner >= 0, f"mamba.d_inner must be >= 0 (0: expand * d_model), got "
                 f"{self.d_inner}")
        _require(self.dt_rank == "auto" or (isinstance(self.dt_rank, int) and self.dt_rank > 0),
                 f"mamba.dt_rank must be 'auto' or an int > 0, got {self.dt_rank!r}")
        _require(self.vocab_size >= 0, f"mamba.vocab_size must be >= 0, got {self.vocab_size}")
        _require(self.rms_eps > 0, f"mamba.rms_eps must be > 0, got {self.rms_eps}")
        _require(self.kernels in KERNEL_MODES, f"mamba.kernels must be one of {KERNEL_MODES}, "
                 f"got {self.kernels!r}")

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def inner(self) -> int:
        """The mixer's inner width Di."""
        return self.d_inner or self.expand * self.d_model

    @property
    def rank(self) -> int:
        """The time-step projection's rank R."""
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)


class MambaBlock(nn.Module):
    """x + mixer(norm(x)), the residual in float32 with ``residual_in_fp32``."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mixer = MambaMixer(cfg.d_model, cfg.inner, cfg.d_state, cfg.d_conv, cfg.rank,
                                cfg.use_bias, cfg.conv_bias, cfg.kernels)

    def _residual(self, x: Tensor) -> Tensor:
        return x.float() if self.residual_in_fp32 else x

    def forward(self, x: Tensor, state: MambaState | None = None,
                chunk: int | None = None, mask: Tensor | None = None
                ) -> tuple[Tensor, MambaState]:
        """x (B, N, D) -> (B, N, D), the mixer's new state (``mask``: see the mixer)."""
        y, state = self.mixer(self.norm(x.to(self.norm.weight.dtype)), state, chunk,
                              mask)  # (B, N, D)
        return self._residual(x) + y, state

    def step(self, x_t: Tensor, state: MambaState | None = None) -> tuple[Tensor, MambaState]:
        """x_t (B, D) -> (B, D), the mixer's new state."""
        y, state = self.mixer.step(self.norm(x_t.to(self.norm.weight.dtype)), state)  # (B, D)
        return self._residual(x_t) + y, state


class MambaBackbone(nn.Module):
    """Token embeddings (none with vocab_size 0), Mamba blocks, final RMSNorm.

    ``forward`` takes embeddings, not ids, so that other tokens (images, state, memory) can
    be mixed into the sequence; :meth:`embed` maps ids to embeddings.
    """

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model) if cfg.vocab_size else None
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.rms_eps)

    def embed(self, ids: Tensor) -> Tensor:
        if self.embeddings is None:
            raise RuntimeError("this Mamba backbone has no token embeddings (vocab_size = 0)")
        return self.embeddings(ids)  # (B, N, D)

    def init_states(self, batch: int, device: torch.device | str | None = None
                    ) -> list[MambaState]:
        """Zero states, one per layer: the state before the first token."""
        return [layer.mixer.init_state(batch, device) for layer in self.layers]

    def _states(self, states: list[MambaState] | None, where: str) -> list[MambaState | None]:
        if states is None:
            return [None] * len(self.layers)
        if not isinstance(states, list | tuple) or len(states) != len(self.layers):
            got = len(states) if isinstance(states, list | tuple) else type(states).__name__
            raise ValueError(f"{where}: states must be a list of {len(self.layers)} MambaState "
                             f"(one per layer), got {got}")
        return list(states)

    def forward(self, x: Tensor, states: list[MambaState] | None = None,
                chunk: int | None = None, final_norm: bool = True, mask: Tensor | None = None,
                layer_outputs: list | None = None) -> tuple[Tensor, list[MambaState]]:
        """x (B, N, D), per-layer states (zeros when None) -> hidden (B, N, D) after norm_f
        (the residual stream before it with ``final_norm=False``), the new states.
        ``mask`` (B, N): real tokens first (see :class:`MambaMixer`); ``layer_outputs``, a
        list, receives each layer's output (B, N, D)."""
        new_states = []
        for layer, state in zip(self.layers, self._states(states, "MambaBackbone"), strict=True):
            x, state = layer(x, state, chunk, mask)  # (B, N, D)
            new_states.append(state)
            if layer_outputs is not None:
                layer_outputs.append(x)
        return (self.norm_f(x) if final_norm else x), new_states

    def step(self, x_t: Tensor, states: list[MambaState] | None = None,
             final_norm: bool = True) -> tuple[Tensor, list[MambaState]]:
        """One token x_t (B, D) -> hidden (B, D), the new states."""
        if x_t.dim() != 2:
            raise ValueError(f"MambaBackbone.step: x_t must be (B, D), got {tuple(x_t.shape)}")
        new_states = []
        for layer, state in zip(self.layers, self._states(states, "MambaBackbone.step"),
                                strict=True):
            x_t, state = layer.step(x_t, state)  # (B, D)
            new_states.append(state)
        return (self.norm_f(x_t) if final_norm else x_t), new_states
