"""Grid mazes with thin walls: layout, random generation, grid moves and shortest paths.

A maze of ``nx × ny`` square cells of 1 m. Cell ``(i, j)`` covers world ``[i, i+1) ×
[j, j+1)`` (X east, Y north, see :mod:`memvla.envs.camera`). Walls have no thickness and
lie on the cell edges:

* ``vwall`` bool (nx + 1, ny): ``vwall[i, j]`` is the wall on the line X = i between cells
  (i - 1, j) and (i, j) (for Y in [j, j + 1));
* ``hwall`` bool (nx, ny + 1): ``hwall[i, j]`` is the wall on the line Y = j between cells
  (i, j - 1) and (i, j).

The outer boundary is always walled. An agent stands at a cell centre facing one of four
headings ``k`` (0 east, 1 north, 2 west, 3 south: yaw k·90°); turning left is k + 1.
Distances for the scripted expert count actions (forward, turn left, turn right) by
breadth-first search over (cell, heading) states.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

HEADINGS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # (di, dj) of headings 0..3
FORWARD, LEFT, RIGHT, STOP = 0, 1, 2, 3  # the discrete actions
ACTION_NAMES = ("forward", "turn left", "turn right", "stop")
UNREACHABLE = 10**9


@dataclass
class Maze:
    """Walls of an ``nx × ny`` grid (see the module doc for the layout)."""

    vwall: np.ndarray  # (nx + 1, ny) bool
    hwall: np.ndarray  # (nx, ny + 1) bool

    def __post_init__(self) -> None:
        nx, ny = self.hwall.shape[0], self.vwall.shape[1]
        if self.vwall.shape != (nx + 1, ny) or self.hwall.shape != (nx, ny + 1):
            raise ValueError(f"wall arrays must be (nx + 1, ny) and (nx, ny + 1), got "
                             f"{self.vwall.shape} and {self.hwall.shape}")
        self.vwall[0, :] = self.vwall[nx, :] = True
        self.hwall[:, 0] = self.hwall[:, ny] = True

    @property
    def shape(self) -> tuple[int, int]:
        return self.hwall.shape[0], self.vwall.shape[1]

    def cells(self) -> list[tuple[int, int]]:
        nx, ny = self.shape
        return [(i, j) for i in range(nx) for j in range(ny)]

    def blocked(self, cell: tuple[int, int], heading: int) -> bool:
        """True if a wall closes the side of ``cell`` that ``heading`` faces."""
        i, j = cell
        if heading == 0:
            return bool(self.vwall[i + 1, j])
        if heading == 1:
            return bool(self.hwall[i, j + 1])
        if heading == 2:
            return bool(self.vwall[i, j])
        return bool(self.hwall[i, j])

    def neighbours(self, cell: tuple[int, int]) -> list[tuple[int, int]]:
        """The cells reachable from ``cell`` in one move, in heading order."""
        return [(cell[0] + di, cell[1] + dj) for k, (di, dj) in enumerate(HEADINGS)
                if not self.blocked(cell, k)]


def open_room(nx: int, ny: int) -> Maze:
    """An empty ``nx × ny`` room: walls on the boundary only."""
    return Maze(np.zeros((nx + 1, ny), dtype=bool), np.zeros((nx, ny + 1), dtype=bool))


def random_maze(rng: np.random.Generator, n: int, openings: int = 0) -> Maze:
    """A random ``n × n`` maze: a spanning tree grown by randomised depth-first search
    (every cell reachable, one path between any two), then ``openings`` more interior walls
    removed at random, which adds loops (fewer if the maze has fewer walls left)."""
    maze = Maze(np.ones((n + 1, n), dtype=bool), np.ones((n, n + 1), dtype=bool))
    start = (int(rng.integers(n)), int(rng.integers(n)))
    seen, stack = {start}, [start]
    while stack:
        i, j = stack[-1]
        options = [k for k, (di, dj) in enumerate(HEADINGS)
                   if 0 <= i + di < n and 0 <= j + dj < n and (i + di, j + dj) not in seen]
        if not options:
            stack.pop()
            continue
        k = options[int(rng.integers(len(options)))]
        _set_wall(maze, (i, j), k, False)
        nxt = (i + HEADINGS[k][0], j + HEADINGS[k][1])
        seen.add(nxt)
        stack.append(nxt)
    # each interior wall once: the east and north sides of every cell
    interior = [(c, k) for c in maze.cells() for k in (0, 1)
                if _inside(maze, c, k) and maze.blocked(c, k)]
    for idx in rng.permutation(len(interior))[:openings]:
        _set_wall(maze, *interior[int(idx)], False)
    return maze


def _inside(maze: Maze, cell: tuple[int, int], heading: int) -> bool:
    nx, ny = maze.shape
    di, dj = HEADINGS[heading]
    return 0 <= cell[0] + di < nx and 0 <= cell[1] + dj < ny


def _set_wall(maze: Maze, cell: tuple[int, int], heading: int, value: bool) -> None:
    i, j = cell
    if heading == 0:
        maze.vwall[i + 1, j] = value
    elif heading == 1:
        maze.hwall[i, j + 1] = value
    elif heading == 2:
        maze.vwall[i, j] = value
    else:
        maze.hwall[i, j] = value


def step(maze: Maze, cell: tuple[int, int], heading: int, action: int
         ) -> tuple[tuple[int, int], int]:
    """The (cell, heading) after ``action``: forward moves one cell unless a wall is in the
    way (then nothing moves), the turns rotate by 90°, stop changes nothing."""
    if action == FORWARD and not maze.blocked(cell, heading):
        di, dj = HEADINGS[heading]
        return (cell[0] + di, cell[1] + dj), heading
    if action == LEFT:
        return cell, (heading + 1) % 4
    if action == RIGHT:
        return cell, (heading + 3) % 4
    return cell, heading


def cell_distances(maze: Maze, goal: tuple[int, int]) -> np.ndarray:
    """Moves (ignoring turns) from every cell to ``goal``: int (nx, ny), breadth-first."""
    dist = np.full(maze.shape, UNREACHABLE, dtype=np.int64)  # (nx, ny)
    dist[goal] = 0
    queue = deque([goal])
    while queue:
        c = queue.popleft()
        for nb in maze.neighbours(c):
            if dist[nb] == UNREACHABLE:
                dist[nb] = dist[c] + 1
                queue.append(nb)
    return dist


def blocked_sides(maze: Maze) -> np.ndarray:
    """Which sides of every cell are walled: bool (nx, ny, 4), indexed by heading."""
    return np.stack([maze.vwall[1:, :], maze.hwall[:, 1:], maze.vwall[:-1, :],
                     maze.hwall[:, :-1]], axis=-1)  # (nx, ny, 4)


def action_distances(maze: Maze, goal: tuple[int, int]) -> np.ndarray:
    """Fewest actions (forward / left / right) from every (cell, heading) to any heading at
    ``goal``: int (nx, ny, 4), breadth-first over the reversed moves."""
    nx, ny = maze.shape
    blocked = blocked_sides(maze).reshape(-1).tolist()  # state s = (i·ny + j)·4 + k
    dist = [UNREACHABLE] * (nx * ny * 4)
    g = (goal[0] * ny + goal[1]) * 4
    queue = deque(range(g, g + 4))
    for s in queue:
        dist[s] = 0
    step_back = [-4 * ny, -4, 4 * ny, 4]  # state offset of the cell behind, per heading
    while queue:
        s = queue.popleft()
        d = dist[s] + 1
        k = s % 4
        before = [s - k + (k - 1) % 4, s - k + (k + 1) % 4]  # a turn left / right led here
        if not blocked[s - k + (k + 2) % 4]:  # a move forward from the cell behind
            before.append(s + step_back[k])
        for b in before:
            if dist[b] == UNREACHABLE:
                dist[b] = d
                queue.append(b)
    return np.array(dist, dtype=np.int64).reshape(nx, ny, 4)


def next_action(maze: Maze, dist: np.ndarray, cell: tuple[int, int], heading: int) -> int:
    """The action that decreases ``dist`` (from :func:`action_distances`) the most from this
    state, preferring forward, then left, then right; STOP at the goal (distance 0)."""
    if dist[cell[0], cell[1], heading] == 0:
        return STOP
    best, best_d = STOP, dist[cell[0], cell[1], heading]
    for a in (FORWARD, LEFT, RIGHT):
        (i, j), k = step(maze, cell, heading, a)
        if dist[i, j, k] < best_d:
            best, best_d = a, dist[i, j, k]
    return best


def shortest_cell_path(maze: Maze, start: tuple[int, int], end: tuple[int, int]
                       ) -> list[tuple[int, int]]:
    """The cells of a shortest path from ``start`` to ``end`` (both included): at every
    cell the first neighbour, in heading order, that is one move closer to ``end``."""
    dist = cell_distances(maze, end)
    if dist[start] == UNREACHABLE:
        raise ValueError(f"{end} cannot be reached from {start}")
    path = [start]
    while path[-1] != end:
        here = path[-1]
        path.append(next(nb for nb in maze.neighbours(here) if dist[nb] == dist[here] - 1))
    return path
