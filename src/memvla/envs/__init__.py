"""Built-in gymnasium tasks that need memory, their memoryless twins and scripted experts.

Usage::

    from memvla import envs
    env = envs.make("remember-color", delay=20, n_colors=5)   # or gymnasium.make(
    expert = envs.make_expert(env)                            #   "memvla/RememberColor-v0")
    obs, info = env.reset(seed=0)
    expert.reset()
    while True:
        obs, reward, terminated, truncated, info = env.step(expert.act(obs))
        if terminated or truncated:
            break
    info["is_success"]

Common to every task (but memory-maze, which is ego-centric: see its entry below)
---------------------------------------------------------------------------------
* Rendered with NumPy only (no OpenGL); deterministic under ``reset(seed=...)``.
  ``metadata["render_fps"] = 10``; ``render_mode="rgb_array"`` makes ``render()`` return
  the current frame.
* Observation (``spaces.Dict``):
  ``"observation.images.top"`` uint8 (S, S, 3), S = option ``image_size`` (default 64);
  ``"observation.state"`` float32 (3,) = (x, y, gripper): effector position in [0, 1]
  (x right, y down, image convention) and the gripper (1.0 closed, 0.0 open);
  ``"task"`` the instruction (str, from a few fixed templates, chosen by the seed).
* Action: float32 (3,) in [-1, 1] = (vx, vy, gripper). (vx, vy) times 0.08 arena widths
  is the effector's move per step; gripper > 0 closes it. Only take-it-back grasps; the
  other tasks ignore the gripper command (their gripper stays open). Values outside
  [-1, 1] are clipped; a wrong shape or NaN/inf raises ValueError.
* ``info["is_success"]`` (bool) and ``info["phase"]`` (str) after reset and every step.
  Reward 1.0 on success. Episodes terminate on success or failure (touching a wrong
  object) and truncate at ``max_episode_steps`` (option; per-task default below).
* Objects are discs of radius 0.085 (about 5 px at 64×64) in nine saturated palette
  colours (:data:`memvla.envs.render.COLOR_NAMES`); the effector is a small grey square
  (hollow when open, filled when closed). Touching = the effector centre within 0.085 of an
  object centre. Choice objects sit on a ring around the centre, placed so that the
  straight path from the centre to any object passes no other object.
* ``env.unwrapped.chance_level``: success probability of a guess; ``env.unwrapped.phase``:
  the current phase; ``env.unwrapped.cue_end``: the first frame index without the cue.
* Options of every task: ``image_size`` (16..512, default 64), ``max_episode_steps``,
  ``memoryless`` (bool), ``render_mode`` (None or "rgb_array").
* remember-color, shell-game and seq-of-colors open the choice phase with ``ready_steps``
  held frames; ``ready_actions`` says what their expert sends meanwhile: ``wait``
  (default, no motion) or ``aim`` (already the motion toward the target, ignored while
  held). With ``wait`` no action chunk predicted before the choice contains a move,
  whenever the choice starts.

Tasks (``TASKS`` / :func:`task_names`; each memory task ``X`` also has a registered twin
``X-memoryless`` = ``make(X, memoryless=True)`` in which the cue stays visible)
-----------------------------------------------------------------------------------------
``remember-color`` (``memvla/RememberColor-v0``)
    A cue disc of one colour at the centre for ``cue_steps`` frames (default 4), an empty
    scene for ``delay`` frames (default 30), then ``n_colors`` discs (2..9, default 3) on
    a ring, drawn from the first ``palette_size`` palette colours (default all 9); touch
    the cue's colour. ``layout`` "random" (default: ring rotation, angles and radii drawn
    per episode) or "fixed" (the same places every episode, only the colours move). The
    choice phase opens with ``ready_steps`` frames (default 8) in which the discs are
    shown but the effector is held (a go signal: a chunk planned before the discs
    appeared is not executed blind). ``colors`` "shuffled" (default) or "fixed" (each
    place keeps its colour). ``max_delay`` (default None): each episode draws its delay
    from [delay, max_delay]. Chance 1/n_colors.
    Max steps cue_steps + max(delay, max_delay) + ready_steps + 25.
    The choice colours and positions do not depend on the cue, so the frames after the
    cue are identical whatever it was. ``reset(options={"cue": i})`` forces choice object
    i as the cue. Twin: the cue colour stays in a top-left corner patch.
``shell-game`` (``memvla/ShellGame-v0``)
    Three raised cups with a red ball under one for ``cue_steps`` frames (default 4), the
    cups come down (2 frames), then ``n_swaps`` swaps (0..100, default 3) of two cups,
    each animated over ``swap_steps`` frames (default 4; one cup arcs over, one under);
    then touch the ball's cup, after ``ready_steps`` held frames (default 8).
    ``max_swaps`` (default None): each episode draws its number of swaps from [n_swaps,
    max_swaps]. Chance 1/3. Max steps cue_steps + 2 + max(n_swaps, max_swaps)·swap_steps +
    ready_steps + 25. The swaps are drawn independently of the ball, so the frames after
    the cover are identical whatever cup hid it. ``reset(options={"cue": slot})`` forces
    the ball's cup. Twin: the ball stays visible over its cup.
``seq-of-colors`` (``memvla/SeqOfColors-v0``)
    ``n_items`` colours (1..9, default 3) shown one after another at the centre,
    ``item_steps`` frames each (default 3), ``delay`` empty frames (default 10), then discs
    of those colours on a ring: touch them in the order shown (a touched disc vanishes, a
    wrong one fails), after ``ready_steps`` held frames (default 8) as in remember-color.
    Chance 1/n_items!. Max steps n_items·item_steps + delay + ready_steps + 12·n_items + 6.
    ``reset(options={"cue": [order]})`` forces the order. Twin: the colour to touch next
    stays visible as a patch in the top-left corner.
``take-it-back`` (``memvla/TakeItBack-v0``)
    A disc at a random start and a square zone outline elsewhere: grasp the disc (gripper
    closed on it), carry it into the zone; the zone takes it to its centre, turns solid
    and the scene pauses for ``delay`` steps (default 4, actions ignored), then the zone
    vanishes: bring the disc back and put it down (gripper open) at its start (within
    0.05; put down elsewhere fails). Nothing marks the start once the disc has left it.
    Chance = the area of the tolerance disc over the start area (about 0.02). Max steps
    40 + delay. Twin: a grey ring marks the start throughout.
``reach-color`` (``memvla/ReachColor-v0``)
    ``n_colors`` discs (2..9, default 3) on a ring, visible throughout; the instruction
    names the target colour ("touch the red ball"). No memory demand (the language
    grounding control); no twin (``memoryless=True`` is accepted and changes nothing).
    ``layout`` as in remember-color. Chance 1/n_colors. Max steps 25.
    ``reset(options={"cue": i})`` forces the target.
``unseen-names`` (``memvla/UnseenNames-v0``)
    The same scene in every episode (``n_objects`` discs, 2..5, default 3, of fixed colours
    in a row along the top; the effector starts near the middle of the bottom edge); the
    instruction names the target by a made-up word ("touch the dax") that
    always stands for the same object. ``names="train"`` draws from ``n_train_names``
    words (default 200), ``"test"`` from ``n_test_names`` others (default 20) never in
    training: their meaning is only in stored experience (:mod:`memvla.retrieval`). Chance
    1/n_objects. Max steps 25. ``reset(options={"name": w})`` forces the word,
    ``{"decoy": j}`` sends the expert to a wrong object (a failed episode).

``memory-maze`` (``memvla/MemoryMaze-v0``)
    Ego-centric, unlike the others: a first-person view of a ``maze_size`` grid maze
    (default 5) ray cast by :mod:`memvla.envs.raycast`, with ``observation.depth`` (S, S)
    metres, ``observation.pose`` (4, 4) world-from-camera and ``observation.intrinsics``
    (3, 3) (:mod:`memvla.envs.camera`); ``observation.state`` (4,) = (x, y, cos yaw,
    sin yaw); discrete actions forward / turn left / turn right / stop as one-hot (4,)
    vectors (an int or the nearest one-hot of any (4,) vector is accepted). A display
    guides a tour past ``n_markers`` coloured floor markers (default 2), then goes dark:
    go back to the marker the instruction names and stop on it, within the fewest actions
    plus ``return_slack``. Chance 1 / maze_size². ``reset(options={"cue": i})`` forces the
    target. Twin: the display keeps showing the way to the target, in its colour. Details
    in :mod:`memvla.envs.memory_maze`.

``parse_options(["delay=30", ...])`` reads ``KEY=VALUE`` task options as the command
line's ``--opt`` gives them.

Experts (:func:`make_expert`) read privileged state from ``env.unwrapped`` and move with a
saturating proportional controller (smooth, imitable); during cue and delay they park at a
fixed point that does not depend on the cue.
"""

from memvla.envs.base import ACTION_DIM, STATE_DIM, TaskEnv
from memvla.envs.experts import Expert
from memvla.envs.registry import (
    TASKS,
    TaskSpec,
    make,
    make_expert,
    parse_options,
    register_gym_envs,
    task_names,
)

register_gym_envs()

__all__ = [
    "ACTION_DIM",
    "STATE_DIM",
    "TASKS",
    "Expert",
    "TaskEnv",
    "TaskSpec",
    "make",
    "make_expert",
    "parse_options",
    "register_gym_envs",
    "task_names",
]
