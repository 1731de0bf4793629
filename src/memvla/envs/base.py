"""Shared machinery of the built-in tasks: spaces, validation, effector motion, rendering.

Every task is a :class:`TaskEnv` subclass that fills in four hooks: ``_reset_task`` (draw
the episode from the seeded RNG), ``_update`` (check touches / progress after a move),
``_draw`` (paint the scene) and the ``phase`` property. The base class owns the effector,
the gripper, the time limit, action checking and the observation dict.
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from memvla.envs import render

ACTION_DIM = 3  # Da: (vx, vy, gripper); gripper > 0 closes it
STATE_DIM = 3  # Ds: (x, y, gripper); gripper 1.0 = closed
MAX_SPEED = 0.08  # world units per step at action 1.0 (about 5 px at 64×64)
OBJECT_RADIUS = 0.085  # about 5 px at 64×64; touching = effector centre within this radius
EFFECTOR_HALF = 0.035  # half-size of the square effector marker (5×5 px at 64×64)
CENTER = np.array([0.5, 0.5])
TWIN_PATCH = 0.12  # side of a memoryless twin's cue patch: the top-left corner, clear of the ring
TEXT_CHARSET = string.ascii_letters + string.digits + " ,.'-!?"


def check_int(name: str, value: Any, lo: int, hi: int, why: str = "") -> int:
    """``value`` as an int in [lo, hi], else a ValueError naming the option and the range."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        why = f" ({why})" if why else ""
        raise ValueError(f"option {name!r} must be an integer in [{lo}, {hi}]{why}, got {value!r}")
    return int(value)


def check_action(action: Any) -> np.ndarray:
    """Validate an action: shape (Da,), finite. Returns it as float32 clipped to [-1, 1]."""
    try:
        a = np.asarray(action, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"action must be an array of shape ({ACTION_DIM},), got {action!r}") from e
    if a.shape != (ACTION_DIM,):
        raise ValueError(
            f"action must have shape ({ACTION_DIM},) = (vx, vy, gripper), got shape {a.shape}"
        )
    if not np.isfinite(a).all():
        raise ValueError(f"action of shape ({ACTION_DIM},) must be finite, got {a.tolist()}")
    return np.clip(a, -1.0, 1.0)  # (Da,)


READY_ACTIONS = ("wait", "aim")  # what experts send while held (see HeldChoiceTask)
LAYOUTS = ("random", "fixed")  # object placement of the ring tasks (see ring_positions)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """A task option that must be one of ``choices``, with an actionable error."""
    if value not in choices:
        raise ValueError(f"option {name!r} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_layout(layout: Any) -> str:
    return check_choice("layout", layout, LAYOUTS)


def draw_twin_patch(img: np.ndarray, color) -> None:
    """Paint a memoryless twin's cue patch (the top-left corner) in ``color`` (3,) uint8."""
    render.fill_rect(img, 0.0, 0.0, TWIN_PATCH, TWIN_PATCH, color)


def ring_positions(rng: np.random.Generator, n: int, radius: float = OBJECT_RADIUS,
                   layout: str = "random") -> np.ndarray:
    """``n`` object centres on a ring around the arena centre. Returns (n, 2) float64.

    ``layout="random"``: angles are evenly spaced slots with a random rotation and a small
    jitter, radii are random within a band. The band is chosen so that objects never
    overlap and the straight path from the centre to any object keeps clear of all the
    others (by more than the touch radius), which lets the experts move without touching
    a wrong object. ``layout="fixed"``: the same ``n`` places in every episode (evenly
    spaced from straight up, the middle of the band), so only the colours move: the
    visual problem shrinks to "which place has that colour". No RNG draw is made.
    """
    slot = 2 * np.pi / n
    gap = 0.02
    r_hi = 0.5 - radius - 0.005
    # adjacent angles differ by >= 0.7 slot: chord >= 2r+gap, ray clearance >= r+gap
    r_lo = max(
        0.26,
        (2 * radius + gap) / (2 * np.sin(min(0.35 * slot, np.pi / 2))),
        (radius + gap) / np.sin(min(0.7 * slot, np.pi / 2)),
    )
    r_lo = min(r_lo, r_hi)
    if layout == "fixed":
        angles = -np.pi / 2 + slot * np.arange(n)  # (n,) the first place straight up
        r = (r_lo + r_hi) / 2
        return CENTER + r * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n, 2)
    rot = rng.uniform(0, 2 * np.pi)
    angles = rot + slot * np.arange(n) + rng.uniform(-0.15, 0.15, size=n) * slot  # (n,)
    radii = rng.uniform(r_lo, r_hi, size=n)  # (n,)
    return CENTER + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n, 2)


class TaskEnv(gym.Env):
    """Base of the built-in tasks (see :mod:`memvla.envs` for the task descriptions).

    Observation: ``{"observation.images.top": uint8 (S, S, 3), "observation.state":
    float32 (3,) = (x, y, gripper), "task": str}``. Action: float32 (3,) in [-1, 1] =
    (vx, vy, gripper); values outside [-1, 1] are clipped, a wrong shape or NaN/inf raises
    ValueError. Tasks that do not grasp ignore the gripper command (the gripper stays open).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    uses_gripper = False
    cue_end = 0  # first frame index at which the cue is no longer shown (0: no cue)
    # bumped when a change to the task makes its earlier data and results incomparable
    # (recorded in a dataset's info.json and an exam cell; a stale exam cache is refused)
    version = 1
    option_keys: tuple[str, ...] = ()  # keys accepted in reset(options=...)

    def __init__(
        self,
        *,
        image_size: int = 64,
        max_episode_steps: int | None = None,
        memoryless: bool = False,
        render_mode: str | None = None,
    ):
        self.image_size = check_int("image_size", image_size, 16, 512)
        if max_episode_steps is None:
            max_episode_steps = self.default_max_steps()
        self.max_episode_steps = check_int("max_episode_steps", max_episode_steps, 1, 100_000)
        if not isinstance(memoryless, bool | np.bool_):
            raise ValueError(f"option 'memoryless' must be True or False, got {memoryless!r}")
        self.memoryless = bool(memoryless)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        s = self.image_size
        self.observation_space = spaces.Dict(
            {
                "observation.images.top": spaces.Box(0, 255, (s, s, 3), np.uint8),
                "observation.state": spaces.Box(0.0, 1.0, (STATE_DIM,), np.float32),
                "task": spaces.Text(max_length=128, min_length=1, charset=TEXT_CHARSET),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        # masks in pixels for this image size
        self.r_px = render.px_len(OBJECT_RADIUS, s)
        self._disc = render.disc_mask(self.r_px)
        self._eff_open = render.square_mask(render.px_len(EFFECTOR_HALF, s), hollow=True)
        self._eff_closed = render.square_mask(render.px_len(EFFECTOR_HALF, s))
        self._bg = np.empty((s, s, 3), dtype=np.uint8)  # (S, S, 3)
        self._bg[:] = render.BACKGROUND
        self.t = 0
        self.eff = CENTER.copy()
        self.gripper_closed = False
        self.success = False
        self.failed = False
        self.instruction = ""
        self._frame: np.ndarray | None = None

    # ----------------------------------------------------------------- task hooks
    def default_max_steps(self) -> int:
        raise NotImplementedError

    @property
    def chance_level(self) -> float:
        """Success probability of a guess (e.g. 1/n for n candidate objects)."""
        raise NotImplementedError

    @property
    def phase(self) -> str:
        raise NotImplementedError

    def _start_position(self, rng: np.random.Generator) -> np.ndarray:
        return CENTER + rng.uniform(-0.07, 0.07, size=2)  # (2,)

    def _reset_task(self, rng: np.random.Generator, options: dict) -> None:
        raise NotImplementedError

    def _instruction(self, rng: np.random.Generator) -> str:
        raise NotImplementedError

    def _update(self, phase_before: str) -> None:
        """After a move: set ``self.success`` / ``self.failed`` and advance the task."""

    def _draw(self, img: np.ndarray) -> None:
        raise NotImplementedError

    def _frozen(self) -> bool:
        """True while the scene pauses (actions are ignored)."""
        return False

    def _on_grip(self, closed_now: bool) -> None:
        """Called when the gripper changes state (grasp tasks attach / release here)."""

    def _on_move(self, delta: np.ndarray) -> None:
        """Called with the effector's actual displacement (2,) after each move."""

    def make_expert(self):
        raise NotImplementedError

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.option_keys))
        if unknown:
            known = ", ".join(self.option_keys) or "none"
            raise ValueError(f"unknown reset option(s) {unknown}; this task accepts: {known}")
        rng = self.np_random
        self.t = 0
        self.success = False
        self.failed = False
        self.gripper_closed = False
        self.eff = self._start_position(rng)
        self._reset_task(rng, options)
        self.instruction = self._instruction(rng)
        return self._obs(), self._info()

    def step(self, action):
        a = check_action(action)  # (Da,)
        phase_before = self.phase
        if not self._frozen():
            if self.uses_gripper and (a[2] > 0) != self.gripper_closed:
                self.gripper_closed = bool(a[2] > 0)
                self._on_grip(self.gripper_closed)
            new = np.clip(self.eff + a[:2].astype(np.float64) * MAX_SPEED, 0.0, 1.0)  # (2,)
            delta = new - self.eff
            self.eff = new
            self._on_move(delta)
        self.t += 1
        self._update(phase_before)
        terminated = self.success or self.failed
        truncated = not terminated and self.t >= self.max_episode_steps
        return self._obs(), float(self.success), terminated, truncated, self._info()

    def render(self):
        if self._frame is None:
            self._frame = self._render()
        return self._frame.copy()

    # ------------------------------------------------------------------ helpers
    def _render(self) -> np.ndarray:
        img = self._bg.copy()  # (S, S, 3)
        self._draw(img)
        mask = self._eff_closed if self.gripper_closed else self._eff_open
        render.stamp(img, mask, self.eff[0], self.eff[1], render.EFFECTOR)
        return img

    def _obs(self) -> dict:
        self._frame = self._render()
        state = np.array([self.eff[0], self.eff[1], float(self.gripper_closed)], np.float32)
        return {
            "observation.images.top": self._frame,  # (S, S, 3) uint8
            "observation.state": state,  # (Ds,) float32
            "task": self.instruction,
        }

    def _info(self) -> dict:
        return {"is_success": bool(self.success), "phase": self.phase}

    def _touched(self, positions: np.ndarray) -> int:
        """Index of the object (rows of ``positions`` (n, 2)) under the effector, or -1."""
        if len(positions) == 0:
            return -1
        d = np.hypot(*(positions - self.eff).T)  # (n,)
        i = int(np.argmin(d))
        return i if d[i] < OBJECT_RADIUS else -1

    def _draw_objects(self, img: np.ndarray, positions: np.ndarray, colors: np.ndarray) -> None:
        """Discs at ``positions`` (n, 2) with palette ``colors`` (n, 3)."""
        for (x, y), c in zip(positions, colors, strict=True):
            render.stamp(img, self._disc, x, y, c)


class HeldChoiceTask(TaskEnv):
    """A task whose choice phase (from ``choice_start``, set by the subclass) opens with
    ``ready_steps`` frames in which the effector is held (actions are ignored).

    ``ready_actions`` says what the scripted expert sends meanwhile. ``wait``: no motion, so
    an action chunk predicted before the choice holds still whenever the choice starts.
    ``aim``: already the motion toward the target (ignored while held); a chunk that
    overlaps the start of the choice then ends with moves, which a policy that cannot tell
    when the choice starts (a longer or varied delay) executes before it.
    """

    choice_start = 0

    def _init_hold(self, ready_steps: Any, ready_actions: Any) -> None:
        self.ready_steps = check_int("ready_steps", ready_steps, 0, 1000)
        self.ready_actions = check_choice("ready_actions", ready_actions, READY_ACTIONS)

    def _frozen(self) -> bool:
        return self.choice_start <= self.t < self.choice_start + self.ready_steps

    def expert_waits(self) -> bool:
        """True while held with ``ready_actions=wait``: the expert then holds still."""
        return self._frozen() and self.ready_actions == "wait"


class TouchTargetTask(TaskEnv):
    """Discs visible throughout (``positions`` (n, 2), palette indices ``color_ids`` (n,)):
    touching the ``target`` succeeds, touching another fails; 25 steps by default."""

    def default_max_steps(self) -> int:
        return 25

    @property
    def chance_level(self) -> float:
        return 1.0 / len(self.positions)

    @property
    def phase(self) -> str:
        return "choice"

    def _update(self, phase_before: str) -> None:
        i = self._touched(self.positions)
        if i >= 0:
            self.success = i == self.target
            self.failed = not self.success

    def _draw(self, img: np.ndarray) -> None:
        self._draw_objects(img, self.positions, render.COLORS[self.color_ids])
