"""The selective scan of Mamba (S6) in pure PyTorch: a sequential reference, a chunked
parallel scan for training, one recurrent step for inference, and the dispatch to
``mamba_ssm``'s CUDA kernel when it is installed.

Per inner channel d and state index n, with time step dt > 0 and A < 0::

    h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t          (B, Di, Dn)
    y_t = C_t . h_t  (+ D u_t)  (* silu(z_t))           (B, Di)

Layout: time on axis 1, ``u``/``dt``/``z`` (B, N, Di), ``B``/``C`` (B, N, Dn), ``A``
(Di, Dn), ``D`` (Di,). Every function takes an initial state ``h0`` (B, Di, Dn) (zeros when
None) and returns the final one, so that a prefix can be continued piece by piece. The
state is float32 whatever the input dtype (the sums run in float32); outputs come back in
the dtype of ``u``. Only exponents ``<= 0`` are ever exponentiated (``dt A`` and sums of it),
so nothing overflows in float32.

:func:`selective_scan_chunked` splits time into ``Nc`` chunks of ``Lc`` steps and runs the
recurrence inside all chunks at once (``Lc`` steps on (B, Nc, Di, Dn) tensors), carries the
state across chunks (``Nc`` steps, each chunk's decay ``exp(A sum(dt))``), then reruns the
chunks from their true start states reading the outputs: ``2 Lc + Nc`` (about
``3 sqrt(N)``) small sequential steps instead of ``N``. The work stays O(N Di Dn)
(no L x L matrices: Mamba-1's decay differs per (d, n), so Mamba-2's matmul form does not
apply). Log-depth scans (Hillis-Steele, and a Blelloch-style odd/even recursion) were
measured too and were slower on CPU: their products of many decays sink into denormals, and
they write the full (B, N, Di, Dn) state several times over.
:func:`memvla.bench.ssm_speed.scan_speed` measures it against :func:`selective_scan_ref`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..configs import KERNEL_CHOICES

KERNEL_MODES = KERNEL_CHOICES  # "auto", "pure", "cuda"
STATE_DTYPE = torch.float32  # the SSM state h, whatever the model's dtype

_WARNED: set[str] = set()  # warning keys already given in this process


# -- checks ----------------------------------------------------------------------------------
def _shape(t: Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def check_ssm_state(h: Tensor, batch: int, d_inner: int, d_state: int, device: torch.device,
                    where: str = "selective scan") -> None:
    """A state (B, Di, Dn) float32 on ``device``; a ValueError names expected and received."""
    if not isinstance(h, Tensor):
        raise ValueError(f"{where}: the SSM state must be a tensor (B, Di, Dn) = "
                         f"{(batch, d_inner, d_state)}, got {type(h).__name__}")
    want = (batch, d_inner, d_state)
    if tuple(h.shape) != want:
        raise ValueError(f"{where}: SSM state must have shape (B, Di, Dn) = {want}, got "
                         f"{tuple(h.shape)}")
    if h.dtype != STATE_DTYPE:
        raise ValueError(f"{where}: SSM state must be {STATE_DTYPE}, got {h.dtype}")
    if h.device != device:
        raise ValueError(f"{where}: SSM state must be on {device}, got {h.device}")


def _check(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
           z: Tensor | None, h0: Tensor | None, step: bool = False) -> None:
    where = "selective_step" if step else "selective scan"
    lead = tuple(u.shape[:-1])  # (B,) for a step, (B, N) for a scan
    if u.dim() != (2 if step else 3):
        raise ValueError(f"{where}: u must be {'(B, Di)' if step else '(B, N, Di)'}, got "
                         f"{tuple(u.shape)}")
    di = u.shape[-1]
    if A.dim() != 2 or A.shape[0] != di:
        raise ValueError(f"{where}: A must be (Di, Dn) with Di = {di}, got {tuple(A.shape)}")
    dn = A.shape[1]
    wants = {"dt": (dt, (*lead, di)), "B": (B, (*lead, dn)), "C": (C, (*lead, dn)),
             "z": (z, (*lead, di)), "D": (D, (di,))}
    for name, (t, want) in wants.items():
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{where}: {name} must have shape {want}, got {_shape(t)}")
    if h0 is not None:
        check_ssm_state(h0, u.shape[0], di, dn, u.device, where)


def _float32(fn: Callable) -> Callable:
    """Run ``fn`` with autocast off: the scan sums in float32 even inside an autocast
    region (its inputs are upcast explicitly)."""

    @functools.wraps(fn)
    def wrapped(u: Tensor, *args: Any, **kwargs: Any):
        if not torch.amp.is_autocast_available(u.device.type):
            return fn(u, *args, **kwargs)
        with torch.autocast(u.device.type, enabled=False):
            return fn(u, *args, **kwargs)

    return wrapped


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Skip connection ``D u`` and the gate ``silu(z)``; back to the dtype of ``u``."""
    if D is not None:
        y = y + u.float() * D.float()  # (..., Di)
    if z is not None:
        y = y * F.silu(z.float())  # (..., Di)
    return y.to(u.dtype)


def _discretize(u: Tensor, dt: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Decays exp(dt A) and inputs dt u B, float32, both (B, N, Di, Dn)."""
    dtf = dt.float()
    decay = torch.exp(dtf.unsqueeze(-1) * A.float())  # (B, N, Di, Dn)
    inp = (dtf * u.float()).unsqueeze(-1) * B.float().unsqueeze(-2)  # (B, N, Di, Dn)
    return decay, inp


def _empty(u: Tensor, A: Tensor, D: Tensor | None, z: Tensor | None,
           h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """A scan over zero steps: no output, the state unchanged."""
    h = h0 if h0 is not None else u.new_zeros(u.shape[0], u.shape[2], A.shape[1],
                                               dtype=STATE_DTYPE)  # (B, Di, Dn)
    return u.new_zeros(u.shape), h  # (B, 0, Di)


# -- the sequential reference ----------------------------------------------------------------
@_float32
def selective_scan_ref(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Tensor | None = None, z: Tensor | None = None,
                       h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence one time step after the other: the slow twin of
    :func:`selective_scan_chunked`. Returns y (B, N, Di) and the final state (B, Di, Dn)."""
    _check(u, dt, A, B, C, D, z, h0)
    if u.shape[1] == 0:
        return _empty(u, A, D, z, h0)
    decay, inp = _discretize(u, dt, A, B)  # (B, N, Di, Dn)
    h = h0 if h0 is not None else inp.new_zeros(inp[:, 0].shape)  # (B, Di, Dn)
    ys = []
    for a_t, b_t, c_t in zip(decay.unbind(1), inp.unbind(1), C.float().unsqueeze(-1).unbind(1),
                             strict=True):
        h = torch.addcmul(b_t, a_t, h)  # (B, Di, Dn)
        ys.append(torch.matmul(h, c_t).squeeze(-1))  # (B, Di)
    y = torch.stack(ys, 1)  # (B, N, Di)
    return _finish(y, u, D, z), h


# -- the chunked parallel scan ---------------------------------------------------------------
def default_chunk(n: int) -> int:
    """The power of two nearest sqrt(n): about 3 sqrt(n) sequential steps in all."""
    return 2 ** round(math.log2(max(n, 1)) / 2)


@_float32
def selective_scan_chunked(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None,
                           h0: Tensor | None = None,
                           chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """The selective scan in ``2 Lc + Nc`` sequential steps (``chunk`` = Lc, default
    :func:`default_chunk`); the same result as :func:`selective_scan_ref` up to rounding.
    Returns y (B, N, Di) and the final state (B, Di, Dn)."""
    _check(u, dt, A, B, C, D, z, h0)
    b, n, di = u.shape
    dn = A.shape[1]
    if n == 0:
        return _empty(u, A, D, z, h0)
    lc = chunk or default_chunk(n)
    if lc <= 0:
        raise ValueError(f"selective_scan_chunked: chunk must be > 0, got {chunk}")
    nc = -(-n // lc)
    pad = nc * lc - n
    dtf, uf, Bf, Cf = dt.float(), u.float(), B.float(), C.float()
    if pad:  # padded steps have dt = 0: decay 1, no input, so they leave the state as it is
        dtf, uf, Bf, Cf = (F.pad(t, (0, 0, 0, pad)) for t in (dtf, uf, Bf, Cf))
    dtc = dtf.view(b, nc, lc, di)  # (B, Nc, Lc, Di)
    decay = torch.exp(dtc.unsqueeze(-1) * A.float())  # (B, Nc, Lc, Di, Dn)
    inp = (dtc * uf.view(b, nc, lc, di)).unsqueeze(-1)  # (B, Nc, Lc, Di, 1)
    inp = inp * Bf.view(b, nc, lc, 1, dn)  # (B, Nc, Lc, Di, Dn)

    # 1. every chunk but the last from a zero state, all at once: its end state
    ends = inp.new_zeros(b, nc - 1, di, dn)  # (B, Nc-1, Di, Dn)
    if nc > 1:
        for a_t, b_t in zip(decay[:, :-1].unbind(2), inp[:, :-1].unbind(2), strict=True):
            ends = torch.addcmul(b_t, a_t, ends)  # (B, Nc-1, Di, Dn)
    # 2. carry the state across chunks; a chunk's decay is exp(A sum(dt)), exponent <= 0
    chunk_decay = torch.exp(dtc[:, :-1].sum(2).unsqueeze(-1) * A.float())  # (B, Nc-1, Di, Dn)
    s = h0 if h0 is not None else inp.new_zeros(b, di, dn)  # (B, Di, Dn)
    starts = [s]
    for g_c, e_c in zip(chunk_decay.unbind(1), ends.unbind(1), strict=True):
        s = torch.addcmul(e_c, g_c, s)  # (B, Di, Dn)
        starts.append(s)
    # 3. rerun every chunk from its true start state, reading the outputs
    h = torch.stack(starts, 1)  # (B, Nc, Di, Dn)
    ys = []
    c_steps = Cf.view(b, nc, lc, dn, 1).unbind(2)  # Lc x (B, Nc, Dn, 1)
    for a_t, b_t, c_t in zip(decay.unbind(2), inp.unbind(2), c_steps, strict=True):
        h = torch.addcmul(b_t, a_t, h)  # (B, Nc, Di, Dn)
        ys.append(torch.matmul(h, c_t).squeeze(-1))  # (B, Nc, Di)
    y = torch.stack(ys, 2).reshape(b, nc * lc, di)[:, :n]  # (B, N, Di)
    return _finish(y, u, D, z), h[:, -1]


# -- one step ------------------------------------------------------------------------------
@_float32
def selective_step(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   h: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One time step: u, dt, z (B, Di), B, C (B, Dn), state h (B, Di, Dn) float32 (zeros
    when None) -> y (B, Di), the new state (B, Di, Dn)."""
    _check(u, dt, A, B, C, D, z, h, step=True)
    dtf = dt.float()
    if h is None:
        h = dtf.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, Di, Dn)
    decay = torch.exp(dtf.unsqueeze(-1) * A.float())  # (B, Di, Dn)
    inp = (dtf * u.float()).unsqueeze(-1) * B.float().unsqueeze(-2)  # (B, Di, Dn)
    h = torch.addcmul(inp, decay, h)  # (B, Di, Dn)
    y = torch.matmul(h, C.float().unsqueeze(-1)).squeeze(-1)  # (B, Di)
    return _finish(y, u, D, z), h


# -- CUDA kernels ----------------------------------------------------------------------------
def warn_once(key: str, message: str) -> None:
    """``warnings.warn`` the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=1)
def _load_kernels() -> dict[str, Callable] | None:
    """``mamba_ssm``'s selective_scan_fn (and ``causal_conv1d_fn`` when that package is
    there), or None when mamba_ssm does not import."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or built against another torch / CUDA
        return None
    fns: dict[str, Callable] = {"selective_scan_fn": selective_scan_fn}
    try:
        from causal_conv1d import causal_conv1d_fn

        fns["causal_conv1d_fn"] = causal_conv1d_fn
    except Exception:
        pass
    return fns


def cuda_kernels(mode: str, x: Tensor) -> dict[str, Callable] | None:
    """The CUDA kernels to use for input ``x`` under ``mode`` ("auto": when installed and
    ``x`` is on CUDA; "pure": never; "cuda": as "auto", with one warning per process when
    they cannot be used), or None for the pure PyTorch path."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "pure":
        return None
    fns = _load_kernels()
    if fns is not None and x.is_cuda:
        return fns
    if mode == "cuda":
        why = ("mamba_ssm does not import (pip install mamba-ssm causal-conv1d)" if fns is None
               else f"the input is on {x.device}, not on CUDA")
        warn_once("cuda", f"kernels='cuda' was asked for but {why}; falling back to the pure "
                          "PyTorch selective scan")
    return None


def selective_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None, h0: Tensor | None = None,
                   kernels: str = "auto", chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """The selective scan by the fastest path available: ``mamba_ssm``'s CUDA kernel (see
    :func:`cuda_kernels`; it takes no initial state, so a given ``h0`` uses the pure path),
    else :func:`selective_scan_chunked`. Returns y (B, N, Di), final state (B, Di, Dn)."""
    fns = cuda_kernels(kernels, u)
    if fns is not None and h0 is not None:
        if kernels == "cuda":
            warn_once("cuda-h0", "mamba_ssm's selective_scan_fn takes no initial state; a scan "
                                 "continued from a state uses the pure PyTorch path")
        fns = None
    if fns is None or u.shape[1] == 0:
        return selective_scan_chunked(u, dt, A, B, C, D, z, h0, chunk)
    _check(u, dt, A, B, C, D, z, h0)
    y, h = fns["selective_scan_fn"](
        u.transpose(1, 2).contiguous(), dt.to(u.dtype).transpose(1, 2).contiguous(), A.float(),
        B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
        None if D is None else D.float(), None if z is None else z.transpose(1, 2).contiguous(),
        delta_bias=None, delta_softplus=False, return_last_state=True)  # (B, Di, N), (B, Di, Dn)
    return y.transpose(1, 2).to(u.dtype), h.to(STATE_DTYPE)  # (B, N, Di), (B, Di, Dn)
