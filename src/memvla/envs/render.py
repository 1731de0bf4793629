"""NumPy-only drawing for the built-in tasks: palette, precomputed shape masks, stamping.

World coordinates are ``(x, y)`` in ``[0, 1]``, x to the right and y downwards (image
convention), so a world point maps to pixel ``(row, col) = (int(y * S), int(x * S))`` for
an ``S×S`` image. Shapes are boolean masks computed once per size (``functools.lru_cache``)
and stamped with slicing, so drawing one object costs a few microseconds.
"""

from __future__ import annotations

import functools

import numpy as np

# Nine saturated, well separated colours (name, RGB); the names are the instruction words.
# Ordered so that any first few are as far apart as possible (tasks with a smaller
# palette_size draw from the start): red, green, blue first.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 25, 25)),
    ("green", (30, 190, 40)),
    ("blue", (30, 60, 255)),
    ("yellow", (255, 230, 0)),
    ("cyan", (0, 220, 230)),
    ("purple", (150, 40, 220)),
    ("orange", (255, 140, 0)),
    ("pink", (255, 120, 200)),
    ("white", (245, 245, 245)),
)
COLOR_NAMES: tuple[str, ...] = tuple(name for name, _ in PALETTE)
PALETTE_NOTE = f"the palette has {len(PALETTE)} colours"
COLORS = np.array([rgb for _, rgb in PALETTE], dtype=np.uint8)  # (9, 3)

BACKGROUND = np.array((25, 25, 30), dtype=np.uint8)
EFFECTOR = np.array((140, 140, 140), dtype=np.uint8)  # grey: not in the palette
CUP = np.array((190, 150, 100), dtype=np.uint8)  # tan cups of the shell game
ZONE = np.array((200, 200, 200), dtype=np.uint8)  # outline of the take-it-back zone
MARKER = np.array((120, 120, 120), dtype=np.uint8)  # start marker of the memoryless twin


def to_px(v: float, size: int) -> int:
    """World coordinate in [0, 1] -> pixel index in [0, size - 1]."""
    return min(size - 1, max(0, int(v * size)))


def px_len(v: float, size: int, minimum: int = 1) -> int:
    """World length -> whole pixels (at least ``minimum``)."""
    return max(minimum, round(v * size))


@functools.lru_cache(maxsize=64)
def disc_mask(r: int) -> np.ndarray:
    """Filled disc of radius ``r`` pixels. Returns (2r+1, 2r+1) bool."""
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r + r  # "+ r" rounds the rim


@functools.lru_cache(maxsize=64)
def ring_mask(r: int, thickness: int = 1) -> np.ndarray:
    """Circle outline of radius ``r``, ``thickness`` >= 1 px. Returns (2r+1, 2r+1) bool."""
    inner = np.zeros_like(disc_mask(r))
    ri = r - thickness
    if ri >= 0:
        inner[thickness:-thickness, thickness:-thickness] = disc_mask(ri)
    return disc_mask(r) & ~inner


@functools.lru_cache(maxsize=64)
def square_mask(h: int, hollow: bool = False, thickness: int = 1) -> np.ndarray:
    """Square of half-size ``h`` (side 2h+1), filled or as an outline. Returns bool."""
    m = np.ones((2 * h + 1, 2 * h + 1), dtype=bool)  # (2h+1, 2h+1)
    if hollow and h >= thickness:
        m[thickness:-thickness, thickness:-thickness] = False
    return m


@functools.lru_cache(maxsize=64)
def cup_mask(h: int) -> np.ndarray:
    """Upside-down cup: a trapezoid, narrow at the top. Returns (2h+1, 2h+1) bool."""
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    half_width = 0.6 * h + 0.4 * h * (yy + h) / (2 * h)  # (2h+1, 1) grows downwards
    return np.abs(xx) <= half_width


def stamp(img: np.ndarray, mask: np.ndarray, x: float, y: float, color: np.ndarray) -> None:
    """Paint ``mask`` centred on world point ``(x, y)`` into ``img`` (H, W, 3), clipped."""
    size = img.shape[0]
    cy, cx = to_px(y, size), to_px(x, size)
    h, w = mask.shape
    y0, x0 = cy - h // 2, cx - w // 2
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + h, size), min(x0 + w, img.shape[1])
    if sy0 >= sy1 or sx0 >= sx1:
        return
    img[sy0:sy1, sx0:sx1][mask[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]] = color


def fill_rect(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
    """Fill the world rectangle [x0, x1) × [y0, y1) of ``img`` (H, W, 3)."""
    size = img.shape[0]
    r0, r1 = round(y0 * size), max(round(y1 * size), round(y0 * size) + 1)
    c0, c1 = round(x0 * size), max(round(x1 * size), round(x0 * size) + 1)
    img[r0:r1, c0:c1] = color
