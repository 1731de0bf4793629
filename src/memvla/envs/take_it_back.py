"""``take-it-back``: carry an object into a marked zone, then bring it back to its start."""

from __future__ import annotations

import numpy as np

from memvla.envs import render
from memvla.envs.base import OBJECT_RADIUS, TaskEnv, check_int
from memvla.envs.experts import Expert, hold, move_to

INSTRUCTIONS = (
    "put the object in the square, then bring it back to where it started",
    "move the object into the zone and then return it to its start",
    "carry the object to the marked square and back again",
)
ZONE_HALF = 0.11  # half-size of the square zone outline
ZONE_TOL = 0.05  # the object is "in the zone" when its centre is this close to the zone's
RETURN_TOL = 0.05  # success: the object's centre this close to where it started
MIN_SEPARATION = 0.35  # between the start position and the zone
AREA = (0.2, 0.8)  # start and zone centres are drawn uniformly in AREA × AREA
ZONE_FILLED = np.array((80, 80, 80), dtype=np.uint8)


class TakeItBackEnv(TaskEnv):
    """One disc at a random start and a square zone outline elsewhere. Grasp the disc
    (close the gripper, action[2] > 0, with the effector on it; it then moves with the
    effector until the gripper opens) and carry it into the zone. The zone then takes the
    disc and the effector to its centre, turns solid and the scene pauses for ``delay``
    steps (actions are ignored), then the zone disappears: bring the disc back and put it
    down (open the gripper) where it started, within ``RETURN_TOL``; put down anywhere
    else, the episode fails.

    Nothing marks the start once the disc has left it: the snap to the zone's centre hides
    the side it came in from, and the put-down makes a path that merely passes over the
    start fail (version 1 had neither, and a memoryless policy returned along the way in
    by reading that side). Memoryless twin: a grey ring marks the start throughout.
    """

    uses_gripper = True
    version = 2

    def __init__(self, *, delay: int = 4, **kwargs):
        self.delay = check_int("delay", delay, 0, 10_000)
        super().__init__(**kwargs)
        s = self.image_size
        self._zone = render.square_mask(render.px_len(ZONE_HALF, s), hollow=True)
        self._zone_filled = render.square_mask(render.px_len(ZONE_HALF, s))
        self._marker = render.ring_mask(render.px_len(OBJECT_RADIUS + 0.02, s))
        self.start = np.zeros(2)  # (2,) where the disc started
        self.zone = np.zeros(2)  # (2,) zone centre
        self.obj = np.zeros(2)  # (2,) disc centre now
        self.color_id = 0
        self.attached = False
        self.wait_left = 0
        self._phase = "carry"

    def default_max_steps(self) -> int:
        return 40 + self.delay

    @property
    def chance_level(self) -> float:
        """Probability that a uniformly guessed return point lies within the tolerance."""
        return float(np.pi * RETURN_TOL**2 / (AREA[1] - AREA[0]) ** 2)

    @property
    def phase(self) -> str:
        return self._phase

    def _reset_task(self, rng, options) -> None:
        self.start = rng.uniform(*AREA, size=2)  # (2,)
        self.zone = rng.uniform(*AREA, size=2)  # (2,)
        while np.hypot(*(self.zone - self.start)) < MIN_SEPARATION:
            self.zone = rng.uniform(*AREA, size=2)
        self.color_id = int(rng.integers(len(render.PALETTE)))
        self.obj = self.start.copy()
        self.attached = False
        self.wait_left = 0
        self._phase = "carry"

    def _instruction(self, rng) -> str:
        return INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]

    def _frozen(self) -> bool:
        return self._phase == "wait"

    def _on_grip(self, closed_now: bool) -> None:
        self.attached = bool(closed_now and np.hypot(*(self.obj - self.eff)) <= OBJECT_RADIUS)

    def _on_move(self, delta: np.ndarray) -> None:
        if self.attached:
            self.obj = np.clip(self.obj + delta, 0.0, 1.0)

    def _update(self, phase_before: str) -> None:
        if self._phase == "wait":
            self.wait_left -= 1
            if self.wait_left <= 0:
                self._phase = "return"
        elif self._phase == "carry" and np.hypot(*(self.obj - self.zone)) < ZONE_TOL:
            self.obj, self.eff = self.zone.copy(), self.zone.copy()  # (2,) the zone's centre
            self.wait_left = self.delay
            self._phase = "wait" if self.delay > 0 else "return"
        elif self._phase == "return" and not self.attached:  # put down: here or failed
            self.success = bool(np.hypot(*(self.obj - self.start)) < RETURN_TOL)
            self.failed = not self.success

    def _draw(self, img: np.ndarray) -> None:
        if self._phase == "carry":
            render.stamp(img, self._zone, self.zone[0], self.zone[1], render.ZONE)
        elif self._phase == "wait":
            render.stamp(img, self._zone_filled, self.zone[0], self.zone[1], ZONE_FILLED)
        if self.memoryless:
            render.stamp(img, self._marker, self.start[0], self.start[1], render.MARKER)
        render.stamp(img, self._disc, self.obj[0], self.obj[1], render.COLORS[self.color_id])

    def make_expert(self) -> Expert:
        return TakeItBackExpert(self)


class TakeItBackExpert(Expert):
    """Goes to the disc, closes the gripper, carries the disc to the zone, waits, carries
    it back to its (privileged) start position and opens the gripper there."""

    def act(self, obs=None) -> np.ndarray:
        env = self.env
        if env.phase == "wait":
            return hold(1.0)
        if not env.attached:
            if env.gripper_closed:  # closed on nothing: open first
                return move_to(env.eff, env.obj, gripper=-1.0)
            if np.hypot(*(env.obj - env.eff)) < 0.01:
                return hold(1.0)  # on the disc: grasp
            return move_to(env.eff, env.obj, gripper=-1.0)
        goal = env.zone if env.phase == "carry" else env.start
        if env.phase == "return" and np.hypot(*(env.obj - env.start)) < 0.01:
            return hold(-1.0)  # put it down
        return move_to(env.eff, goal + (env.eff - env.obj), gripper=1.0)
