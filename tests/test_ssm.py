"""The selective scan and the Mamba mixer / backbone: the chunked parallel scan against
its sequential reference (outputs, final state, gradients), recurrence against the
parallel forward, streaming in pieces against one pass, the fixed-size state, state checks
and the CUDA-kernel fallback (mamba_ssm is simulated: it is not installed here)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import memvla.layers.mamba as mamba_layer
import memvla.layers.ssm as ssm
from memvla.layers.mamba import MambaState
from memvla.layers.ssm import (
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_step,
)
from memvla.models.mamba import MambaBackbone, MambaConfig

TOL = 1e-4  # float32


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def scan_inputs(b=2, n=50, di=12, dn=5, dt_shift=0.0, h0=True, requires_grad=False):
    """Random inputs of the selective scan, time steps around softplus(-1 + dt_shift)."""
    u = torch.randn(b, n, di)
    dt = F.softplus(torch.randn(b, n, di) - 1.0 + dt_shift)
    A = -torch.exp(torch.randn(di, dn))
    B, C = torch.randn(b, n, dn), torch.randn(b, n, dn)
    D, z = torch.randn(di), torch.randn(b, n, di)
    h = torch.randn(b, di, dn) if h0 else None
    args = [u, dt, A, B, C, D, z, h]
    if requires_grad:
        args = [None if a is None else a.clone().requires_grad_() for a in args]
    return args


def tiny_backbone(**kw) -> MambaBackbone:
    cfg = MambaConfig(**{"d_model": 16, "n_layer": 2, "d_state": 4, "d_conv": 4,
                         "vocab_size": 0, **kw})
    model = MambaBackbone(cfg)
    with torch.no_grad():  # off the trivial init, so that every parameter matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# -- the scan functions ----------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 16, 64])
def test_chunked_scan_equals_reference(chunk):
    args = scan_inputs(n=50)
    y_ref, h_ref = selective_scan_ref(*args)
    y, h = selective_scan_chunked(*args, chunk=chunk)
    assert max_diff(y, y_ref) < 1e-5
    assert max_diff(h, h_ref) < 1e-5
    # and without D, z, h0
    u, dt, A, B, C = args[:5]
    y_ref, h_ref = selective_scan_ref(u, dt, A, B, C)
    y, h = selective_scan_chunked(u, dt, A, B, C, chunk=chunk)
    assert max_diff(y, y_ref) < 1e-5 and max_diff(h, h_ref) < 1e-5


def test_chunked_scan_gradients_equal_reference():
    names = ["u", "dt", "A", "B", "C", "D", "z", "h0"]
    args_ref = scan_inputs(n=37, requires_grad=True)
    args_par = [a.detach().clone().requires_grad_() for a in args_ref]
    g_y, g_h = torch.randn(2, 37, 12), torch.randn(2, 12, 5)
    for fn, args in ((selective_scan_ref, args_ref),
                     (lambda *a: selective_scan_chunked(*a, chunk=8), args_par)):
        y, h = fn(*args)
        ((y * g_y).sum() + (h * g_h).sum()).backward()
    for name, a, b in zip(names, args_ref, args_par, strict=True):
        scale = a.grad.abs().max().item()
        assert scale > 0, f"no gradient reaches {name}"
        assert max_diff(a.grad, b.grad) <= 1e-5 * max(1.0, scale), name


def test_step_recurrence_equals_scan():
    u, dt, A, B, C, D, z, h0 = scan_inputs(n=40)
    y_par, h_par = selective_scan_chunked(u, dt, A, B, C, D, z, h0)
    h, ys = h0, []
    for t in range(u.shape[1]):
        y_t, h = selective_step(u[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t], h)
        ys.append(y_t)
    assert max_diff(torch.stack(ys, 1), y_par) < TOL
    assert max_diff(h, h_par) < TOL


def test_scan_is_stable_with_large_time_steps():
    # exp(dt A) down to exp(-1e3) per step: products must underflow to 0, never overflow
    u, dt, A, B, C, D, z, h0 = scan_inputs(n=64, dt_shift=8.0)
    A = A * 100
    y_ref, h_ref = selective_scan_ref(u, dt, A, B, C, D, z, h0)
    y, h = selective_scan_chunked(u, dt, A, B, C, D, z, h0, chunk=8)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert max_diff(y, y_ref) < 1e-4 * max(1.0, y_ref.abs().max().item())


def test_scan_of_zero_steps_keeps_the_state():
    u, dt, A, B, C, D, z, h0 = scan_inputs(n=0)
    for fn in (selective_scan_ref, selective_scan_chunked):
        y, h = fn(u, dt, A, B, C, D, z, h0)
        assert y.shape == (2, 0, 12) and torch.equal(h, h0)


def test_scan_shape_errors_name_expected_and_received():
    u, dt, A, B, C, D, z, h0 = scan_inputs(n=10)
    with pytest.raises(ValueError, match=r"B must have shape \(2, 10, 5\), got \(2, 10, 4\)"):
        selective_scan_chunked(u, dt, A, B[..., :4], C)
    with pytest.raises(ValueError, match=r"\(B, Di, Dn\) = \(2, 12, 5\), got \(2, 12, 4\)"):
        selective_step(u[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h=h0[..., :4])
    with pytest.raises(ValueError, match=r"must be torch.float32, got torch.float64"):
        selective_step(u[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h=h0.double())


# -- the mixer and the stack -----------------------------------------------------------------
def test_mixer_step_equals_forward():
    mixer = tiny_backbone().layers[0].mixer
    x = torch.randn(3, 30, 16)
    with torch.no_grad():
        y_par, state_par = mixer(x)
        state, ys = None, []
        for t in range(x.shape[1]):
            y_t, state = mixer.step(x[:, t], state)
            ys.append(y_t)
    assert max_diff(torch.stack(ys, 1), y_par) < TOL
    assert max_diff(state.conv, state_par.conv) < TOL
    assert max_diff(state.ssm, state_par.ssm) < TOL


def test_backbone_step_equals_forward():
    model = tiny_backbone(vocab_size=20)
    ids = torch.randint(0, 20, (2, 25))
    with torch.no_grad():
        h_par, states_par = model(model.embed(ids))
        states, hs = model.init_states(2), []
        for t in range(ids.shape[1]):
            h_t, states = model.step(model.embed(ids[:, t]), states)
            hs.append(h_t)
    assert max_diff(torch.stack(hs, 1), h_par) < TOL
    for s, sp in zip(states, states_par, strict=True):
        assert max_diff(s.ssm, sp.ssm) < TOL and max_diff(s.conv, sp.conv) < TOL


@pytest.mark.parametrize("pieces", [[1, 2, 30, 7], [40], [13, 13, 14], [3] * 13 + [1]])
def test_streaming_in_pieces_equals_one_pass(pieces):
    model = tiny_backbone()
    x = torch.randn(2, sum(pieces), 16)
    with torch.no_grad():
        full, final = model(x)
        outs, states, start = [], None, 0
        for size in pieces:  # pieces shorter than d_conv - 1 carry the conv state too
            out, states = model(x[:, start:start + size], states, chunk=4)
            outs.append(out)
            start += size
    assert max_diff(torch.cat(outs, 1), full) < TOL
    for s, f in zip(states, final, strict=True):
        assert max_diff(s.ssm, f.ssm) < TOL and max_diff(s.conv, f.conv) < TOL


def test_gradients_flow_through_a_carried_state():
    model = tiny_backbone().train()
    x = torch.randn(2, 20, 16)
    _, states = model(x[:, :12])
    out, _ = model(x[:, 12:], states)
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    detached = [s.detach() for s in states]
    assert all(not s.ssm.requires_grad and not s.conv.requires_grad for s in detached)


def test_state_has_a_fixed_size_whatever_the_episode_length():
    model = tiny_backbone()

    def sizes(states):
        return [(tuple(s.conv.shape), tuple(s.ssm.shape)) for s in states]

    with torch.no_grad():
        _, short = model(torch.randn(1, 5, 16))
        _, long = model(torch.randn(1, 600, 16))
        states = long
        for _ in range(50):
            _, states = model.step(torch.randn(1, 16), states)
    assert sizes(short) == sizes(long) == sizes(states) == sizes(model.init_states(1))
    assert sizes(short) == [((1, 32, 3), (1, 32, 4))] * 2


def test_state_errors_name_expected_and_received():
    model = tiny_backbone()
    mixer = model.layers[0].mixer
    good = mixer.init_state(2)
    x_t, x = torch.randn(2, 16), torch.randn(2, 5, 16)
    bad_conv = MambaState(good.conv[..., :2], good.ssm)
    with pytest.raises(ValueError, match=r"conv state .* \(2, 32, 3\), got \(2, 32, 2\)"):
        mixer.step(x_t, bad_conv)
    with pytest.raises(ValueError, match=r"conv state must be torch.float32 .*got torch.float16"):
        mixer.step(x_t, MambaState(good.conv.half(), good.ssm))
    with pytest.raises(ValueError, match=r"SSM state .* \(2, 32, 4\), got \(1, 32, 4\)"):
        mixer(x, MambaState(good.conv, good.ssm[:1]))
    with pytest.raises(ValueError, match=r"SSM state must be torch.float32, got torch.bfloat16"):
        mixer.step(x_t, MambaState(good.conv, good.ssm.bfloat16()))
    with pytest.raises(ValueError, match=r"list of 2 MambaState .* got 1"):
        model.step(x_t, [good])
    with pytest.raises(ValueError, match=r"MambaState \(conv, ssm\), got Tensor"):
        model(x, [good.ssm, good.ssm])


def test_bfloat16_stack_keeps_a_float32_ssm_state():
    model = tiny_backbone()
    low = tiny_backbone().to(torch.bfloat16)
    low.load_state_dict(model.state_dict())
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        ref, _ = model(x)
        out, states = low(x.bfloat16())
        steps, st = [], None
        for t in range(x.shape[1]):
            h_t, st = low.step(x[:, t].bfloat16(), st)
            steps.append(h_t)
    assert all(s.conv.dtype == torch.bfloat16 and s.ssm.dtype == torch.float32 for s in states)
    assert max_diff(out, ref) < 0.05
    assert max_diff(torch.stack(steps, 1), out) < 0.05


def test_config_validation_and_auto_rank():
    cfg = MambaConfig(d_model=40, n_layer=1)
    assert cfg.rank == 3 and cfg.inner == 80 and cfg.hidden_size == 40
    assert MambaConfig(d_model=40, n_layer=1, d_inner=50, dt_rank=7).inner == 50
    with pytest.raises(ValueError, match="mamba.kernels must be one of"):
        MambaConfig(kernels="triton")
    with pytest.raises(ValueError, match="mamba.dt_rank must be 'auto' or an int"):
        MambaConfig(dt_rank="big")
    with pytest.raises(ValueError, match="mamba.d_state must be > 0"):
        MambaConfig(d_state=0)


# -- CUDA kernels: fallback and dispatch -----------------------------------------------------
def test_asking_for_missing_kernels_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(ssm, "_WARNED", set())
    monkeypatch.setattr(ssm, "_load_kernels", lambda: None)  # mamba_ssm does not import
    args = scan_inputs(n=20, h0=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, h1 = selective_scan(*args, kernels="cuda")
        model = tiny_backbone(kernels="cuda")
        model(torch.randn(2, 9, 16))
        model.step(torch.randn(2, 16))
    ours = [w for w in caught if "kernels='cuda'" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "mamba_ssm does not import" in str(ours[0].message)
    y2, h2 = selective_scan_chunked(*args)
    assert max_diff(y1, y2) == 0 and max_diff(h1, h2) == 0
    with pytest.raises(ValueError, match="kernels must be one of"):
        selective_scan(*args, kernels="fast")


def test_installed_kernels_are_not_used_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a CUDA kernel was called for a CPU tensor")

    monkeypatch.setattr(ssm, "_WARNED", set())
    monkeypatch.setattr(ssm, "_load_kernels", lambda: {"selective_scan_fn": boom,
                                                       "causal_conv1d_fn": boom})
    args = scan_inputs(n=20, h0=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selective_scan(*args, kernels="auto")
        selective_scan(*args, kernels="cuda")
    assert ["not on CUDA" in str(w.message) for w in caught] == [True]


def _fake_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                            delta_softplus=False, return_last_state=False):
    """mamba_ssm's layout (B, Di, N) / (B, Dn, N), computed by the reference."""
    assert delta_bias is None and not delta_softplus and return_last_state
    y, h = selective_scan_ref(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                              C.transpose(1, 2), D, None if z is None else z.transpose(1, 2))
    return y.transpose(1, 2), h


def _fake_causal_conv1d_fn(x, weight, bias=None, activation=None):
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1,
                   groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def test_kernel_dispatch_layout(monkeypatch):
    """With (simulated) kernels in use, the mixer gives what the pure path gives."""
    fake = {"selective_scan_fn": _fake_selective_scan_fn,
            "causal_conv1d_fn": _fake_causal_conv1d_fn}
    model = tiny_backbone()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        pure, pure_states = model(x)
        monkeypatch.setattr(ssm, "cuda_kernels", lambda mode, t: fake)
        monkeypatch.setattr(mamba_layer, "cuda_kernels", lambda mode, t: fake)
        fast, fast_states = model(x)
        cont, _ = model(x[:, 6:], model(x[:, :6])[1])  # a given state: the pure scan
    assert max_diff(fast, pure) < TOL and max_diff(cont, pure[:, 6:]) < TOL
    for s, p in zip(fast_states, pure_states, strict=True):
        assert max_diff(s.ssm, p.ssm) < TOL and max_diff(s.conv, p.conv) < TOL


def test_scan_speed_helper_runs():
    from memvla.bench.ssm_speed import format_rows, scan_speed

    rows = scan_speed([24, 40], d_inner=8, d_state=4, batch=1, repeats=1, warmup=0)
    assert [r["length"] for r in rows] == [24, 40]
    assert all(r["max_abs_err"] < 1e-5 and r["ref_ms"] > 0 and r["chunked_ms"] > 0
               for r in rows)
    assert "speedup" in format_rows(rows)
