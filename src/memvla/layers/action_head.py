"""OpenVLA-OFT's L1-regression action head: an MLP-ResNet over the decoder's hidden states
at the action placeholders.

The placeholders are laid out step-major (``chunk_size`` steps × ``action_dim`` dims), so
the ``action_dim`` hidden states of one step are concatenated into one vector per step:
(B, A·Da, D) -> (B, A, Da·D). The MLP-ResNet maps each step's vector to its Da action
values: LayerNorm -> Linear -> ReLU, ``blocks`` residual blocks x + ReLU(Linear(LN(x))),
LayerNorm -> Linear. Module names follow OFT (``model.layer_norm1``, ``model.fc1``,
``model.mlp_resnet_blocks.{i}.ffn``, ``model.layer_norm2``, ``model.fc2``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def group_action_tokens(hidden: Tensor, chunk_size: int, action_dim: int) -> Tensor:
    """Hidden states at the placeholders (B, A·Da, D) -> one vector per step (B, A, Da·D)."""
    b, k, d = hidden.shape
    if k != chunk_size * action_dim:
        raise ValueError(f"action head: expected {chunk_size} × {action_dim} = "
                         f"{chunk_size * action_dim} action hidden states, got {k}")
    return hidden.reshape(b, chunk_size, action_dim * d)  # (B, A, Da·D)


class MLPResNetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(x)  # (..., H)


class MLPResNet(nn.Module):
    def __init__(self, blocks: int, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden) for _ in range(blocks))
        self.layer_norm2 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc1(self.layer_norm1(x)))  # (..., H)
        for block in self.mlp_resnet_blocks:
            x = block(x)  # (..., H)
        return self.fc2(self.layer_norm2(x))  # (..., out)


class L1RegressionActionHead(nn.Module):
    """Hidden states at the placeholders (B, A·Da, D) -> actions (B, A, Da)."""

    def __init__(self, width: int, hidden: int, chunk_size: int, action_dim: int,
                 blocks: int = 2):
        super().__init__()
        self.chunk_size, self.action_dim = chunk_size, action_dim
        self.model = MLPResNet(blocks, width * action_dim, hidden, action_dim)

    def forward(self, hidden: Tensor) -> Tensor:
        x = group_action_tokens(hidden, self.chunk_size, self.action_dim)  # (B, A, Da·D)
        return self.model(x)  # (B, A, Da)
