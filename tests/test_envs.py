"""memvla.envs: registry, spaces, determinism, gymnasium integration and bad inputs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from memvla import envs
from memvla.envs import memory_maze
from memvla.envs.render import COLOR_NAMES

BASE_TASKS = ["remember-color", "shell-game", "seq-of-colors", "take-it-back", "reach-color",
              "memory-maze", "unseen-names"]
ALL_TASKS = envs.task_names()
MAZE_DIMS = (memory_maze.STATE_DIM, memory_maze.ACTION_DIM)  # (Ds, Da) of memory-maze


def dims(name: str) -> tuple[int, int]:
    """(Ds, Da) of a task: the ego-centric maze has its own (discrete actions as one-hot)."""
    return MAZE_DIMS if name.startswith("memory-maze") else (envs.STATE_DIM, envs.ACTION_DIM)


def rollout(env, actions, seed, options=None):
    """Frames (T+1, H, W, 3), states and infos of ``env`` driven by ``actions`` (T, 3)."""
    obs, info = env.reset(seed=seed, options=options)
    frames, states, infos = [obs["observation.images.top"]], [obs["observation.state"]], [info]
    for a in actions:
        obs, _, terminated, truncated, info = env.step(a)
        frames.append(obs["observation.images.top"])
        states.append(obs["observation.state"])
        infos.append(info)
        if terminated or truncated:
            break
    return np.stack(frames), np.stack(states), infos


def test_registry_names():
    assert envs.task_names(include_twins=False) == BASE_TASKS
    for name in [*BASE_TASKS[:4], "memory-maze"]:
        assert f"{name}-memoryless" in envs.TASKS
        assert envs.TASKS[f"{name}-memoryless"].memoryless
    assert "reach-color-memoryless" not in envs.TASKS
    assert set(envs.TASKS) == set(ALL_TASKS)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_spaces_and_observation(name):
    env = envs.make(name)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["observation.images.top"].shape == (64, 64, 3)
    assert obs["observation.images.top"].dtype == np.uint8
    state_dim, action_dim = dims(name)
    assert obs["observation.state"].shape == (state_dim,)
    assert obs["observation.state"].dtype == np.float32
    assert isinstance(obs["task"], str) and obs["task"]
    assert env.action_space.shape == (action_dim,)
    assert info["is_success"] is False
    assert env.metadata["render_fps"] == 10
    assert 0 < env.unwrapped.chance_level < 1
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    assert isinstance(info["is_success"], bool)
    big = envs.make(name, image_size=96)
    assert big.reset(seed=0)[0]["observation.images.top"].shape == (96, 96, 3)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_same_seed_same_frames(name):
    actions = np.random.default_rng(0).uniform(-1, 1, size=(60, dims(name)[1])).astype(np.float32)
    f1, s1, i1 = rollout(envs.make(name), actions, seed=11)
    env2 = envs.make(name)
    env2.reset(seed=99)  # a previous episode must not matter
    f2, s2, i2 = rollout(env2, actions, seed=11)
    assert np.array_equal(f1, f2) and np.array_equal(s1, s2)
    assert [i["is_success"] for i in i1] == [i["is_success"] for i in i2]
    # a different seed gives a different episode (so the check above can fail)
    f3, _, _ = rollout(envs.make(name), actions, seed=12)
    n = min(len(f1), len(f3))
    assert not np.array_equal(f1[:n], f3[:n])


@pytest.mark.parametrize("name", BASE_TASKS[:5])  # memory-maze: see test_memory_maze.py
def test_instructions(name):
    env = envs.make(name)
    texts = {env.reset(seed=s)[0]["task"] for s in range(40)}
    assert len(texts) >= 2  # several phrasings
    for text in texts:
        named = [c for c in COLOR_NAMES if c in text.split()]
        # memory tasks never name a colour; reach-color always names the target's
        assert len(named) == (1 if name == "reach-color" else 0), text


def test_reach_color_names_the_target():
    env = envs.make("reach-color", n_colors=5)
    for seed in range(10):
        obs, _ = env.reset(seed=seed)
        target = COLOR_NAMES[env.unwrapped.color_ids[env.unwrapped.target]]
        assert target in obs["task"].split()


@pytest.mark.parametrize("name", ALL_TASKS)
def test_gymnasium_make(name):
    spec = envs.TASKS[name]
    env = gym.make(spec.gym_id, render_mode="rgb_array")
    check_env(env.unwrapped)
    obs, info = env.reset(seed=3)
    assert "is_success" in info
    assert np.array_equal(env.render(), obs["observation.images.top"])
    assert env.unwrapped.memoryless == spec.memoryless
    with_opts = gym.make(spec.gym_id, image_size=32)
    assert with_opts.reset(seed=0)[0]["observation.images.top"].shape == (32, 32, 3)


def test_time_limit_truncates():
    env = envs.make("remember-color", delay=2, max_episode_steps=9)
    env.reset(seed=0)
    for t in range(9):
        _, _, terminated, truncated, info = env.step(np.zeros(3, np.float32))
        assert not terminated
        assert truncated == (t == 8)
        assert info["is_success"] is False


def test_unknown_task_and_option():
    with pytest.raises(ValueError, match="Did you mean 'remember-color'") as e:
        envs.make("remember-colour")
    assert "shell-game" in str(e.value)  # the known names are listed
    with pytest.raises(ValueError, match="Did you mean 'delay'"):
        envs.make("remember-color", dealy=3)
    with pytest.raises(ValueError, match="memoryless"):
        envs.make("shell-game-memoryless", memoryless=False)


@pytest.mark.parametrize(
    ("name", "option", "value", "allowed"),
    [
        ("remember-color", "delay", -1, "[0, "),
        ("remember-color", "n_colors", 10, "[2, 9]"),
        ("remember-color", "n_colors", 1, "[2, 9]"),
        ("remember-color", "cue_steps", 0, "[1, "),
        ("reach-color", "n_colors", 12, "[2, 9]"),
        ("seq-of-colors", "n_items", 10, "[1, 9]"),
        ("seq-of-colors", "delay", -5, "[0, "),
        ("shell-game", "n_swaps", -1, "[0, "),
        ("shell-game", "swap_steps", 0, "[1, "),
        ("take-it-back", "delay", -2, "[0, "),
        ("take-it-back", "image_size", 8, "[16, 512]"),
        ("reach-color", "max_episode_steps", 0, "[1, "),
        ("remember-color", "delay", 2.5, "[0, "),
        ("remember-color", "max_delay", 10, "[30, "),  # below the default delay
        ("shell-game", "max_swaps", 2, "[3, "),  # below the default n_swaps
    ],
)
def test_out_of_range_options(name, option, value, allowed):
    with pytest.raises(ValueError) as e:
        envs.make(name, **{option: value})
    msg = str(e.value)
    assert repr(option) in msg and allowed in msg and f"got {value!r}" in msg


@pytest.mark.parametrize("name", ["remember-color", "reach-color"])
def test_bad_layout(name):
    with pytest.raises(ValueError,
                       match=r"'layout' must be one of \['random', 'fixed'\], got 'ring'"):
        envs.make(name, layout="ring")


def test_bad_reset_options():
    env = envs.make("remember-color")
    with pytest.raises(ValueError, match=r"'cue'.*\[0, 2\]"):
        env.reset(seed=0, options={"cue": 3})
    with pytest.raises(ValueError, match="permutation"):
        envs.make("seq-of-colors").reset(seed=0, options={"cue": [0, 0, 1]})
    with pytest.raises(ValueError, match="unknown reset option"):
        envs.make("take-it-back").reset(seed=0, options={"cue": 1})


@pytest.mark.parametrize(
    ("action", "match"),
    [
        (np.zeros(2, np.float32), r"shape \(3,\).*got shape \(2,\)"),
        (np.zeros((1, 3), np.float32), r"shape \(3,\).*got shape \(1, 3\)"),
        (np.zeros(4), r"shape \(3,\).*got shape \(4,\)"),
        (np.array([0.0, np.nan, 0.0]), r"\(3,\).*finite"),
        (np.array([np.inf, 0.0, 0.0]), r"\(3,\).*finite"),
        ("left", r"shape \(3,\)"),
    ],
)
def test_bad_actions(action, match):
    env = envs.make("reach-color")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(action)


def test_actions_are_clipped_and_lists_accepted():
    env = envs.make("take-it-back")
    env.reset(seed=0)
    x0 = env.unwrapped.eff.copy()
    env.step([5.0, 0.0, 0.0])  # clipped to one full-speed step
    assert np.isclose(env.unwrapped.eff[0] - x0[0], 0.08)


def test_make_expert_rejects_other_envs():
    with pytest.raises(ValueError, match="memvla"):
        envs.make_expert(gym.make("CartPole-v1"))
