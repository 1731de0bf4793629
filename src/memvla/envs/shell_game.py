"""``shell-game``: a ball is hidden under one of three cups, the cups swap; touch its cup."""

from __future__ import annotations

import numpy as np

from memvla.envs import render
from memvla.envs.base import HeldChoiceTask, check_int
from memvla.envs.experts import Expert, goto_avoiding, hold

INSTRUCTIONS = (
    "find the ball under the cups",
    "watch the cups and touch the one hiding the ball",
    "follow the cup with the ball and touch it",
)
SLOTS_X = np.array([0.2, 0.5, 0.8])  # three cup slots on a horizontal line
ROW_Y = 0.45
LIFT = 0.17  # cups are raised by this much while the ball is shown
ARC = 0.19  # a swap moves one cup over the top, the other underneath (no overlap)
COVER_STEPS = 2  # frames over which the cups come down over the ball
BALL_RADIUS = 0.05
CUP_HALF = 0.085
HOME = np.array([0.5, 0.85])  # effector start area, below the swap arcs
BALL_COLOR = render.COLORS[render.COLOR_NAMES.index("red")]


class ShellGameEnv(HeldChoiceTask):
    """Three cups, raised, with the ball under one of them for ``cue_steps`` frames; the
    cups come down (``COVER_STEPS`` frames), then ``n_swaps`` swaps of two cups, each
    animated over ``swap_steps`` frames (one cup over the top, the other underneath).
    Then touch the cup holding the ball; touching another fails. With ``max_swaps`` set,
    every episode draws its number of swaps uniformly from [n_swaps, max_swaps]
    (``len(self.swaps)``). As in ``remember-color``,
    the choice phase opens with ``ready_steps`` frames in which the effector is held
    (actions are ignored): without it, the effector's first steps would already point at
    the ball's cup in the next observation, and a policy with a history could learn to
    continue its own motion (in the expert's data that motion is always right; in closed
    loop it is whatever the policy started with) instead of remembering the ball.

    The swap sequence is drawn independently of the ball's cup, so every frame after the
    cover (``t >= cue_end``) is the same whatever cup the ball started under.
    ``reset(options={"cue": i})`` forces the ball under the cup in slot i (0 = left).
    Memoryless twin: the ball stays visible, drawn over its cup (as if the cups were
    transparent).
    """

    option_keys = ("cue",)

    def __init__(self, *, n_swaps: int = 3, max_swaps: int | None = None, swap_steps: int = 4,
                 cue_steps: int = 4, ready_steps: int = 8, ready_actions: str = "wait", **kwargs):
        self.n_swaps = check_int("n_swaps", n_swaps, 0, 100)
        self.max_swaps = self.n_swaps if max_swaps is None else check_int(
            "max_swaps", max_swaps, self.n_swaps, 100, "at least n_swaps, or None")
        self.swap_steps = check_int("swap_steps", swap_steps, 1, 50)
        self.cue_steps = check_int("cue_steps", cue_steps, 1, 1000)
        self._init_hold(ready_steps, ready_actions)
        self.cue_end = self.cue_steps + COVER_STEPS
        self.choice_start = self.cue_end + self.n_swaps * self.swap_steps  # this episode's
        super().__init__(**kwargs)
        self._cup = render.cup_mask(render.px_len(CUP_HALF, self.image_size))
        self._ball = render.disc_mask(render.px_len(BALL_RADIUS, self.image_size))
        self.ball_cup = 0  # identity of the cup hiding the ball (cup c starts in slot c)
        self.swaps = np.zeros((self.n_swaps, 2), dtype=np.int64)  # (n_swaps, 2) slot pairs
        self.traj = np.zeros((self.choice_start + 1, 3, 2))  # (T, 3, 2) cup centres per frame

    def default_max_steps(self) -> int:
        return self.cue_end + self.max_swaps * self.swap_steps + self.ready_steps + 25

    @property
    def chance_level(self) -> float:
        return 1.0 / 3.0

    @property
    def phase(self) -> str:
        if self.t < self.cue_steps:
            return "cue"
        if self.t < self.cue_end:
            return "cover"
        return "swap" if self.t < self.choice_start else "choice"

    @property
    def cups(self) -> np.ndarray:
        """Cup centres (by cup identity) in the current frame. Returns (3, 2)."""
        return self.traj[min(self.t, len(self.traj) - 1)]

    def _start_position(self, rng) -> np.ndarray:
        return HOME + rng.uniform([-0.12, -0.04], [0.12, 0.04])  # (2,)

    def _reset_task(self, rng, options) -> None:
        pairs = np.array([[0, 1], [1, 2], [0, 2]])
        n = self.n_swaps  # no draw for a fixed count: fixed-count episodes stay unchanged
        if self.max_swaps > self.n_swaps:
            n = int(rng.integers(self.n_swaps, self.max_swaps + 1))
        self.swaps = pairs[rng.integers(3, size=n)]  # (n, 2)
        self.choice_start = self.cue_end + n * self.swap_steps
        self.ball_cup = int(rng.integers(3))
        if "cue" in options:
            self.ball_cup = check_int("cue", options["cue"], 0, 2)
        self.traj = self._trajectory()

    def _trajectory(self) -> np.ndarray:
        """Cup centres for every frame up to the choice phase. Returns (T, 3, 2)."""
        xy = np.stack([SLOTS_X, np.full(3, ROW_Y)], axis=1)  # (3, 2) by cup identity
        cup_in_slot = [0, 1, 2]
        frames = [xy.copy()] * (self.cue_end + 1)  # still frames t = 0 .. cue_end
        for i, j in self.swaps:
            ci, cj = cup_in_slot[i], cup_in_slot[j]
            for s in range(1, self.swap_steps + 1):
                p = s / self.swap_steps
                up, dx = ARC * np.sin(np.pi * p), (SLOTS_X[j] - SLOTS_X[i]) * p
                xy = xy.copy()
                xy[ci] = (SLOTS_X[i] + dx, ROW_Y - up)  # lower slot index goes over the top
                xy[cj] = (SLOTS_X[j] - dx, ROW_Y + up)
                frames.append(xy)
            cup_in_slot[i], cup_in_slot[j] = cj, ci
        return np.stack(frames)  # (T, 3, 2)

    def _instruction(self, rng) -> str:
        return INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]

    def _update(self, phase_before: str) -> None:
        if phase_before != "choice":
            return
        i = self._touched(self.cups)
        if i >= 0:
            self.success = i == self.ball_cup
            self.failed = not self.success

    def _draw(self, img: np.ndarray) -> None:
        cups = self.cups  # (3, 2)
        if self.t < self.cue_steps:
            lift = LIFT
        else:
            lift = LIFT * max(0.0, 1.0 - (self.t - self.cue_steps + 1) / (COVER_STEPS + 1))
        for x, y in cups:
            render.stamp(img, self._cup, x, y - lift, render.CUP)
        if lift > 0 or self.memoryless:  # the ball, on the table (seen through the cup)
            bx, by = cups[self.ball_cup]
            render.stamp(img, self._ball, bx, by, BALL_COLOR)

    def make_expert(self) -> Expert:
        return ShellGameExpert(self)


class ShellGameExpert(Expert):
    """Waits while the ball is shown and the cups swap, then touches the ball's cup."""

    def act(self, obs=None) -> np.ndarray:
        env = self.env
        if env.phase != "choice" or env.expert_waits():
            return hold()
        cups = env.cups  # (3, 2)
        others = np.delete(cups, env.ball_cup, axis=0)  # (2, 2)
        return goto_avoiding(env.eff, cups[env.ball_cup], others, HOME)
