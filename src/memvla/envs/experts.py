"""Scripted experts: the base class and the motion helpers the per-task experts share.

An expert reads privileged state from the unwrapped environment (which object is the
target, where the ball is, where the object started) and moves the effector there with a
saturating proportional controller, so its actions are smooth and easy to imitate: full
speed far from the goal, a proportional last step. Paths that would pass over a wrong
object go through a free "home" waypoint first (the arena centre for the ring layouts).
"""

from __future__ import annotations

import numpy as np

from memvla.envs.base import ACTION_DIM, CENTER, MAX_SPEED, OBJECT_RADIUS


class Expert:
    """Scripted demonstrator for one environment.

    ``act(obs)`` returns the action (Da,) float32 for the environment's current state; the
    observation argument is accepted for API symmetry with policies but not needed, since
    the expert reads the (privileged) state of ``env.unwrapped`` directly.
    """

    def __init__(self, env):
        self.env = env.unwrapped

    def reset(self) -> None:
        """Forget any per-episode state (call after ``env.reset``)."""

    def act(self, obs=None) -> np.ndarray:
        raise NotImplementedError


def move_to(pos: np.ndarray, target: np.ndarray, gripper: float = -1.0) -> np.ndarray:
    """Action (Da,) float32 that moves ``pos`` towards ``target``: P-control, norm <= 1."""
    v = (np.asarray(target) - pos) / MAX_SPEED  # (2,) in units of one full-speed step
    n = float(np.hypot(v[0], v[1]))
    if n > 1.0:
        v = v / n
    return np.array([v[0], v[1], gripper], dtype=np.float32)  # (Da,)


def hold(gripper: float = -1.0) -> np.ndarray:
    """Action (Da,) that keeps the effector still."""
    a = np.zeros(ACTION_DIM, dtype=np.float32)  # (Da,)
    a[2] = gripper
    return a


def segment_clear(p: np.ndarray, q: np.ndarray, obstacles: np.ndarray, clearance: float) -> bool:
    """True if the segment p→q stays farther than ``clearance`` from every obstacle (n, 2)."""
    if len(obstacles) == 0:
        return True
    d = q - p  # (2,)
    L2 = float(d @ d)
    if L2 < 1e-12:
        dist = np.hypot(*(obstacles - p).T)  # (n,)
    else:
        s = np.clip((obstacles - p) @ d / L2, 0.0, 1.0)  # (n,) projection onto the segment
        closest = p + s[:, None] * d  # (n, 2)
        dist = np.hypot(*(obstacles - closest).T)  # (n,)
    return bool(dist.min() > clearance)


def goto_avoiding(
    pos: np.ndarray, target: np.ndarray, obstacles: np.ndarray, home: np.ndarray
) -> np.ndarray:
    """Action (Da,) towards ``target``, via ``home`` when the straight path hits an obstacle."""
    clearance = OBJECT_RADIUS + 0.01
    if segment_clear(pos, target, obstacles, clearance):
        return move_to(pos, target)
    return move_to(pos, home)


def reach_choice(env) -> np.ndarray:
    """Action towards ``env.positions[env.target]`` that steers around the other objects
    (via the centre), for tasks whose choice objects lie on a ring."""
    others = np.delete(env.positions, env.target, axis=0)  # (n-1, 2)
    return goto_avoiding(env.eff, env.positions[env.target], others, CENTER)
