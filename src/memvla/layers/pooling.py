"""2-D pooling of a square grid of visual tokens: how StreamVLN's slow memory shrinks a
frame (27×27 SigLIP patches -> 14×14 = 196 tokens).

The tokens (B, P, D) of one image are a g×g grid in row-major order (P = g², g = ``grid``);
pooling with ``stride`` s gives a g'×g' grid, g' = ceil(g / s), again row-major (B, P', D).

- ``"avg"`` / ``"max"``: the mean / maximum over each s×s window. When s does not divide g,
  the last row and column of windows are cut short at the edge of the grid: nothing is
  padded, and an edge mean divides by the tokens its window holds (27×27 / 2: the last
  row and column of cells average 2 tokens, the corner cell is the last token itself).
- ``"bilinear"``: bilinear resampling to g'×g' (half-pixel centres, ``align_corners=False``;
  sampling points clamped to the grid).

The source facts, from StreamVLN's ``get_2dPool`` (``streamvln/model/stream_video_vln.py``):
its "average" and "max" modes call ``avg_pool2d(x, s)`` / ``max_pool2d(x, s)``, whose floor
rule drops the odd last row and column (27×27 -> 13×13 = 169 tokens); its "bilinear" mode
calls ``interpolate(x, size=ceil(g / s), mode="bilinear")``, and that is the mode it runs
(``mm_spatial_pool_mode`` defaults to "bilinear" in ``streamvln/args.py``), hence the
paper's 196 tokens. memvla's "bilinear" is exactly StreamVLN's; its "avg" and "max" keep
the edge (PyTorch's ``ceil_mode=True``) so that every mode gives the same g'×g' grid.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("avg", "max", "bilinear")


def pooled_side(grid: int, stride: int) -> int:
    """g' = ceil(grid / stride): the side of the pooled grid."""
    return -(-grid // stride)


def _check_options(stride: int, mode: str) -> None:
    if stride < 1:
        raise ValueError(f"pool_grid: stride must be >= 1, got {stride}")
    if mode not in MODES:
        raise ValueError(f"pool_grid: mode must be one of {', '.join(map(repr, MODES))}, "
                         f"got {mode!r}")


def _check(tokens: Tensor, grid: int, stride: int, mode: str) -> None:
    _check_options(stride, mode)
    if grid < 1:
        raise ValueError(f"pool_grid: grid must be >= 1, got {grid}")
    if tokens.ndim != 3 or tokens.shape[1] != grid * grid:
        raise ValueError(f"pool_grid: tokens must be (B, P, D) with P = grid × grid = "
                         f"{grid * grid} (grid={grid}), got shape {tuple(tokens.shape)}")


def pool_grid(tokens: Tensor, grid: int, stride: int = 2, mode: str = "avg") -> Tensor:
    """tokens (B, P, D), P = grid² row-major -> (B, P', D), P' = ceil(grid / stride)².

    Keeps the device and dtype of ``tokens``; see the module docstring for the modes.
    """
    _check(tokens, grid, stride, mode)
    b, _, d = tokens.shape
    side = pooled_side(grid, stride)
    x = tokens.transpose(1, 2).reshape(b, d, grid, grid)  # (B, D, g, g)
    if mode == "avg":
        x = F.avg_pool2d(x, stride, ceil_mode=True)  # (B, D, g', g')
    elif mode == "max":
        x = F.max_pool2d(x, stride, ceil_mode=True)  # (B, D, g', g')
    else:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2).contiguous()  # (B, P', D)


def _source(k: int, scale: float, grid: int) -> tuple[int, int, float]:
    """Output row (or column) k of a bilinear resize: the two source rows and the weight
    of the second one."""
    pos = max((k + 0.5) * scale - 0.5, 0.0)
    lo = int(pos)
    return lo, min(lo + 1, grid - 1), pos - lo


def pool_grid_ref(tokens: Tensor, grid: int, stride: int = 2, mode: str = "avg") -> Tensor:
    """Loop twin of :func:`pool_grid`: one output cell at a time, in float64."""
    _check(tokens, grid, stride, mode)
    b, _, d = tokens.shape
    side = pooled_side(grid, stride)
    x = tokens.double().reshape(b, grid, grid, d)  # (B, g, g, D)
    out = x.new_empty(b, side * side, d)  # (B, P', D)
    scale = grid / side
    for i in range(side):
        for j in range(side):
            if mode == "bilinear":
                y0, y1, wy = _source(i, scale, grid)
                x0, x1, wx = _source(j, scale, grid)
                top = (1 - wx) * x[:, y0, x0] + wx * x[:, y0, x1]  # (B, D)
                bottom = (1 - wx) * x[:, y1, x0] + wx * x[:, y1, x1]  # (B, D)
                cell = (1 - wy) * top + wy * bottom  # (B, D)
            else:
                window = x[:, i * stride:(i + 1) * stride, j * stride:(j + 1) * stride]
                window = window.reshape(b, -1, d)  # (B, ≤ stride², D)
                cell = window.mean(1) if mode == "avg" else window.amax(1)  # (B, D)
            out[:, i * side + j] = cell
    return out.to(tokens.dtype)


class GridPool(nn.Module):
    """:func:`pool_grid` as a module (no parameters): ``GridPool(stride, mode)(tokens, grid)``."""

    def __init__(self, stride: int = 2, mode: str = "avg"):
        super().__init__()
        _check_options(stride, mode)
        self.stride = stride
        self.mode = mode

    def forward(self, tokens: Tensor, grid: int) -> Tensor:
        return pool_grid(tokens, grid, self.stride, self.mode)  # (B, P', D)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, mode={self.mode!r}"

