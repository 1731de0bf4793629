"""``remember-color``: see a coloured cue, wait through an empty delay, touch that colour."""

from __future__ import annotations

import numpy as np

from memvla.envs import render
from memvla.envs.base import (
    CENTER,
    HeldChoiceTask,
    check_choice,
    check_int,
    check_layout,
    draw_twin_patch,
    ring_positions,
)
from memvla.envs.experts import Expert, hold, move_to, reach_choice

INSTRUCTIONS = (
    "remember the color and touch it later",
    "memorize the color you see, then touch the object of that color",
    "touch the object that has the color shown at the start",
    "watch the color, wait, then touch the matching object",
)
COLOR_ORDERS = ("shuffled", "fixed")


class RememberColorEnv(HeldChoiceTask):
    """Cue disc at the centre for ``cue_steps`` frames, ``delay`` empty frames, then
    ``n_colors`` discs on a ring; touching the cue's colour succeeds, another fails.
    With ``max_delay`` set, every episode draws its delay uniformly from [delay,
    max_delay] (training on varied delays; ``episode_delay`` is the episode's).

    The colours are drawn from the first ``palette_size`` palette entries (all nine by
    default; with ``palette_size = n_colors`` every episode shows the same colours and
    only their places and the cue change: an easier visual problem, the same memory one).
    ``layout="fixed"`` puts the discs at the same ``n_colors`` places in every episode
    (see :func:`ring_positions`): with a small palette the visual part is then a choice
    among a few places and what is left to learn is the memory. ``colors="fixed"`` also
    gives every place the same colour in every episode (the first ``n_colors`` palette
    entries in order), so the choice frames are identical across episodes and the cue
    alone says where to go: a pure delayed-response task with nothing visual to match.

    The choice phase opens with ``ready_steps`` frames in which the discs are shown but the
    effector is held (actions are ignored), like the go signal of a delayed-response task:
    a policy executes its action chunks open loop, so without it the chunk planned just
    before the discs appear would move blindly for up to a chunk's length.

    The choice colours and their placement are drawn before (and independently of) the
    cue, which is then one of them, so every frame after the cue phase is the same
    whatever the cue was. ``reset(options={"cue": i})`` forces the cue to choice object i.
    Memoryless twin: the cue colour stays visible in a top-left corner patch.
    """

    option_keys = ("cue",)

    def __init__(self, *, n_colors: int = 3, cue_steps: int = 4, delay: int = 30,
                 max_delay: int | None = None, ready_steps: int = 8, ready_actions: str = "wait",
                 palette_size: int = len(render.PALETTE), layout: str = "random",
                 colors: str = "shuffled", **kwargs):
        self.palette_size = check_int("palette_size", palette_size, 2, len(render.PALETTE),
                                      render.PALETTE_NOTE)
        self.n_colors = check_int("n_colors", n_colors, 2, self.palette_size,
                                  "at most palette_size")
        self.cue_steps = check_int("cue_steps", cue_steps, 1, 1000)
        self.delay = check_int("delay", delay, 0, 10_000)
        self.max_delay = self.delay if max_delay is None else check_int(
            "max_delay", max_delay, self.delay, 10_000, "at least delay, or None")
        self.episode_delay = self.delay
        self._init_hold(ready_steps, ready_actions)
        self.layout = check_layout(layout)
        self.colors = check_choice("colors", colors, COLOR_ORDERS)
        self.cue_end = self.cue_steps
        self.choice_start = self.cue_steps + self.delay  # of the current episode
        super().__init__(**kwargs)
        self.positions = np.zeros((self.n_colors, 2))  # (n, 2)
        self.color_ids = np.zeros(self.n_colors, dtype=np.int64)  # (n,) palette indices
        self.target = 0

    def default_max_steps(self) -> int:
        return self.cue_steps + self.max_delay + self.ready_steps + 25

    @property
    def chance_level(self) -> float:
        return 1.0 / self.n_colors

    @property
    def phase(self) -> str:
        if self.t < self.cue_steps:
            return "cue"
        return "delay" if self.t < self.choice_start else "choice"

    def _reset_task(self, rng, options) -> None:
        if self.max_delay > self.delay:  # no draw otherwise: fixed-delay episodes unchanged
            self.episode_delay = int(rng.integers(self.delay, self.max_delay + 1))
        self.choice_start = self.cue_steps + self.episode_delay
        self.color_ids = rng.choice(self.palette_size, size=self.n_colors, replace=False)
        if self.colors == "fixed":
            self.color_ids = np.arange(self.n_colors)
        self.positions = ring_positions(rng, self.n_colors, layout=self.layout)  # (n, 2)
        self.target = int(rng.integers(self.n_colors))
        if "cue" in options:
            self.target = check_int("cue", options["cue"], 0, self.n_colors - 1)

    def _instruction(self, rng) -> str:
        return INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]

    def _update(self, phase_before: str) -> None:
        if phase_before != "choice":
            return
        i = self._touched(self.positions)
        if i >= 0:
            self.success = i == self.target
            self.failed = not self.success

    def _draw(self, img: np.ndarray) -> None:
        cue = render.COLORS[self.color_ids[self.target]]
        if self.memoryless:
            draw_twin_patch(img, cue)
        phase = self.phase
        if phase == "cue":
            render.stamp(img, self._disc, CENTER[0], CENTER[1], cue)
        elif phase == "choice":
            self._draw_objects(img, self.positions, render.COLORS[self.color_ids])

    def make_expert(self) -> Expert:
        return RememberColorExpert(self)


class RememberColorExpert(Expert):
    """Parks at the centre during cue and delay, waits while the effector is held at the
    start of the choice phase (with ``ready_actions=aim`` it already aims: those commands
    are ignored), then goes straight to the cued colour."""

    def act(self, obs=None) -> np.ndarray:
        env = self.env
        if env.phase != "choice":
            return move_to(env.eff, CENTER)
        return hold() if env.expert_waits() else reach_choice(env)
