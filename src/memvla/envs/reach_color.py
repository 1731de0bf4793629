"""``reach-color``: the instruction names a colour; touch the object of that colour."""

from __future__ import annotations

import numpy as np

from memvla.envs import render
from memvla.envs.base import TouchTargetTask, check_int, check_layout, ring_positions
from memvla.envs.experts import Expert, reach_choice

INSTRUCTIONS = (
    "touch the {color} ball",
    "move to the {color} object",
    "reach the {color} one",
    "go to the {color} ball and touch it",
)


class ReachColorEnv(TouchTargetTask):
    """``n_colors`` discs on a ring, visible from the first frame; the instruction names
    the target colour (language grounding, no memory demand). Touching another fails.

    ``layout="fixed"``: the discs take the same places in every episode.
    ``reset(options={"cue": i})`` forces the target to object i. There is no memoryless
    twin: the task needs no memory, so ``memoryless=True`` is accepted and changes nothing.
    """

    option_keys = ("cue",)

    def __init__(self, *, n_colors: int = 3, layout: str = "random", **kwargs):
        self.n_colors = check_int("n_colors", n_colors, 2, len(render.PALETTE), render.PALETTE_NOTE)
        self.layout = check_layout(layout)
        super().__init__(**kwargs)
        self.positions = np.zeros((self.n_colors, 2))  # (n, 2)
        self.color_ids = np.zeros(self.n_colors, dtype=np.int64)  # (n,) palette indices
        self.target = 0

    def _reset_task(self, rng, options) -> None:
        self.color_ids = rng.choice(len(render.PALETTE), size=self.n_colors, replace=False)
        self.positions = ring_positions(rng, self.n_colors, layout=self.layout)  # (n, 2)
        self.target = int(rng.integers(self.n_colors))
        if "cue" in options:
            self.target = check_int("cue", options["cue"], 0, self.n_colors - 1)

    def _instruction(self, rng) -> str:
        template = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
        return template.format(color=render.COLOR_NAMES[self.color_ids[self.target]])

    def make_expert(self) -> Expert:
        return ReachColorExpert(self)


class ReachColorExpert(Expert):
    """Goes straight to the named colour (via the centre if another object is in the way)."""

    def act(self, obs=None) -> np.ndarray:
        env = self.env
        return reach_choice(env)
