"""Ray-cast first-person views of a thin-walled grid maze, NumPy only.

A :class:`Scene` is a :class:`~memvla.envs.grid_maze.Maze` (walls 1 m high on the cell
edges) with textures: every wall face has its own 8×8 texture (a muted colour and a
pattern), every cell an 8×8 floor texture (a grey checker; marker cells carry a coloured
square), the ceiling is one colour. The camera is a level pinhole camera (see
:mod:`memvla.envs.camera` for the conventions) at any position and heading.

:class:`Raycaster` renders an RGB image (H, W, 3) uint8 and a depth map (H, W) float32 in
metres along the optical axis. Walls, floor and ceiling are vertical or horizontal planes,
so one ray per column suffices for the walls: the column's ray, parameterised as
``pos + t·(forward + x·right)`` with x the column's slope, reaches depth t. A vectorised
DDA enumerates at once every grid line each column's ray crosses (the steps a DDA takes,
for all columns together) and keeps the first crossing through a wall. Each pixel then sees
the wall unless the floor or ceiling plane is nearer along its ray (depth ``h / y`` for a
row of slope y: the camera height h over the floor, or the ceiling's height above the
camera). :func:`render_reference` is the slow twin: a textbook DDA stepping cell by cell
per column and a loop over pixels, for the tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from memvla.envs import camera
from memvla.envs.grid_maze import Maze

TEX = 8  # texels per side of the wall and floor textures
WALL_HEIGHT = 1.0  # metres
CAMERA_HEIGHT = 0.5  # metres above the floor
CEILING = np.array((40, 40, 50), dtype=np.uint8)
FLOOR_GREYS = ((62, 62, 66), (80, 80, 84))  # the floor checker, by cell parity
# muted wall colours, far from the saturated marker palette (memvla.envs.render.PALETTE)
WALL_COLORS = np.array([(150, 120, 100), (110, 135, 110), (115, 120, 150), (150, 145, 110),
                        (140, 110, 135), (110, 140, 145), (165, 160, 155), (125, 110, 95)],
                       dtype=np.float64)
N_PATTERNS = 6


@dataclass
class Scene:
    """A maze with its textures (see the module doc). ``texels`` stacks every colour the
    renderer can show, so that one gather paints a frame: the wall faces' texels
    (face f, texel row v, column u at ``(f·TEX + v)·TEX + u``), then the floor as one
    (nx·TEX, ny·TEX) image (texel (a, b) at X = a / TEX, Y = b / TEX), then the ceiling."""

    maze: Maze
    wall_tex: np.ndarray  # (F, TEX, TEX, 3) uint8: face f = 2·slot + side, rows top down
    floor_tex: np.ndarray  # (nx, ny, TEX, TEX, 3) uint8: [i, j, a, b] at X = i + a/TEX ...

    def __post_init__(self) -> None:
        nx, ny = self.maze.shape
        floor = self.floor_tex.transpose(0, 2, 1, 3, 4).reshape(-1, 3)  # (nx·TEX·ny·TEX, 3)
        self.floor_offset = self.wall_tex.shape[0] * TEX * TEX
        self.ceiling_index = self.floor_offset + len(floor)
        self.texels = np.concatenate([self.wall_tex.reshape(-1, 3), floor, CEILING[None]])


def wall_slots(shape: tuple[int, int]) -> int:
    """Wall slots of an (nx, ny) grid: (nx + 1)·ny vertical then nx·(ny + 1) horizontal."""
    nx, ny = shape
    return (nx + 1) * ny + nx * (ny + 1)


def _pattern(kind: int, shade: float) -> np.ndarray:
    """Brightness factor (TEX, TEX) of pattern ``kind``: bricks, stripes, band, checker,
    dot, plain; ``shade`` is the factor of the darker texels."""
    v, u = np.mgrid[0:TEX, 0:TEX]
    dark = {
        0: (v % 4 == 0) | ((u + 4 * ((v // 4) % 2)) % TEX == 0),  # bricks and mortar
        1: (u // 2) % 2 == 1,  # vertical stripes
        2: (v >= 3) & (v <= 4),  # a horizontal band
        3: ((u // 4) + (v // 4)) % 2 == 1,  # checker
        4: (abs(u - 3.5) + abs(v - 3.5)) < 2.5,  # a diamond
        5: np.zeros((TEX, TEX), dtype=bool),  # plain
    }[kind]
    return np.where(dark, shade, 1.0)


@functools.lru_cache(maxsize=16)
def position_textures(shape: tuple[int, int]) -> np.ndarray:
    """Wall-face textures (F, TEX, TEX, 3) uint8 of an (nx, ny) grid, a fixed function of
    the face's position (the same in every episode): colour, pattern and shade drawn from
    a generator seeded with the grid size. Treat as read-only (cached)."""
    rng = np.random.default_rng([7, *shape])
    faces = 2 * wall_slots(shape)
    colors = WALL_COLORS[rng.integers(len(WALL_COLORS), size=faces)]  # (F, 3)
    kinds = rng.integers(N_PATTERNS, size=faces)  # (F,)
    shades = rng.uniform(0.55, 0.8, size=faces)  # (F,)
    factor = np.stack([_pattern(int(k), float(s)) for k, s in zip(kinds, shades, strict=True)])
    tex = colors[:, None, None, :] * factor[..., None]  # (F, TEX, TEX, 3)
    return np.clip(tex, 0, 255).astype(np.uint8)


def floor_textures(shape: tuple[int, int], markers: dict[tuple[int, int], np.ndarray]
                   ) -> np.ndarray:
    """Floor textures (nx, ny, TEX, TEX, 3) uint8: a grey checker of the cells, and a
    square of the marker's colour (texels 1..TEX-2 of each side) in every marker cell."""
    nx, ny = shape
    parity = (np.arange(nx)[:, None] + np.arange(ny)[None, :]) % 2  # (nx, ny)
    greys = np.array(FLOOR_GREYS, dtype=np.uint8)[parity]  # (nx, ny, 3)
    tex = np.broadcast_to(greys[:, :, None, None, :], (nx, ny, TEX, TEX, 3)).copy()
    for (i, j), rgb in markers.items():
        tex[i, j, 1:TEX - 1, 1:TEX - 1] = rgb
    return tex


def make_scene(maze: Maze, markers: dict[tuple[int, int], np.ndarray] | None = None) -> Scene:
    """The scene of ``maze`` with position textures and coloured floor ``markers``
    ({cell: RGB})."""
    return Scene(maze, position_textures(maze.shape), floor_textures(maze.shape, markers or {}))


def check_level_pose(pose, key: str = "pose") -> np.ndarray:
    """A rigid pose (see :func:`memvla.envs.camera.check_pose`) whose camera is level (its
    down axis is world -Z), as the ray caster needs."""
    p = camera.check_pose(pose, key)
    if not np.allclose(p[:3, 1], (0.0, 0.0, -1.0), atol=1e-4):
        raise ValueError(f"{key}: expected a level camera (down axis (0, 0, -1) in world "
                         f"coordinates), got down axis {p[:3, 1].tolist()}")
    return p


class Raycaster:
    """Vectorised renderer for one camera: intrinsics ``k`` (3, 3) and an image of
    ``width × height`` pixels. ``render(scene, pose)`` -> (image (H, W, 3) uint8, depth
    (H, W) float32); ``render_at(scene, x, y, yaw)`` skips the pose checks."""

    def __init__(self, k: np.ndarray, width: int, height: int,
                 camera_height: float = CAMERA_HEIGHT, wall_height: float = WALL_HEIGHT):
        self.k = camera.check_intrinsics(k)
        self.width, self.height = int(width), int(height)
        self.camera_height, self.wall_height = float(camera_height), float(wall_height)
        self.xs, self.ys = camera.pixel_rays(self.k, self.width, self.height)  # (W,), (H,)
        self.plane_depth = _plane_depths(self.ys, self.camera_height, self.wall_height)  # (H,)
        self._plane_depth32 = self.plane_depth.astype(np.float32)
        # the rows that can see the floor (y > 0) and the ceiling (y < 0): a bottom and a
        # top band of rows, since the slopes grow down the image
        self._floor_start = int(np.searchsorted(self.ys, 0.0, side="right"))
        self._ceiling_end = int(np.searchsorted(self.ys, 0.0, side="left"))
        self._floor_depth = self.plane_depth[self._floor_start:]  # (Hf,)
        self._ceiling_depth = self.plane_depth[: self._ceiling_end]  # (Hc,)
        # wall texel row = v0 + v1·t (before clipping): the depth of the hit below the top
        self._v0 = (self.wall_height - self.camera_height) * TEX / self.wall_height
        self._v1 = (self.ys * TEX / self.wall_height)  # (H,)

    def render(self, scene: Scene, pose) -> tuple[np.ndarray, np.ndarray]:
        p = check_level_pose(pose)
        if not np.isclose(p[2, 3], self.camera_height):
            raise ValueError(f"pose: expected the camera {self.camera_height} m above the "
                             f"floor, got z = {p[2, 3]:.4g}")
        return self.render_at(scene, p[0, 3], p[1, 3], camera.yaw_of(p))

    def render_at(self, scene: Scene, x: float, y: float, yaw: float
                  ) -> tuple[np.ndarray, np.ndarray]:
        _check_inside(scene.maze, x, y)
        c, s = np.cos(yaw), np.sin(yaw)
        dx = c + self.xs * s  # (W,) ray direction per column: forward + x·right
        dy = s - self.xs * c  # (W,)
        t, face, u = _cast_columns(scene.maze, x, y, dx, dy)  # (W,) each
        depth = np.minimum(self._plane_depth32[:, None], t.astype(np.float32)[None, :])  # (H, W)
        # wall texels: the column's face and u, the row's height on the wall
        tu = np.minimum((u * TEX).astype(np.int64), TEX - 1)  # (W,)
        v = np.multiply.outer(self._v1, t)  # (H, W) texel row = v0 + v1·t, clipped
        v += self._v0
        np.maximum(v, 0.0, out=v)
        np.minimum(v, TEX - 1, out=v)
        index = v.astype(np.int64)  # (H, W) into scene.texels
        index *= TEX
        index += face * TEX * TEX + tu
        # the floor's texels where the floor is nearer than the wall, then the ceiling's
        nx, ny = scene.maze.shape
        d = self._floor_depth  # (Hf,)
        a = np.multiply.outer(d * TEX, dx)  # (Hf, W) texel X of the floor point
        a += x * TEX
        a = np.minimum(a.astype(np.int64), nx * TEX - 1)
        b = np.multiply.outer(d * TEX, dy)  # (Hf, W) texel Y
        b += y * TEX
        b = np.minimum(b.astype(np.int64), ny * TEX - 1)
        a *= ny * TEX
        a += b
        a += scene.floor_offset
        np.copyto(index[self._floor_start:], a, where=d[:, None] < t[None, :])
        np.copyto(index[: self._ceiling_end], scene.ceiling_index,
                  where=self._ceiling_depth[:, None] < t[None, :])
        return np.take(scene.texels, index, axis=0), depth  # (H, W, 3), (H, W)


def _plane_depths(ys: np.ndarray, camera_height: float, wall_height: float) -> np.ndarray:
    """Depth (H,) at which each row's ray meets the floor (y > 0) or the ceiling (y < 0)."""
    with np.errstate(divide="ignore"):
        return np.where(ys > 0, camera_height / ys,
                        np.where(ys < 0, (wall_height - camera_height) / -ys, np.inf))


def _check_inside(maze: Maze, x: float, y: float) -> None:
    nx, ny = maze.shape
    if not (0 < x < nx and 0 < y < ny):
        raise ValueError(f"pose: expected the camera inside the {nx}x{ny} maze "
                         f"(0 < x < {nx}, 0 < y < {ny}), got ({x:.4g}, {y:.4g})")


def _face_and_u(maze: Maze, vertical: np.ndarray, line: np.ndarray, cell: np.ndarray,
                positive: np.ndarray, along: np.ndarray):
    """Face index and texture coordinate u in [0, 1) (left to right as the viewer sees the
    face) of wall hits: ``vertical`` walls (X = line) or horizontal ones (Y = line) at the
    cell index ``cell`` along the wall, hit by a ray going the ``positive`` way across it;
    ``along`` is the hit's coordinate along the wall (Y for vertical walls, X otherwise)."""
    nx, ny = maze.shape
    slot = np.where(vertical, line * ny + cell, (nx + 1) * ny + cell * (ny + 1) + line)
    frac = along - np.floor(along)
    # the viewer's right: -Y when looking east, +Y west, +X north, -X south
    flip = np.where(vertical, positive, ~positive)
    u = np.where(flip, 1.0 - frac, frac)
    return 2 * slot + positive.astype(np.int64), np.clip(u, 0.0, np.nextafter(1.0, 0.0))


def _cast_columns(maze: Maze, x: float, y: float, dx: np.ndarray, dy: np.ndarray):
    """First wall hit of the rays ``(x, y) + t·(dx, dy)`` (W,): t (W,), face (W,) int and u
    (W,). Every grid line a ray crosses is enumerated (the m-th crossing of the X lines and
    of the Y lines, as a DDA visits them) and the nearest crossing through a wall wins.
    Crossings past the boundary need no mask: the boundary is walled and nearer."""
    nx, ny = maze.shape
    hits = []
    rows = np.arange(len(dx))
    for pos, d, other_pos, other_d, n_lines, n_cells, walls in (
        (x, dx, y, dy, nx, ny, maze.vwall),
        (y, dy, x, dx, ny, nx, maze.hwall.T),
    ):
        d = np.where(d == 0, 1e-30, d)  # (W,) parallel rays meet the lines far away
        positive = d > 0  # (W,)
        base = np.floor(pos)
        m = np.arange(max(n_lines - base, base + 1), dtype=np.float64)  # (M,) crossings
        sign = np.where(positive, 1.0, -1.0)  # (W,)
        line = np.where(positive, base + 1, base)[:, None] + sign[:, None] * m  # (W, M)
        t = (line - pos) / d[:, None]  # (W, M)
        along = other_pos + t * other_d[:, None]  # (W, M)
        cell = along.clip(0, n_cells - 1).astype(np.int64)  # (W, M) floor (along >= 0)
        li = line.clip(0, n_lines).astype(np.int64)  # (W, M)
        t = np.where(walls[li, cell], t, np.inf)  # (W, M)
        j = np.argmin(t, axis=1)  # (W,) the first crossing through a wall
        hits.append((t[rows, j], li[rows, j], cell[rows, j], positive, along[rows, j]))
    (tx, lx, cx, px, ax), (ty, ly, cy, py, ay) = hits
    vertical = tx <= ty  # (W,)
    t = np.where(vertical, tx, ty)
    face, u = _face_and_u(maze, vertical, np.where(vertical, lx, ly), np.where(vertical, cx, cy),
                          np.where(vertical, px, py), np.where(vertical, ax, ay))
    return t, face, u


def _floor_texels(scene: Scene, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """Floor colours (n, 3) at world points (fx, fy) (n,) each."""
    nx, ny = scene.maze.shape
    i = np.clip(np.floor(fx), 0, nx - 1).astype(np.int64)
    j = np.clip(np.floor(fy), 0, ny - 1).astype(np.int64)
    a = np.clip(((fx - i) * TEX).astype(np.int64), 0, TEX - 1)
    b = np.clip(((fy - j) * TEX).astype(np.int64), 0, TEX - 1)
    return scene.floor_tex[i, j, a, b]


# -- the slow reference -------------------------------------------------------------------------
def cast_ray(maze: Maze, x: float, y: float, dx: float, dy: float
             ) -> tuple[float, bool, int, int, bool]:
    """Textbook DDA for one ray ``(x, y) + t·(dx, dy)``: step cell by cell until the edge
    crossed holds a wall. Returns (t, vertical, line, cell along the wall, positive)."""
    i, j = int(np.floor(x)), int(np.floor(y))
    sx, sy = (1 if dx > 0 else -1), (1 if dy > 0 else -1)
    tdx = abs(1.0 / dx) if dx != 0 else np.inf
    tdy = abs(1.0 / dy) if dy != 0 else np.inf
    tx = ((i + 1 - x) if dx > 0 else (x - i)) * tdx if dx != 0 else np.inf
    ty = ((j + 1 - y) if dy > 0 else (y - j)) * tdy if dy != 0 else np.inf
    nx, ny = maze.shape
    for _ in range(2 * (nx + ny) + 4):
        if tx <= ty:
            line = i + 1 if sx > 0 else i
            if maze.vwall[line, j]:
                return tx, True, line, j, sx > 0
            i, tx = i + sx, tx + tdx
        else:
            line = j + 1 if sy > 0 else j
            if maze.hwall[i, line]:
                return ty, False, line, i, sy > 0
            j, ty = j + sy, ty + tdy
    raise RuntimeError("the ray left the maze (is its boundary walled?)")


def render_reference(scene: Scene, pose, k, width: int, height: int,
                     camera_height: float = CAMERA_HEIGHT, wall_height: float = WALL_HEIGHT
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The same image and depth as :meth:`Raycaster.render`, one column and one pixel at a
    time (slow; for tests)."""
    p = check_level_pose(pose)
    k = camera.check_intrinsics(k)
    x, y, yaw = p[0, 3], p[1, 3], camera.yaw_of(p)
    c, s = np.cos(yaw), np.sin(yaw)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    depth = np.zeros((height, width), dtype=np.float32)
    for col in range(width):
        slope = (col - k[0, 2]) / k[0, 0]
        dx, dy = c + slope * s, s - slope * c
        t, vertical, line, cell, positive = cast_ray(scene.maze, x, y, dx, dy)
        along = y + t * dy if vertical else x + t * dx
        face, u = _face_and_u(scene.maze, np.array(vertical), np.array(line), np.array(cell),
                              np.array(positive), np.array(along))
        tu = min(int(u * TEX), TEX - 1)
        for row in range(height):
            ry = (row - k[1, 2]) / k[1, 1]
            if ry > 0 and camera_height / ry < t:  # the floor is nearer than the wall
                d = camera_height / ry
                image[row, col] = _floor_texels(scene, np.array([x + d * dx]),
                                                np.array([y + d * dy]))[0]
            elif ry < 0 and (wall_height - camera_height) / -ry < t:  # the ceiling is
                d = (wall_height - camera_height) / -ry
                image[row, col] = CEILING
            else:
                d = t
                z = camera_height - ry * t
                tv = min(max(int((wall_height - z) / wall_height * TEX), 0), TEX - 1)
                image[row, col] = scene.wall_tex[int(face), tv, tu]
            depth[row, col] = d
    return image, depth
