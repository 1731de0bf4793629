"""``seq-of-colors``: colours are shown one after another; touch the objects in that order."""

from __future__ import annotations

import math

import numpy as np

from memvla.envs import render
from memvla.envs.base import CENTER, HeldChoiceTask, check_int, draw_twin_patch, ring_positions
from memvla.envs.experts import Expert, goto_avoiding, hold, move_to

INSTRUCTIONS = (
    "touch the objects in the order the colors were shown",
    "remember the color sequence and touch the objects in that order",
    "watch the colors, then touch them in the same order",
)


class SeqOfColorsEnv(HeldChoiceTask):
    """``n_items`` colours shown at the centre one after another (``item_steps`` frames
    each), ``delay`` empty frames, then discs of those colours on a ring: touch them in
    the order shown. A touched disc disappears; touching one out of order fails. As in
    ``remember-color``, the choice phase opens with ``ready_steps`` frames in which the
    discs are shown and the effector is held (actions ignored).

    The colours and positions are drawn independently of the order, so the choice frames
    do not reveal it. ``reset(options={"cue": [i0, i1, ...]})`` forces the order (a
    permutation of the object indices). Memoryless twin: the colour to touch next stays
    visible as a patch in the top-left corner (as ``remember-color``'s cue: a patch the
    32 px policies see; the whole sequence in that corner would be cells of under 2 px).
    """

    option_keys = ("cue",)
    version = 2  # 2: the twin shows the colour to touch next (1: the sequence in 1.6 px cells)

    def __init__(self, *, n_items: int = 3, item_steps: int = 3, delay: int = 10,
                 ready_steps: int = 8, ready_actions: str = "wait", **kwargs):
        self.n_items = check_int("n_items", n_items, 1, len(render.PALETTE), render.PALETTE_NOTE)
        self.item_steps = check_int("item_steps", item_steps, 1, 1000)
        self.delay = check_int("delay", delay, 0, 10_000)
        self._init_hold(ready_steps, ready_actions)
        self.cue_end = self.n_items * self.item_steps
        self.choice_start = self.cue_end + self.delay
        super().__init__(**kwargs)
        self.positions = np.zeros((self.n_items, 2))  # (n, 2)
        self.color_ids = np.zeros(self.n_items, dtype=np.int64)  # (n,) palette indices
        self.order = np.arange(self.n_items)  # (n,) object indices in the order shown
        self.n_done = 0  # objects touched so far (in order)

    def default_max_steps(self) -> int:
        return self.choice_start + self.ready_steps + 12 * self.n_items + 6

    @property
    def chance_level(self) -> float:
        return 1.0 / math.factorial(self.n_items)

    @property
    def phase(self) -> str:
        if self.t < self.cue_end:
            return "cue"
        return "delay" if self.t < self.choice_start else "choice"

    @property
    def remaining(self) -> np.ndarray:
        """Indices of the objects not touched yet. Returns (n - n_done,) int."""
        return np.sort(self.order[self.n_done :])

    def _reset_task(self, rng, options) -> None:
        n = self.n_items
        self.color_ids = rng.choice(len(render.PALETTE), size=n, replace=False)
        self.positions = ring_positions(rng, n)  # (n, 2)
        self.order = rng.permutation(n)
        if "cue" in options:
            order = np.asarray(options["cue"])
            if order.shape != (n,) or sorted(order.tolist()) != list(range(n)):
                raise ValueError(f"option 'cue' must be a permutation of 0..{n - 1}, got {order}")
            self.order = order.astype(np.int64)
        self.n_done = 0

    def _instruction(self, rng) -> str:
        return INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]

    def _update(self, phase_before: str) -> None:
        if phase_before != "choice":
            return
        rem = self.remaining
        i = self._touched(self.positions[rem])
        if i < 0:
            return
        if rem[i] != self.order[self.n_done]:
            self.failed = True
            return
        self.n_done += 1
        self.success = self.n_done == self.n_items

    def _draw(self, img: np.ndarray) -> None:
        if self.memoryless and self.n_done < self.n_items:
            draw_twin_patch(img, render.COLORS[self.color_ids[self.order[self.n_done]]])
        phase = self.phase
        if phase == "cue":
            c = render.COLORS[self.color_ids[self.order[self.t // self.item_steps]]]
            render.stamp(img, self._disc, CENTER[0], CENTER[1], c)
        elif phase == "choice":
            rem = self.remaining
            self._draw_objects(img, self.positions[rem], render.COLORS[self.color_ids[rem]])

    def make_expert(self) -> Expert:
        return SeqOfColorsExpert(self)


class SeqOfColorsExpert(Expert):
    """Parks at the centre until the objects appear, then visits them in order, going back
    through the centre whenever the straight path would cross another object."""

    def act(self, obs=None) -> np.ndarray:
        env = self.env
        if env.phase != "choice" or env.n_done >= env.n_items:
            return move_to(env.eff, CENTER)
        if env.expert_waits():
            return hold()
        target = env.order[env.n_done]
        others = env.positions[[i for i in env.remaining if i != target]]  # (m, 2)
        return goto_avoiding(env.eff, env.positions[target], others, CENTER)
