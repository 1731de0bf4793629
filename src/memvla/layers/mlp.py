"""Gated MLP: SwiGLU (Llama / SmolLM2) or GeGLU with tanh GELU (Gemma), and a plain MLP."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def gated_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, act: str = "silu"):
    """down(act(gate(x)) * up(x)); weights in nn.Linear layout (out, in)."""
    h = activation(act)(F.linear(x, w_gate)) * F.linear(x, w_up)  # (..., F)
    return F.linear(h, w_down)  # (..., D)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        activation(act)  # validate early
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return gated_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                         self.act)


class MLP(nn.Module):
    """fc1 -> activation -> fc2 with biases (the ViT's MLP)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self._act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self._act(self.fc1(x)))
