"""Flow matching for action chunks.

Time convention: t = 1 is pure noise and t = 0 is data. A training sample is
``x_t = t · noise + (1 − t) · actions`` and the model learns the velocity
``u = dx_t/dt = noise − actions``. Sampling starts from noise at t = 1 and takes N Euler
steps of size dt = −1/N down to t = 0: ``x ← x + dt · v(x, t)``.
Training times are t = time_min + (1 − time_min) · Beta(α, β) with α = 1.5, β = 1 by
default, which puts more weight on noisier times.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


def sample_time(batch: int, alpha: float = 1.5, beta: float = 1.0, time_min: float = 0.001,
                device=None) -> Tensor:
    """Training times (B,) in [time_min, 1] (seeded by torch's global generator)."""
    dist = torch.distributions.Beta(torch.tensor(alpha, device=device),
                                    torch.tensor(beta, device=device))
    return time_min + (1.0 - time_min) * dist.sample((batch,))  # (B,)


def interpolate(actions: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = t·noise + (1−t)·actions; t (B,) broadcast over (B, A, Da), in the actions'
    dtype."""
    t = t[:, None, None].to(actions.dtype)  # (B, 1, 1)
    return t * noise + (1.0 - t) * actions


def target_velocity(actions: Tensor, noise: Tensor) -> Tensor:
    return noise - actions


def sinusoidal_time_embedding(t: Tensor, dim: int, min_period: float = 4e-3,
                              max_period: float = 4.0) -> Tensor:
    """t (B,) -> (B, dim): [sin, cos] at periods spaced geometrically in
    [min_period, max_period]."""
    if dim % 2:
        raise ValueError(f"time embedding: dim must be even, got {dim}")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction  # (dim/2,)
    freq = (2 * math.pi / period).to(torch.float32)
    angle = t.float()[:, None] * freq[None]  # (B, dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)  # (B, dim)


def euler_sample(velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor,
                 steps: int) -> Tensor:
    """Integrate from t = 1 (noise) to t = 0 in ``steps`` Euler steps."""
    if steps <= 0:
        raise ValueError(f"euler_sample: steps must be > 0, got {steps}")
    dt = -1.0 / steps
    x = noise
    for i in range(steps):
        t = torch.full((noise.shape[0],), 1.0 + i * dt, device=noise.device)  # (B,)
        x = x + dt * velocity(x, t)  # (B, A, Da)
    return x


def time_condition(t: Tensor, mlp_in: nn.Linear, mlp_out: nn.Linear,
                   min_period: float = 4e-3, max_period: float = 4.0) -> Tensor:
    """Times t (B,) -> the condition (B, De) of π0.5's adaptive norms:
    silu(mlp_out(silu(mlp_in(sincos(t)))))."""
    te = sinusoidal_time_embedding(t, mlp_in.in_features, min_period, max_period)  # (B, De)
    h = nn.functional.silu(mlp_in(te.to(mlp_in.weight.dtype)))  # (B, De)
    return nn.functional.silu(mlp_out(h))  # (B, De)


def action_time_embed(x: Tensor, t: Tensor, action_in_proj: nn.Linear, mlp_in: nn.Linear,
                      mlp_out: nn.Linear, min_period: float = 4e-3,
                      max_period: float = 4.0) -> Tensor:
    """Noisy actions x (B, A, Da) and times t (B,) -> expert tokens (B, A, De):
    mlp_out(silu(mlp_in([action_in_proj(x); sincos(t)]))) (SmolVLA / π0)."""
    a = action_in_proj(x)  # (B, A, De)
    te = sinusoidal_time_embedding(t, a.shape[-1], min_period, max_period)  # (B, De)
    te = te.to(a.dtype)[:, None].expand_as(a)  # (B, A, De)
    h = nn.functional.silu(mlp_in(torch.cat([a, te], dim=-1)))  # (B, A, De)
    return mlp_out(h)  # (B, A, De)
