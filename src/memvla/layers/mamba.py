"""The Mamba mixer: a gated, causal depthwise convolution followed by a selective SSM.

Parameter names and shapes follow Hugging Face's ``MambaMixer`` (``in_proj``, ``conv1d``,
``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``) so that its checkpoints load by
name. The mixer carries a fixed-size state between calls, :class:`MambaState`:

- ``conv`` (B, Di, Kc - 1): the last ``Kc - 1`` inputs of the convolution, in the dtype of
  the mixer's weights (zeros before the first token: the causal zero padding);
- ``ssm`` (B, Di, Dn): the selective SSM's state, float32.

``forward`` runs a whole sequence (the parallel scan, or ``mamba_ssm``'s CUDA kernels, see
:func:`memvla.layers.ssm.cuda_kernels`) and ``step`` one token; both start from a given
state (zeros when None) and return the new one, so that running a sequence in pieces, or
token by token, gives the same outputs as running it at once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ssm import (
    KERNEL_MODES,
    STATE_DTYPE,
    check_ssm_state,
    cuda_kernels,
    selective_scan,
    selective_step,
)


class MambaState(NamedTuple):
    """The state a Mamba mixer carries: conv (B, Di, Kc - 1), ssm (B, Di, Dn) float32."""

    conv: Tensor
    ssm: Tensor

    def detach(self) -> MambaState:
        """Cut the autograd graph (state carried across training segments)."""
        return MambaState(self.conv.detach(), self.ssm.detach())


class MambaMixer(nn.Module):
    """in_proj -> (x, z); x -> causal depthwise conv -> silu -> selective SSM (time step,
    B and C computed from x) -> gated by silu(z) -> out_proj.

    ``kernels``: "auto" (``mamba_ssm``'s CUDA kernels when installed and on CUDA, else pure
    PyTorch), "pure", or "cuda" (as "auto", warning once when they cannot be used).
    """

    def __init__(self, d_model: int, d_inner: int, d_state: int = 16, d_conv: int = 4,
                 dt_rank: int | None = None, use_bias: bool = False, conv_bias: bool = True,
                 kernels: str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        for name, v in {"d_model": d_model, "d_inner": d_inner, "d_state": d_state,
                        "d_conv": d_conv}.items():
            if v <= 0:
                raise ValueError(f"MambaMixer: {name} must be > 0, got {v}")
        dt_rank = dt_rank or math.ceil(d_model / 16)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"MambaMixer: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if kernels not in KERNEL_MODES:
            raise ValueError(f"MambaMixer: kernels must be one of {KERNEL_MODES}, got "
                             f"{kernels!r}")
        self.d_model, self.d_inner, self.d_state, self.d_conv = d_model, d_inner, d_state, d_conv
        self.dt_rank, self.kernels = dt_rank, kernels
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=use_bias)
        # the padding is HF's layout; forward pads on the left itself (causal, state-aware)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=use_bias)
        self.reset_ssm_parameters(dt_min, dt_max)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        """Mamba's initialisation: A = -(1 .. Dn) per channel (S4D-real), D = 1, and a time
        step softplus(dt_proj.bias) log-uniform in [dt_min, dt_max] so that a fresh layer
        neither forgets at once nor never."""
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)  # (Dn,)
        self.A_log.copy_(a.log().expand(self.d_inner, -1))  # (Di, Dn)
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        lo, hi = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (hi - lo) + lo).clamp(min=1e-4)  # (Di,)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    # -- state -------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device | str | None = None) -> MambaState:
        """The state before the first token: zeros."""
        w = self.conv1d.weight
        device = w.device if device is None else device
        return MambaState(
            torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=w.dtype),
            torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=STATE_DTYPE))

    def check_state(self, state: MambaState | tuple, batch: int, device: torch.device,
                    where: str = "MambaMixer") -> MambaState:
        """A ValueError naming expected and received when ``state`` is not this mixer's
        (conv (B, Di, Kc - 1) in the weights' dtype, ssm (B, Di, Dn) float32, on device)."""
        if not isinstance(state, tuple) or len(state) != 2:
            raise ValueError(f"{where}: state must be a MambaState (conv, ssm), got "
                             f"{type(state).__name__}"
                             + (f" of length {len(state)}" if isinstance(state, tuple) else ""))
        conv, ssm = state
        want = (batch, self.d_inner, self.d_conv - 1)
        dtype = self.conv1d.weight.dtype
        if not isinstance(conv, Tensor) or tuple(conv.shape) != want:
            got = tuple(conv.shape) if isinstance(conv, Tensor) else type(conv).__name__
            raise ValueError(f"{where}: conv state must have shape (B, Di, Kc - 1) = {want}, "
                             f"got {got}")
        if conv.dtype != dtype:
            raise ValueError(f"{where}: conv state must be {dtype} (the mixer's weights), got "
                             f"{conv.dtype}")
        if conv.device != device:
            raise ValueError(f"{where}: conv state must be on {device}, got {conv.device}")
        check_ssm_state(ssm, batch, self.d_inner, self.d_state, device, where)
        return MambaState(conv, ssm)

    # -- pieces ------------------------------------------------------------------------------
    def _ssm_inputs(self, xs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Time step dt (..., Di) > 0 and B, C (..., Dn), all from the conv output."""
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt).float())  # (..., Di)
        return dt, B, C

    def _conv(self, xs: Tensor, conv_state: Tensor | None, kernels: dict | None,
              lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv + silu over xs (B, N, Di), continuing ``conv_state``;
        returns the activations (B, N, Di) and the new conv state (B, Di, Kc - 1): the
        inputs before each sequence's end (``lengths`` (B,) real tokens; None: all N)."""
        w = self.conv1d.weight  # (Di, 1, Kc)
        x = xs.transpose(1, 2)  # (B, Di, N)
        prev = conv_state if conv_state is not None else x.new_zeros(
            x.shape[0], self.d_inner, self.d_conv - 1)  # (B, Di, Kc-1)
        full = torch.cat([prev.to(x.dtype), x], dim=-1)  # (B, Di, Kc-1+N)
        if lengths is None:
            new_state = full[..., full.shape[-1] - (self.d_conv - 1):]  # (B, Di, Kc-1)
        else:  # the Kc - 1 inputs up to each sequence's last real token
            at = lengths.to(x.device)[:, None] + torch.arange(self.d_conv - 1, device=x.device)
            new_state = full.gather(2, at[:, None].expand(-1, self.d_inner, -1))  # (B,Di,Kc-1)
        new_state = new_state.to(w.dtype)
        if kernels is not None and conv_state is None and "causal_conv1d_fn" in kernels:
            out = kernels["causal_conv1d_fn"](x.contiguous(), w.squeeze(1), self.conv1d.bias,
                                              activation="silu")  # (B, Di, N)
        else:
            out = F.silu(F.conv1d(full, w, self.conv1d.bias, groups=self.d_inner))  # (B, Di, N)
        return out.transpose(1, 2), new_state  # (B, N, Di)

    # -- running -----------------------------------------------------------------------------
    def forward(self, x: Tensor, state: MambaState | tuple | None = None,
                chunk: int | None = None, mask: Tensor | None = None
                ) -> tuple[Tensor, MambaState]:
        """x (B, N, D), state (zeros when None) -> y (B, N, D), the state after the last token.
        ``chunk``: chunk length of the parallel scan (default ~sqrt N). ``mask`` (B, N) bool:
        real tokens first, then padding, which changes neither state (its inputs are zero
        and its time step 0; its outputs are meaningless)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MambaMixer: x must be (B, N, D) with D = {self.d_model}, got "
                             f"{tuple(x.shape)}")
        if state is not None:
            state = self.check_state(state, x.shape[0], x.device)
        lengths = None
        if mask is not None:
            lengths = mask.sum(1)  # (B,)
            if bool((mask != (torch.arange(x.shape[1], device=mask.device)[None]
                              < lengths[:, None])).any()):
                raise ValueError("MambaMixer: mask must hold each sequence's real tokens "
                                 "first, then its padding")
        kernels = None if mask is not None else cuda_kernels(self.kernels, x)
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, N, Di) each
        if mask is not None:
            xs = xs * mask[..., None].to(xs.dtype)  # (B, N, Di) padding: no input
        xs, conv_state = self._conv(xs, None if state is None else state.conv, kernels,
                                    lengths)
        dt, B, C = self._ssm_inputs(xs)  # (B, N, Di), (B, N, Dn), (B, N, Dn)
        if mask is not None:
            dt = dt * mask[..., None].to(dt.dtype)  # (B, N, Di) padding: the state holds
        A = -torch.exp(self.A_log.float())  # (Di, Dn)
        y, h = selective_scan(xs, dt, A, B, C, self.D, z, None if state is None else state.ssm,
                              kernels=self.kernels, chunk=chunk)  # (B, N, Di), (B, Di, Dn)
        return self.out_proj(y.to(x.dtype)), MambaState(conv_state, h)

    def step(self, x_t: Tensor, state: MambaState | tuple | None = None
             ) -> tuple[Tensor, MambaState]:
        """One token: x_t (B, D), state (zeros when None) -> y_t (B, D), the new state."""
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"MambaMixer.step: x_t must be (B, D) with D = {self.d_model}, "
                             f"got {tuple(x_t.shape)}")
        b = x_t.shape[0]
        state = (self.init_state(b, x_t.device) if state is None
                 else self.check_state(state, b, x_t.device, "MambaMixer.step"))
        xs, z = self.in_proj(x_t).chunk(2, dim=-1)  # (B, Di) each
        w = self.conv1d.weight  # (Di, 1, Kc)
        window = torch.cat([state.conv.to(xs.dtype), xs.unsqueeze(-1)], dim=-1)  # (B, Di, Kc)
        xc = (window * w[:, 0].to(xs.dtype)).sum(-1)  # (B, Di)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias.to(xs.dtype)  # (B, Di)
        xs = F.silu(xc)  # (B, Di)
        dt, B, C = self._ssm_inputs(xs)  # (B, Di), (B, Dn), (B, Dn)
        A = -torch.exp(self.A_log.float())  # (Di, Dn)
        y, h = selective_step(xs, dt, A, B, C, self.D, z, state.ssm)  # (B, Di), (B, Di, Dn)
        return self.out_proj(y.to(x_t.dtype)), MambaState(window[..., 1:].to(w.dtype), h)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"d_conv={self.d_conv}, dt_rank={self.dt_rank}, kernels={self.kernels!r}")
