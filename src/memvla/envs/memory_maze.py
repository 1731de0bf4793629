"""``memory-maze``: a guided tour through a grid maze past coloured floor markers, then
back to the marker the instruction names, from memory.

Scene: a ``maze_size × maze_size`` maze of 1 m cells with thin walls 1 m high (a random
spanning tree plus ``openings`` extra gaps, so there are a few loops), seen by an
ego-centric pinhole camera 0.5 m above the floor with a horizontal field of view of
``fov`` degrees, ray cast by :mod:`memvla.envs.raycast`. Every wall face has its own
texture (a muted colour and a pattern, fixed by the face's position), the floor is a
grey checker, ``n_markers`` cells carry a square floor marker in a saturated palette
colour (red, green, blue, yellow: no wall has those colours).

Episode:

* ``tour``: the route is the shortest path from a random start cell (random heading) to an
  end cell, and the markers lie on it (the start and end cells excluded). A head-up
  display at the top centre of the image (a light arrow on a black box) shows the next
  action of the route: forward, turn left or turn right. Following it (what the expert
  does) walks the route; a policy that strays is routed back: the arrow always leads
  to the next marker not yet stepped on, in route order, then to the end cell. Stop
  does nothing during the tour.
* ``return``: once the end cell is reached after every marker, the display goes dark (no
  box). Go back to the marker the instruction names and send stop on it. The end cell is
  drawn so that no straight line of sight joins it to the target marker (when the maze
  allows one within 50 draws; 99.8% of the default episodes), so the target is not in
  view at the start of the return. Stop on the target cell succeeds; stop on any other
  cell fails; the return phase lasts at most the fewest actions to the target, plus one
  for the stop, plus ``return_slack`` (default 8), after which the episode fails.
  ``max_episode_steps`` (default max(80, 3·maze_size²)) caps the whole episode; layouts
  are drawn so that the expert's episode plus ``return_slack`` fits in it (the default
  episodes take 24 steps on average, at most about 55).

The instruction names the target's colour ("go back to the red marker you passed and
stop there", a few phrasings); ``reset(options={"cue": i})`` forces the i-th marker along
the route as the target. Memoryless twin: during the return the display keeps showing the
next action towards the target, drawn in the target's colour, and a square of that
colour when the agent stands on it: a reactive policy can follow it.

Actions (Da = 4): the discrete actions forward (one cell, unless a wall is in the way),
turn left (90°), turn right (90°) and stop, as one-hot vectors. ``step`` takes an int in
[0, 4) or any finite vector of shape (4,), decoded to the nearest one-hot (its argmax,
:func:`decode_action`); datasets store the one-hot. ``action_space`` is Box(0, 1, (4,)).

Observation: ``observation.images.top`` uint8 (S, S, 3), S = ``image_size`` (64);
``observation.depth`` float32 (S, S): metres along the optical axis (the display is an
overlay: depth shows the scene under it); ``observation.pose`` float32 (4, 4):
world-from-camera, ``observation.intrinsics`` float32 (3, 3) (constant; conventions in
:mod:`memvla.envs.camera`: OpenCV camera axes, world X east, Y north, Z up, cell (i, j)
covering [i, i+1) × [j, j+1)); ``observation.state`` float32 (4,) = (x, y, cos yaw,
sin yaw): the odometry the pose also gives; ``task``: the instruction.

The expert (:class:`MemoryMazeExpert`) knows the maze: it follows the display during the
tour and takes a shortest path (breadth-first over cells and headings) to the target in the
return, then stops. Chance level: 1 / maze_size² (stopping on a random cell).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from memvla.envs import camera, raycast, render
from memvla.envs import grid_maze as gm
from memvla.envs.base import CENTER, TEXT_CHARSET, TaskEnv, check_int
from memvla.envs.experts import Expert

ACTION_DIM = 4  # Da: one-hot (forward, turn left, turn right, stop)
STATE_DIM = 4  # Ds: (x, y, cos yaw, sin yaw)
MARKER_COLORS = render.COLORS[:4]  # (4, 3): red, green, blue, yellow
MARKER_NAMES = render.COLOR_NAMES[:4]
HUD_BOX = np.array((0, 0, 0), dtype=np.uint8)
HUD_ARROW = np.array((235, 235, 235), dtype=np.uint8)
INSTRUCTIONS = (
    "go back to the {} marker you passed and stop there",
    "follow the arrows, then return to the {} marker and stop on it",
    "remember where the {} marker was, then go back there and stop",
    "after the tour, walk back to the {} square and stop",
)
LAYOUT_DRAWS = 50  # end cells / marker placements tried for a hidden target


def decode_action(action: Any) -> int:
    """An action as one of the discrete actions 0..3 (forward, turn left, turn right, stop):
    an int in [0, 4) as it is, a finite vector of shape (4,) as its nearest one-hot (the
    argmax; ties go to the first). Anything else raises a ValueError naming the action, the
    expected and the received value."""
    if isinstance(action, bool | np.bool_):
        raise ValueError(f"action: expected an int in [0, {ACTION_DIM}) or a vector of shape "
                         f"({ACTION_DIM},), got {action!r}")
    if isinstance(action, int | np.integer):
        if not 0 <= action < ACTION_DIM:
            raise ValueError(f"action: expected an int in [0, {ACTION_DIM}) (forward, turn left, "
                             f"turn right, stop), got {action}")
        return int(action)
    try:
        a = np.asarray(action, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"action: expected an int in [0, {ACTION_DIM}) or a vector of shape "
                         f"({ACTION_DIM},), got {action!r}") from e
    if a.shape != (ACTION_DIM,):
        raise ValueError(f"action: expected shape ({ACTION_DIM},) = one-hot (forward, turn left, "
                         f"turn right, stop) or an int, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"action: expected finite values, got {a.tolist()}")
    return int(np.argmax(a))


def one_hot(action: int) -> np.ndarray:
    """The one-hot vector (Da,) float32 of a discrete action."""
    a = np.zeros(ACTION_DIM, dtype=np.float32)  # (Da,)
    a[action] = 1.0
    return a


def check_float(name: str, value: Any, lo: float, hi: float) -> float:
    """``value`` as a float in [lo, hi], else a ValueError naming the option and the range."""
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not ok or not lo <= value <= hi:
        raise ValueError(f"option {name!r} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _glyphs(g: int) -> dict[int, np.ndarray]:
    """Display glyphs (2g+1, 2g+1) bool: arrows for forward / left / right, a square for stop."""
    r, c = np.mgrid[0 : 2 * g + 1, 0 : 2 * g + 1]
    up = np.abs(c - g) <= r / 2
    left = np.abs(r - g) <= c / 2
    square = np.zeros_like(up)
    square[1:-1, 1:-1] = True
    return {gm.FORWARD: up, gm.LEFT: left, gm.RIGHT: left[:, ::-1], gm.STOP: square}


class MemoryMazeEnv(TaskEnv):
    """The ``memory-maze`` task (see the module doc)."""

    option_keys = ("cue",)

    def __init__(self, *, maze_size: int = 5, n_markers: int = 2, openings: int = 2,
                 fov: float = 90.0, return_slack: int = 8, **kwargs):
        self.maze_size = check_int("maze_size", maze_size, 3, 9)
        self.n_markers = check_int("n_markers", n_markers, 1, len(MARKER_COLORS),
                                   f"the marker palette has {len(MARKER_COLORS)} colours")
        self.openings = check_int("openings", openings, 0, 2 * self.maze_size ** 2)
        self.fov = check_float("fov", fov, 30.0, 150.0)
        self.return_slack = check_int("return_slack", return_slack, 0, 10_000)
        super().__init__(**kwargs)
        s, n = self.image_size, self.maze_size
        self.k = camera.intrinsics(s, s, self.fov)  # (3, 3)
        self._k32 = self.k.astype(np.float32)
        self.caster = raycast.Raycaster(self.k, s, s)
        self.observation_space = spaces.Dict({
            "observation.images.top": spaces.Box(0, 255, (s, s, 3), np.uint8),
            # depth <= the distance to the farthest wall <= the maze's diagonal
            "observation.depth": spaces.Box(0.0, 2.0 * n, (s, s), np.float32),
            "observation.pose": spaces.Box(-1.0, float(n), (4, 4), np.float32),
            "observation.intrinsics": spaces.Box(0.0, 2.0 * s, (3, 3), np.float32),  # fx < 2S
            "observation.state": spaces.Box(np.array([0, 0, -1, -1], np.float32),
                                            np.array([n, n, 1, 1], np.float32), (STATE_DIM,),
                                            np.float32),
            "task": spaces.Text(max_length=128, min_length=1, charset=TEXT_CHARSET),
        })
        self.action_space = spaces.Box(0.0, 1.0, (ACTION_DIM,), np.float32)
        self._glyph = _glyphs(max(2, s // 21))
        self.maze = gm.open_room(n, n)
        self.cell, self.heading = (0, 0), 0
        self.markers: list[tuple[int, int]] = []
        self.marker_colors = np.zeros(0, dtype=np.int64)  # (n_markers,) MARKER_COLORS indices
        self.target = 0
        self.end = (0, 0)
        self.route: list[tuple[int, int]] = []
        self.next_waypoint = 0
        self.return_start = -1  # step at which the return phase began (-1: the tour)
        self.return_budget = 0
        self._waypoint_dist: list[np.ndarray] = []
        self._views: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._scene: raycast.Scene | None = None

    # ----------------------------------------------------------------- task hooks
    def default_max_steps(self) -> int:
        return max(80, 3 * self.maze_size**2)

    @property
    def chance_level(self) -> float:
        return 1.0 / self.maze_size**2

    @property
    def phase(self) -> str:
        return "tour" if self.return_start < 0 else "return"

    @property
    def target_cell(self) -> tuple[int, int]:
        return self.markers[self.target]

    @property
    def waypoints(self) -> list[tuple[int, int]]:
        """The cells the tour leads to, in order: the markers along the route, then the end."""
        return [*self.markers, self.end]

    def _start_position(self, rng: np.random.Generator) -> np.ndarray:
        return CENTER.copy()  # unused: the maze pose is self.cell / self.heading

    def _reset_task(self, rng: np.random.Generator, options: dict) -> None:
        self.marker_colors = rng.choice(len(MARKER_COLORS), self.n_markers, replace=False)
        self.target = int(rng.integers(self.n_markers))
        if "cue" in options:
            self.target = check_int("cue", options["cue"], 0, self.n_markers - 1)
        self.heading = int(rng.integers(4))
        start = self._draw_layout(rng)
        self.cell = start
        self.next_waypoint = 0
        self.return_start, self.return_budget = -1, 0
        colors = {c: MARKER_COLORS[i] for c, i in zip(self.markers, self.marker_colors,
                                                       strict=True)}
        self._scene = raycast.make_scene(self.maze, colors)
        self._views = {}

    def _draw_layout(self, rng: np.random.Generator) -> tuple[int, int]:
        """Draw the maze, the start, the end and the markers on the route between them (the
        end at least ``n_markers + 2`` moves away where the maze allows). Of up to
        ``LAYOUT_DRAWS`` draws of the end and the markers, the first that keeps the target
        out of sight of the end and leaves the expert ``return_slack`` steps to spare within
        ``max_episode_steps`` is taken, else the last that leaves the spare steps, else the
        last. Returns the start."""
        for _ in range(100):
            self.maze = gm.random_maze(rng, self.maze_size, self.openings)
            cells = self.maze.cells()
            start = cells[int(rng.integers(len(cells)))]
            dist = gm.cell_distances(self.maze, start)  # (n, n)
            far = min(self.n_markers + 2, int(dist.max()))
            if far >= self.n_markers + 1:  # room for the markers between start and end
                break
        else:
            raise ValueError(f"no route with room for n_markers={self.n_markers} markers in "
                             f"100 mazes of size {self.maze_size} with openings="
                             f"{self.openings}; use fewer markers or openings")
        ends = [c for c in cells if dist[c] >= far]
        best, best_score = None, -1
        for _ in range(LAYOUT_DRAWS):
            self.end = ends[int(rng.integers(len(ends)))]
            self.route = gm.shortest_cell_path(self.maze, start, self.end)
            inner = self.route[1:-1]
            picks = np.sort(rng.choice(len(inner), self.n_markers, replace=False))
            self.markers = [inner[int(i)] for i in picks]
            hidden = not line_of_sight(self.maze, self.end, self.target_cell)
            if 2 + hidden <= best_score:  # cannot beat the best draw so far
                continue
            self._waypoint_dist = [gm.action_distances(self.maze, c) for c in self.waypoints]
            fits = self._expert_steps(start) + self.return_slack <= self.max_episode_steps
            score = 2 * fits + hidden  # fits and hidden > fits > hidden > neither
            if score > best_score:
                best_score = score
                best = (self.end, self.route, self.markers, self._waypoint_dist)
            if score == 3:
                break
        self.end, self.route, self.markers, self._waypoint_dist = best
        return start

    def _expert_steps(self, start: tuple[int, int]) -> int:
        """Actions of the expert's whole episode from ``start``: the tour, the return, stop."""
        cell, heading, steps = start, self.heading, 0
        for dist in [*self._waypoint_dist, self._waypoint_dist[self.target]]:
            d = int(dist[cell[0], cell[1], heading])
            steps += d
            for _ in range(d):  # each of the expert's actions is one step closer
                cell, heading = gm.step(self.maze, cell, heading,
                                        gm.next_action(self.maze, dist, cell, heading))
        return steps + 1

    def _instruction(self, rng: np.random.Generator) -> str:
        name = MARKER_NAMES[self.marker_colors[self.target]]
        return INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))].format(name)

    def make_expert(self) -> Expert:
        return MemoryMazeExpert(self)

    # ------------------------------------------------------------------ gym API
    def step(self, action):
        a = decode_action(action)
        if self.phase == "return" and a == gm.STOP:
            self.success = self.cell == self.target_cell
            self.failed = not self.success
        else:
            self.cell, self.heading = gm.step(self.maze, self.cell, self.heading, a)
        self.t += 1
        if self.phase == "tour":
            self._advance_tour()
        elif not self.success and self.t - self.return_start >= self.return_budget:
            self.failed = True  # out of time for the return
        terminated = self.success or self.failed
        truncated = not terminated and self.t >= self.max_episode_steps
        return self._obs(), float(self.success), terminated, truncated, self._info()

    def _advance_tour(self) -> None:
        wps = self.waypoints
        while self.next_waypoint < len(wps) and self.cell == wps[self.next_waypoint]:
            self.next_waypoint += 1
        if self.next_waypoint == len(wps):
            self.return_start = self.t
            dist = self._waypoint_dist[self.target]
            self.return_budget = int(dist[self.cell[0], self.cell[1], self.heading]) + 1 + \
                self.return_slack

    # ------------------------------------------------------------------ expert / display
    def guidance(self) -> int:
        """The next action of the route (tour) or towards the target (return; STOP on it)."""
        if self.phase == "tour":
            dist = self._waypoint_dist[self.next_waypoint]
        else:
            dist = self._waypoint_dist[self.target]
        return gm.next_action(self.maze, dist, self.cell, self.heading)

    def yaw(self) -> float:
        return self.heading * np.pi / 2

    def pose(self) -> np.ndarray:
        """World-from-camera (4, 4) float64 of the current cell and heading."""
        return camera.pose_from_yaw(self.cell[0] + 0.5, self.cell[1] + 0.5,
                                    raycast.CAMERA_HEIGHT, self.yaw())

    def _view(self) -> tuple[np.ndarray, np.ndarray]:
        """Image (S, S, 3) and depth (S, S) of the current pose, rendered once per episode
        and pose (the scene does not change within an episode)."""
        key = (*self.cell, self.heading)
        if key not in self._views:
            self._views[key] = self.caster.render_at(self._scene, self.cell[0] + 0.5,
                                                     self.cell[1] + 0.5, self.yaw())
        return self._views[key]

    def _draw_display(self, img: np.ndarray) -> None:
        if self.phase == "return" and not self.memoryless:
            return
        color = HUD_ARROW if self.phase == "tour" else MARKER_COLORS[
            self.marker_colors[self.target]]
        glyph = self._glyph[self.guidance()]
        g = glyph.shape[0] // 2
        c0 = self.image_size // 2 - g
        img[0 : 2 * g + 3, c0 - 1 : c0 + 2 * g + 2] = HUD_BOX
        img[1 : 2 * g + 2, c0 : c0 + 2 * g + 1][glyph] = color

    def _render(self) -> np.ndarray:
        img = self._view()[0].copy()  # (S, S, 3)
        self._draw_display(img)
        return img

    def _obs(self) -> dict:
        self._frame = self._render()
        yaw = self.yaw()
        x, y = self.cell[0] + 0.5, self.cell[1] + 0.5
        return {
            "observation.images.top": self._frame,  # (S, S, 3) uint8
            "observation.depth": self._view()[1].copy(),  # (S, S) float32
            "observation.pose": self.pose().astype(np.float32),  # (4, 4)
            "observation.intrinsics": self._k32.copy(),  # (3, 3)
            "observation.state": np.array([x, y, np.cos(yaw), np.sin(yaw)], np.float32),  # (Ds,)
            "task": self.instruction,
        }


def line_of_sight(maze: gm.Maze, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """True if a straight segment joins the centre of cell ``a`` to the centre or a corner
    of the marker square of cell ``b`` without crossing a wall (whatever the heading)."""
    x0, y0 = a[0] + 0.5, a[1] + 0.5
    for ox, oy in ((0.5, 0.5), (0.15, 0.15), (0.15, 0.85), (0.85, 0.15), (0.85, 0.85)):
        dx, dy = b[0] + ox - x0, b[1] + oy - y0
        if dx == 0 and dy == 0:
            return True
        if raycast.cast_ray(maze, x0, y0, dx, dy)[0] > 1.0:  # the wall lies beyond the point
            return True
    return False


class MemoryMazeExpert(Expert):
    """Follows the display during the tour; in the return, a shortest path (fewest actions)
    to the target marker, then stop. Returns one-hot actions (Da,) float32."""

    def act(self, obs=None) -> np.ndarray:
        return one_hot(self.env.guidance())
