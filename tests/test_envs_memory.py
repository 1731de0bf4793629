"""memvla.envs: experts succeed, guessing stays near chance, the tasks really need memory."""

from __future__ import annotations

import numpy as np
import pytest

from memvla import envs
from memvla.envs import render
from memvla.envs.experts import goto_avoiding, hold, move_to
from memvla.envs.render import to_px
from memvla.envs.shell_game import SLOTS_X

MEMORY_TASKS = ["remember-color", "shell-game", "seq-of-colors", "take-it-back"]


def run_expert(env, seed, options=None):
    """One expert episode. Returns (success, frames (T+1, H, W, 3), actions (T, Da))."""
    expert = envs.make_expert(env)
    obs, info = env.reset(seed=seed, options=options)
    expert.reset()
    frames, actions = [obs["observation.images.top"]], []
    while True:
        a = expert.act(obs)
        assert a.shape == env.action_space.shape and a.dtype == np.float32
        assert np.all(np.abs(a) <= 1.0)
        obs, _, terminated, truncated, info = env.step(a)
        frames.append(obs["observation.images.top"])
        actions.append(a)
        if terminated or truncated:
            return info["is_success"], np.stack(frames), np.stack(actions)


def success_rate(name, episodes, **options):
    env = envs.make(name, **options)
    return np.mean([run_expert(env, seed)[0] for seed in range(episodes)])


@pytest.mark.parametrize("name", envs.task_names())
def test_expert_success_default_options(name):
    assert success_rate(name, 50) >= 0.98


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("remember-color", {"n_colors": 9, "delay": 0, "cue_steps": 1}),
        ("remember-color", {"n_colors": 5, "image_size": 32}),
        ("remember-color", {"n_colors": 9, "layout": "fixed"}),
        ("reach-color", {"n_colors": 9}),
        ("reach-color", {"layout": "fixed"}),
        ("seq-of-colors", {"n_items": 9}),
        ("seq-of-colors", {"n_items": 5, "delay": 0, "memoryless": True}),
        ("shell-game", {"n_swaps": 10, "swap_steps": 2}),
        ("take-it-back", {"delay": 0}),
        ("take-it-back", {"delay": 12}),
    ],
)
def test_expert_success_other_options(name, options):
    assert success_rate(name, 20, **options) >= 0.95


@pytest.mark.parametrize("name", MEMORY_TASKS)
def test_random_policy_stays_near_chance(name):
    env = envs.make(name)
    rng = np.random.default_rng(0)
    wins = 0
    episodes = 120
    for seed in range(episodes):
        env.reset(seed=seed)
        while True:
            a = rng.uniform(-1, 1, size=3).astype(np.float32)
            _, _, terminated, truncated, info = env.step(a)
            if terminated or truncated:
                wins += info["is_success"]
                break
    assert wins / episodes <= env.unwrapped.chance_level + 0.1
    assert wins / episodes < 0.5


@pytest.mark.parametrize("name", ["remember-color", "shell-game"])
def test_guessing_gets_chance(name):
    """A policy that knows the rules but not the cue (it picks a candidate at random when
    the choice phase starts) succeeds about 1/3 of the time: the choice is a real one."""
    env = envs.make(name)
    u = env.unwrapped
    rng = np.random.default_rng(1)
    wins, episodes = 0, 150
    home = np.array([0.5, 0.5]) if name == "remember-color" else np.array([0.5, 0.85])
    for seed in range(episodes):
        env.reset(seed=seed)
        guess = int(rng.integers(3))
        while True:
            if u.phase != "choice":
                a = np.zeros(3, np.float32)
            else:
                objects = u.positions if name == "remember-color" else u.cups  # (3, 2)
                others = np.delete(objects, guess, axis=0)
                a = goto_avoiding(u.eff, objects[guess], others, home)
            _, _, terminated, truncated, info = env.step(a)
            if terminated or truncated:
                wins += info["is_success"]
                break
    assert abs(wins / episodes - u.chance_level) < 0.12


def frames_per_cue(name, cues, seed, **options):
    """Frames of episodes that differ only in the forced cue, driven by the same actions."""
    actions = np.random.default_rng(seed).uniform(-0.4, 0.4, size=(200, 3)).astype(np.float32)
    out = []
    for cue in cues:
        env = envs.make(name, **options)
        obs, _ = env.reset(seed=seed, options={"cue": cue})
        frames = [obs["observation.images.top"]]
        for a in actions:
            obs, _, terminated, truncated, _ = env.step(a)
            frames.append(obs["observation.images.top"])
            if terminated or truncated:
                break
        out.append(np.stack(frames))
    return out, env.unwrapped.cue_end


@pytest.mark.parametrize(("name", "options"), [("remember-color", {}), ("shell-game", {}),
                                               ("remember-color", {"layout": "fixed",
                                                                   "palette_size": 3})])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frames_after_cue_do_not_depend_on_cue(name, options, seed):
    episodes, cue_end = frames_per_cue(name, [0, 1, 2], seed, **options)
    assert cue_end > 0
    lengths = {len(f) for f in episodes}
    assert len(lengths) == 1  # same actions, same scene: the episodes end together
    first = episodes[0]
    assert len(first) > cue_end + 5
    for other in episodes[1:]:
        assert not np.array_equal(first[:cue_end], other[:cue_end])  # the cue is shown...
        assert np.array_equal(first[cue_end:], other[cue_end:])  # ...and then never again


def colours_near(image: np.ndarray, x: float, y: float, radius_px: int) -> set[tuple]:
    """The colours painted within ``radius_px`` - 1 pixels of world point (x, y), without
    the background and the effector's grey."""
    s = image.shape[0]
    yy, xx = np.mgrid[:s, :s]
    inside = (yy - to_px(y, s)) ** 2 + (xx - to_px(x, s)) ** 2 <= (radius_px - 1) ** 2
    return {tuple(int(v) for v in c) for c in image[inside]} - {
        tuple(int(v) for v in render.BACKGROUND), tuple(int(v) for v in render.EFFECTOR)}


@pytest.mark.parametrize("memoryless", [False, True])
def test_remember_color_cue_has_the_colour_of_the_disc_that_succeeds(memoryless):
    """The cue frame shows one colour, the colour of the choice disc whose touch succeeds
    (and of none other); the twin's corner patch shows it throughout."""
    for seed, cue_option in [(s, {}) for s in range(6)] + [(7, {"cue": i}) for i in range(3)]:
        env = envs.make("remember-color", delay=2, memoryless=memoryless)
        obs, _ = env.reset(seed=seed, options=cue_option)
        u = env.unwrapped
        cue = colours_near(obs["observation.images.top"], 0.5, 0.5, u.r_px)
        assert len(cue) == 1
        expert = u.make_expert()
        while u.phase != "choice":
            obs, *_ = env.step(expert.act())
        image = obs["observation.images.top"]
        discs = [colours_near(image, x, y, u.r_px) for x, y in u.positions]
        assert [d == cue for d in discs] == [i == u.target for i in range(len(discs))]
        assert ({tuple(int(v) for v in image[1, 1])} == cue) is memoryless  # the twin's patch
        while True:  # the expert touches that disc: success
            obs, _, terminated, truncated, info = env.step(expert.act())
            if terminated or truncated:
                break
        assert info["is_success"]


def test_seq_of_colors_twin_shows_the_colour_to_touch_next():
    """The twin's corner patch has the colour of the next disc in the order, from the first
    frame to the last touch; the task without the twin paints nothing there."""
    for memoryless in (False, True):
        env = envs.make("seq-of-colors", n_items=3, delay=2, memoryless=memoryless)
        obs, _ = env.reset(seed=4)
        u, expert, seen = env.unwrapped, env.unwrapped.make_expert(), []
        while True:
            corner = tuple(int(v) for v in obs["observation.images.top"][1, 1])
            if u.n_done < u.n_items and (not seen or seen[-1][0] != u.n_done):
                seen.append((u.n_done, corner))
            obs, _, terminated, truncated, info = env.step(expert.act())
            if terminated or truncated:
                break
        assert info["is_success"] and [k for k, _ in seen] == [0, 1, 2]
        wanted = [tuple(int(v) for v in render.COLORS[u.color_ids[u.order[k]]]) for k in range(3)]
        background = tuple(int(v) for v in render.BACKGROUND)
        assert [c for _, c in seen] == (wanted if memoryless else [background] * 3)


@pytest.mark.parametrize("name", ["remember-color", "shell-game"])
def test_memoryless_twin_keeps_the_cue_visible(name):
    episodes, cue_end = frames_per_cue(name, [0, 1, 2], 0, memoryless=True)
    n = min(len(f) for f in episodes)
    for other in episodes[1:]:
        for t in range(cue_end, n):
            assert not np.array_equal(episodes[0][t], other[t])


def test_expert_does_not_reveal_the_cue_before_the_choice():
    """Expert actions before the choice objects appear are the same whatever the cue."""
    env = envs.make("remember-color", delay=10)
    start = env.unwrapped.cue_steps + env.unwrapped.delay
    runs = [run_expert(env, seed=5, options={"cue": c}) for c in range(3)]
    assert all(r[0] for r in runs)
    for _, _, actions in runs[1:]:
        assert np.array_equal(actions[:start], runs[0][2][:start])
        assert not np.array_equal(actions[start:], runs[0][2][start:])


def test_shell_game_swaps_are_continuous_and_track_the_ball():
    env = envs.make("shell-game", n_swaps=8)
    u = env.unwrapped
    for seed in range(10):
        env.reset(seed=seed)
        steps = np.hypot(*np.diff(u.traj, axis=0).transpose(2, 0, 1))  # (T-1, 3)
        assert steps.max() < 0.25  # cups glide: each cup is trackable frame to frame
        slot = int(np.argmin(np.abs(SLOTS_X - u.traj[0, u.ball_cup, 0])))
        for i, j in u.swaps:  # follow the ball by the swap list alone
            slot = j if slot == i else i if slot == j else slot
        assert np.isclose(u.traj[-1, u.ball_cup, 0], SLOTS_X[slot])


def test_touching_a_wrong_object_fails():
    env = envs.make("remember-color", delay=0, cue_steps=1)
    u = env.unwrapped
    env.reset(seed=0, options={"cue": 0})
    while True:
        a = np.zeros(3, np.float32) if u.phase != "choice" else None
        if a is None:
            a = goto_avoiding(u.eff, u.positions[1], u.positions[[0, 2]], np.array([0.5, 0.5]))
        _, _, terminated, truncated, info = env.step(a)
        if terminated or truncated:
            break
    assert terminated and not info["is_success"]


def test_seq_of_colors_wrong_order_fails():
    env = envs.make("seq-of-colors", n_items=3, delay=0)
    u = env.unwrapped
    env.reset(seed=0, options={"cue": [2, 0, 1]})
    while u.phase != "choice":
        env.step(np.zeros(3, np.float32))
    while True:
        a = goto_avoiding(u.eff, u.positions[0], u.positions[[1, 2]], np.array([0.5, 0.5]))
        _, _, terminated, truncated, info = env.step(a)
        if terminated or truncated:
            break
    assert terminated and not info["is_success"] and u.n_done == 0


def test_take_it_back_needs_a_grasp():
    env = envs.make("take-it-back")
    u = env.unwrapped
    env.reset(seed=0)
    start = u.obj.copy()
    away = np.array([0.0, 1.0, -1.0], np.float32)  # move down, gripper open
    if start[1] > 0.5:
        away[1] = -1.0
    for _ in range(12):  # reach the object with the gripper open
        env.step(move_to(u.eff, u.obj, gripper=-1.0))
    for _ in range(3):  # leave with the gripper open: the object stays
        env.step(away)
    assert np.array_equal(u.obj, start) and not u.attached
    for _ in range(12):  # reach it again, close the gripper on it, leave: it comes along
        env.step(move_to(u.eff, u.obj, gripper=-1.0))
    env.step(np.array([0.0, 0.0, 1.0], np.float32))
    assert u.attached and env.unwrapped.gripper_closed
    away[2] = 1.0
    obs, *_ = env.step(away)
    assert np.allclose(u.obj, u.eff)  # grasped at its centre, carried along
    assert abs(u.obj[1] - start[1]) > 0.05
    assert obs["observation.state"][2] == 1.0


@pytest.mark.parametrize("name", ["remember-color", "reach-color"])
def test_fixed_layout_keeps_the_places_and_moves_the_colours(name):
    places, colours = set(), set()
    for seed in range(12):
        env = envs.make(name, layout="fixed", n_colors=3).unwrapped
        env.reset(seed=seed)
        places.add(env.positions.round(9).tobytes())
        colours.add(tuple(env.color_ids))
    assert len(places) == 1 and len(colours) > 3
    random_places = set()
    for seed in range(4):
        env = envs.make(name, n_colors=3).unwrapped
        env.reset(seed=seed)
        random_places.add(env.positions.round(9).tobytes())
    assert len(random_places) == 4


def test_fixed_colors_keep_each_place_s_colour_and_only_the_cue_changes():
    frames, cues = set(), set()
    for seed in range(12):
        env = envs.make("remember-color", layout="fixed", colors="fixed", palette_size=3,
                        delay=2, cue_steps=1, image_size=32)
        env.reset(seed=seed)
        u = env.unwrapped
        assert list(u.color_ids) == [0, 1, 2]
        cues.add(u.target)
        expert = u.make_expert()
        while u.phase != "choice":
            obs, *_ = env.step(expert.act())
        frames.add(obs["observation.images.top"].tobytes())
    assert len(cues) == 3  # the cue still varies
    assert len(frames) == 1  # the choice frames are the same in every episode
    shuffled = set()
    for seed in range(12):
        env = envs.make("remember-color", layout="fixed", palette_size=3).unwrapped
        env.reset(seed=seed)
        shuffled.add(tuple(env.color_ids))
    assert len(shuffled) > 1


def test_bad_colors_option():
    with pytest.raises(ValueError,
                       match=r"'colors' must be one of \['shuffled', 'fixed'\], got 'sorted'"):
        envs.make("remember-color", colors="sorted")


@pytest.mark.parametrize("name", ["remember-color", "shell-game", "seq-of-colors"])
def test_choice_opens_with_a_hold_that_ignores_actions(name):
    env = envs.make(name, ready_steps=5)
    env.reset(seed=3)
    u = env.unwrapped
    expert = u.make_expert()
    while u.phase != "choice":
        env.step(expert.act())
    start = u.eff.copy()
    for _ in range(5):
        env.step(np.array([1.0, 1.0, 0.0]))  # ignored while held
    assert np.allclose(u.eff, start)
    env.step(np.array([1.0, 1.0, 0.0]))
    assert not np.allclose(u.eff, start)


@pytest.mark.parametrize(("name", "low", "high", "draw"), [
    ("remember-color", {"delay": 4}, {"max_delay": 12}, lambda u: u.episode_delay),
    ("shell-game", {"n_swaps": 0}, {"max_swaps": 4}, lambda u: len(u.swaps)),
])
def test_varied_delay_and_swaps_are_drawn_per_episode(name, low, high, draw):
    env = envs.make(name, **low, **high)
    u = env.unwrapped
    drawn = set()
    for seed in range(40):
        ok, frames, _ = run_expert(env, seed)
        assert ok
        drawn.add(draw(u))
        assert u.choice_start == (u.cue_steps + u.episode_delay if name == "remember-color"
                                  else u.cue_end + len(u.swaps) * u.swap_steps)
    assert drawn == set(range(next(iter(low.values())), next(iter(high.values())) + 1))
    fixed = envs.make(name, **low).unwrapped  # without max_*: the same episodes as before
    fixed.reset(seed=5)
    same = envs.make(name, **low, **{k: next(iter(low.values())) for k in high}).unwrapped
    same.reset(seed=5)
    assert np.array_equal(fixed.render(), same.render()) and fixed.choice_start == same.choice_start


@pytest.mark.parametrize("name", ["remember-color", "shell-game", "seq-of-colors"])
def test_expert_waits_while_held_unless_told_to_aim(name):
    """``ready_actions=wait`` (default): zero motion while held, so an action chunk that
    overlaps the start of the choice holds still before it; ``aim``: already moving."""
    for mode, moving in [("wait", False), ("aim", True)]:
        env = envs.make(name, ready_actions=mode)
        env.reset(seed=1)
        u = env.unwrapped
        expert = u.make_expert()
        held = []
        for _ in range(u.max_episode_steps):
            a = expert.act()
            if u._frozen():
                held.append(np.abs(a[:2]).max())
            _, _, terminated, truncated, info = env.step(a)
            if terminated or truncated:
                break
        assert info["is_success"] and len(held) == u.ready_steps
        assert (min(held) > 0.1) == moving and (max(held) == 0.0) == (not moving)


def test_bad_ready_actions_option():
    with pytest.raises(ValueError,
                       match=r"'ready_actions' must be one of \['wait', 'aim'\], got 'go'"):
        envs.make("shell-game", ready_actions="go")


def test_take_it_back_hides_the_way_in_and_needs_a_put_down():
    """Entering the zone takes the disc and the effector to its centre (the side it came in
    from, which points back to the start, is not left visible); carried over the start
    the disc does not succeed until put down there, and put down elsewhere it fails."""
    for put_down_at_start in (True, False):
        env = envs.make("take-it-back", delay=2)
        u = env.unwrapped
        env.reset(seed=3)
        expert = u.make_expert()
        while u.phase == "carry":
            env.step(expert.act())
        assert np.array_equal(u.obj, u.zone) and np.array_equal(u.eff, u.zone) and u.attached
        while u.phase != "return":
            env.step(expert.act())
        while np.hypot(*(u.obj - u.start)) >= 0.01:  # carried back onto the start
            _, _, terminated, _, _ = env.step(expert.act())
            assert not terminated and u.attached
        if not put_down_at_start:
            env.step(move_to(u.eff, u.zone, gripper=1.0))  # on, still holding it
        _, _, terminated, _, info = env.step(hold(-1.0))
        assert terminated and info["is_success"] is put_down_at_start
