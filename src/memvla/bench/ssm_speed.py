"""Speed of the chunked parallel selective scan against its sequential reference.

For each sequence length, random inputs of a tiny Mamba mixer (``d_inner`` channels of
``d_state`` states, batch ``batch``, Mamba's initial time-step range and S4D-real ``A``) go
through :func:`memvla.layers.ssm.selective_scan_ref` and
:func:`memvla.layers.ssm.selective_scan_chunked`: forward alone (no autograd) and forward +
backward (gradients of every input). The calls are timed in interleaved rounds, so that a
change of machine load affects both alike; the figures are medians. The largest difference
of the two outputs is reported beside the times.

Run it with ``memvla bench ssm [--lengths 256,1024,4096] [--threads 1] [--json FILE]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..utils import atomic_write_json
from .timing import cuda_sync, format_table, time_interleaved, torch_info

HELP = "chunked parallel selective scan vs the sequential reference (forward, backward)"


def _inputs(batch: int, n: int, d_inner: int, d_state: int, device: str, seed: int):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    u = randn(batch, n, d_inner)  # (B, N, Di)
    dt = F.softplus(randn(batch, n, d_inner) - 4.0)  # (B, N, Di), about 0.02
    A = -torch.arange(1, d_state + 1, dtype=torch.float32, device=device)  # (Dn,)
    A = A.repeat(d_inner, 1)  # (Di, Dn)
    B, C = randn(batch, n, d_state), randn(batch, n, d_state)  # (B, N, Dn)
    D, z = randn(d_inner), randn(batch, n, d_inner)  # (Di,), (B, N, Di)
    return u, dt, A, B, C, D, z


def scan_speed(lengths: Sequence[int] = (256, 1024, 4096), d_inner: int = 128,
               d_state: int = 16, batch: int = 2, repeats: int = 5, warmup: int = 1,
               backward: bool = True, device: str = "cpu", threads: int | None = None,
               chunk: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """One row per length: median ms of the reference and of the chunked scan, forward
    (and forward + backward with ``backward``), their ratios (``speedup``: reference /
    chunked), and the largest output difference. ``threads`` sets torch's intra-op threads
    for the measurement (restored afterwards)."""
    import torch

    from ..layers.ssm import default_chunk, selective_scan_chunked, selective_scan_ref

    if not lengths or min(lengths) <= 0:
        raise ValueError(f"scan_speed: lengths must be > 0, got {list(lengths)}")
    if repeats <= 0:
        raise ValueError(f"scan_speed: repeats must be > 0, got {repeats}")
    sync = cuda_sync if device.startswith("cuda") else None
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    try:
        for n in lengths:
            args = _inputs(batch, n, d_inner, d_state, device, seed)

            def ref(args=args):
                return selective_scan_ref(*args)

            def par(args=args):
                return selective_scan_chunked(*args, chunk=chunk)

            with torch.no_grad():
                y_ref, h_ref = ref()
                y_par, h_par = par()
                err = max((y_ref - y_par).abs().max().item(), (h_ref - h_par).abs().max().item())
                fwd = time_interleaved({"ref": ref, "par": par}, repeats, warmup, sync)
            row = {"length": n, "chunk": chunk or default_chunk(n), "ref_ms": fwd["ref"].median_ms,
                   "chunked_ms": fwd["par"].median_ms,
                   "speedup": fwd["ref"].median_ms / fwd["par"].median_ms, "max_abs_err": err}
            if backward:
                def grad_call(fn, args=args):
                    leaves = [a.clone().requires_grad_() for a in args]

                    def call():
                        y, h = fn(*leaves)
                        (y.square().sum() + h.square().sum()).backward()
                    return call

                both = time_interleaved({"ref": grad_call(selective_scan_ref),
                                         "par": grad_call(selective_scan_chunked)},
                                        repeats, warmup, sync)
                row.update(ref_fwd_bwd_ms=both["ref"].median_ms,
                           chunked_fwd_bwd_ms=both["par"].median_ms,
                           speedup_fwd_bwd=both["ref"].median_ms / both["par"].median_ms)
            rows.append(row)
    finally:
        torch.set_num_threads(old_threads)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    headers = ["length", "chunk", "ref ms", "chunked ms", "speedup", "max err"]
    with_bwd = "speedup_fwd_bwd" in rows[0]
    if with_bwd:
        headers += ["ref f+b ms", "chunked f+b ms", "speedup f+b"]
    table = []
    for r in rows:
        cells = [r["length"], r["chunk"], f"{r['ref_ms']:.1f}", f"{r['chunked_ms']:.1f}",
                 f"{r['speedup']:.2f}x", f"{r['max_abs_err']:.1e}"]
        if with_bwd:
            cells += [f"{r['ref_fwd_bwd_ms']:.1f}", f"{r['chunked_fwd_bwd_ms']:.1f}",
                      f"{r['speedup_fwd_bwd']:.2f}x"]
        table.append(cells)
    return format_table(headers, table)


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default="256,1024,4096", help="comma-separated lengths")
    parser.add_argument("--d-inner", type=int, default=128)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=None, help="chunk length (default ~sqrt N)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")


def run(args) -> int:
    rows = scan_speed([int(x) for x in args.lengths.split(",")], args.d_inner, args.d_state,
                      args.batch, args.repeats, backward=not args.no_backward,
                      device=args.device, threads=args.threads, chunk=args.chunk)
    print(format_rows(rows))
    if getattr(args, "json", None):
        atomic_write_json(Path(args.json), {"rows": rows, "torch": torch_info()})
    return 0
