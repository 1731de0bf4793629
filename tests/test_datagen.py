"""``memvla datagen`` (:mod:`memvla.data.record`) and ``memvla bench envs``: with a small fake
task (always) and with the built-in tasks of ``memvla.envs``."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pyarrow.parquet as pq
import pytest

from memvla import envs
from memvla.cli import main
from memvla.data.lerobot_v3 import LeRobotV3Dataset, load_stats, read_info
from memvla.data.record import generate_dataset, record_episode

IMG = "observation.images.top"


class FakeTask(gym.Env):
    """Move a dot towards a target; seed s gives 4 + s % 5 steps and fails when s % 3 == 2."""

    metadata = {"render_fps": 12}

    def __init__(self, size: int = 8, bonus: float = 0.0):
        self.size, self.bonus = size, bonus
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.observation_space = gym.spaces.Dict({
            IMG: gym.spaces.Box(0, 255, (size, size, 3), np.uint8),
            "observation.state": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
            "task": gym.spaces.Text(64),
        })

    def _obs(self):
        image = np.zeros((self.size, self.size, 3), np.uint8)
        image[self.t % self.size, self.seed_ % self.size] = (255, (10 * self.t) % 256, 7)
        state = np.array([self.t, self.seed_, self.bonus], np.float32)
        return {IMG: image, "observation.state": state, "task": f"reach target {self.seed_ % 2}"}

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.seed_, self.t = int(seed or 0), 0
        self.length = 4 + self.seed_ % 5
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        done = self.t >= self.length
        success = done and self.seed_ % 3 != 2
        return self._obs(), float(success), done, False, {"is_success": success}


class FakeExpert:
    def __init__(self, env):
        self.env = env

    def reset(self):
        self.calls = 0

    def act(self, obs):
        self.calls += 1
        return np.array([obs["observation.state"][0] / 10, -1.0], np.float32)


@pytest.fixture
def fake_envs(monkeypatch):
    monkeypatch.setattr(envs, "make", lambda name, **kw: FakeTask(**kw), raising=False)
    monkeypatch.setattr(envs, "make_expert", FakeExpert, raising=False)
    monkeypatch.setattr(envs, "task_names", lambda: ["fake"], raising=False)


def test_parse_options():
    assert envs.parse_options(["delay=30", "n-colors=3", "p=0.5", "flag=true", "name=red",
                          "xs=[1, 2]", "up=True"]) == {
        "delay": 30, "n_colors": 3, "p": 0.5, "flag": True, "name": "red", "xs": [1, 2],
        "up": True,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        envs.parse_options(["delay"])


def test_datagen_keeps_successful_episodes(fake_envs, tmp_path, capsys):
    out = tmp_path / "ds"
    code = main(["datagen", "--no-video", "--task", "fake", "--episodes", "5", "--out", str(out),
                 "--seed", "10", "--opt", "size=6", "--opt", "bonus=0.5", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "recorded 5 episodes" in printed and "success rate" in printed
    # seeds 10..16: seeds 11 and 14 fail, so 7 attempts give 5 successful episodes
    info = read_info(out)
    assert info["fps"] == 12 and info["total_episodes"] == 5
    assert info["memvla"]["attempts"] == 7 and info["memvla"]["options"] == {
        "size": 6, "bonus": 0.5}
    ds = LeRobotV3Dataset(out)
    seeds = [10, 12, 13, 15, 16]
    assert ds.episode_lengths.tolist() == [4 + s % 5 for s in seeds]
    assert info["features"][IMG]["shape"] == [6, 6, 3]
    env = FakeTask(size=6, bonus=0.5)
    for e, seed in enumerate(seeds):
        start, end = ds.episode_range(e)
        obs, _ = env.reset(seed=seed)
        images = [obs[IMG]]
        while len(images) < end - start:
            images.append(env.step(np.zeros(2))[0][IMG])
        np.testing.assert_array_equal(ds.get_numpy(IMG, np.arange(start, end)), np.stack(images))
        state = ds.get_numpy("observation.state", np.arange(start, end))
        np.testing.assert_array_equal(state[:, 0], np.arange(end - start))
        np.testing.assert_allclose(state[:, 2], 0.5)
        np.testing.assert_allclose(ds.get_numpy("action", np.arange(start, end))[:, 0],
                                   np.arange(end - start) / 10, rtol=1e-6)
        done = ds.get_numpy("next.done", np.arange(start, end))
        assert done.tolist() == [False] * (end - start - 1) + [True]
        assert bool(ds.get_numpy("next.success", np.array(end - 1)))
        assert ds[start]["task"] == f"reach target {seed % 2}"
    assert "action" in load_stats(out)
    # refuses to overwrite, unless asked
    assert main(["datagen", "--no-video", "--task", "fake", "--episodes", "1",
                 "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["datagen", "--no-video", "--task", "fake", "--episodes", "2", "--out", str(out),
                 "--keep", "all", "--seed", "2", "--overwrite", "--no-progress"]) == 0
    assert read_info(out)["total_episodes"] == 2  # seed 2 fails but is kept
    assert not list(tmp_path.glob(".ds.*"))  # no temporary directories left


def test_datagen_reports_too_few_successes(fake_envs, tmp_path, capsys):
    out = tmp_path / "ds"
    code = main(["datagen", "--no-video", "--task", "fake", "--episodes", "3", "--out", str(out),
                 "--seed", "2", "--max-attempts", "3", "--no-progress"])
    assert code == 1  # seeds 2, 3, 4: only two succeed
    assert "only 2 of 3" in capsys.readouterr().err
    assert read_info(out)["total_episodes"] == 2


def test_datagen_workers_give_the_same_dataset(fake_envs, tmp_path):
    tables = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["datagen", "--no-video", "--task", "fake", "--episodes", "6",
                     "--out", str(out), "--workers", str(workers), "--no-progress"]) == 0
        tables.append(pq.read_table(out / "data/chunk-000/file-000.parquet"))
        assert read_info(out)["memvla"]["attempts"] == 8
    assert tables[0].equals(tables[1])


def test_bench_envs_json(fake_envs, tmp_path, capsys):
    path = tmp_path / "envs.json"
    code = main(["bench", "envs", "--steps", "50", "--repeats", "2", "--episodes", "3",
                 "--json", str(path)])
    assert code == 0
    figures = json.loads(path.read_text())
    fake = figures["tasks"]["fake"]
    assert fake["steps_per_s"] > 0 and len(fake["runs"]) == 2
    assert fake["image_shapes"] == {IMG: [8, 8, 3]} and fake["target_steps_per_s"] == 2000
    assert fake["datagen"]["episodes_per_s"] > 0
    assert "fake" in capsys.readouterr().out


def _builtin_tasks() -> list[str]:
    if not hasattr(envs, "task_names"):
        return []
    return list(envs.task_names())


@pytest.mark.skipif(not _builtin_tasks(), reason="memvla.envs has no built-in tasks yet")
@pytest.mark.parametrize("task", _builtin_tasks())
def test_datagen_builtin_task(task, tmp_path):
    out = tmp_path / task
    assert main(["datagen", "--no-video", "--task", task, "--episodes", "3", "--out", str(out),
                 "--no-progress"]) == 0
    info = read_info(out)
    assert info["total_episodes"] == 3 and info["codebase_version"] == "v3.0"
    ds = LeRobotV3Dataset(out, delta_indices={"action": list(range(4))})
    env = envs.make(task)
    assert ds.fps == env.metadata["render_fps"]
    item = ds[0]
    obs, _ = env.reset(seed=0)
    h, w, c = obs[IMG].shape
    assert item[IMG].shape == (c, h, w)
    assert item["action"].shape == (4, *env.action_space.shape)
    assert item["observation.state"].shape == obs["observation.state"].shape
    assert item["task"] == obs["task"]
    np.testing.assert_array_equal(ds.get_numpy(IMG, np.array(0)), obs[IMG])
    last = [ds.episode_range(e)[1] - 1 for e in range(3)]
    assert all(bool(ds.get_numpy("next.success", np.array(i))) for i in last)


def test_perturbed_demonstrations_record_the_experts_action():
    """DART: the environment executes expert action + noise, the dataset records the
    expert's own action; the noise is seeded and leaves the gripper alone."""
    class Spy(gym.Wrapper):
        def step(self, action):
            self.executed.append(np.array(action))
            return self.env.step(action)

    def run(noise):
        env = Spy(envs.make("remember-color", delay=4, image_size=32))
        env.executed = []
        frames, _, success = record_episode(env, envs.make_expert(env), seed=3,
                                            action_noise=noise)
        return frames, np.stack(env.executed), success

    clean, executed, _ = run(0.0)
    np.testing.assert_array_equal(clean["action"], executed)  # no noise: the same actions
    frames, executed, success = run(0.3)
    diff = executed - frames["action"]  # (T, Da)
    assert success and np.abs(diff[:, :2]).max() > 0.05 and np.all(diff[:, 2] == 0)
    assert not np.allclose(frames["observation.state"][5:10], clean["observation.state"][5:10])
    again, executed2, _ = run(0.3)
    np.testing.assert_array_equal(executed, executed2)  # seeded
    with pytest.raises(ValueError, match="action_noise"):
        generate_dataset("remember-color", 1, "/nonexistent/never", action_noise=-1.0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"episodes": 0}, "--episodes must be at least 1, got 0"),
    ({"keep": "best"}, r"keep must be one of \['success', 'all'\], got 'best'"),
    ({"workers": 0}, "--workers must be at least 1, got 0"),
    ({"max_attempts": 0}, "--max-attempts must be at least 1, got 0"),
])
def test_generate_dataset_rejects_bad_requests_before_writing(kwargs, message, tmp_path):
    args = {"episodes": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_dataset("reach-color", out=tmp_path / "ds", progress=False, **args)
    assert not list(tmp_path.iterdir())


def test_datagen_writes_the_cameras_as_video_by_default(tmp_path):
    """As LeRobot does: the cameras as MP4 (AV1 where PyAV has it, else H.264), many
    episodes per file, each frame close to the exact one (lossy; that every frame is at its
    index is checked on distinct frames in test_dataset)."""
    out = tmp_path / "video"
    assert main(["datagen", "--task", "remember-color", "--episodes", "3", "--out", str(out),
                 "--opt", "image_size=32", "--no-progress"]) == 0
    info = read_info(out)
    ft = info["features"][IMG]
    assert ft["dtype"] == "video" and ft["info"]["video.codec"] in ("av1", "h264")
    assert info["video_path"].startswith("videos/{video_key}/")
    assert len(list((out / "videos").rglob("*.mp4"))) == 1  # the three episodes in one file
    png = tmp_path / "png"
    assert main(["datagen", "--no-video", "--task", "remember-color", "--episodes", "3",
                 "--out", str(png), "--opt", "image_size=32", "--no-progress"]) == 0
    want = LeRobotV3Dataset(png)
    n = len(want)
    exact = want.get_numpy(IMG, np.arange(n)).astype(int)
    for cache in (True, False):
        got = LeRobotV3Dataset(out, image_cache=cache).get_numpy(IMG, np.arange(n)).astype(int)
        assert np.abs(got - exact).reshape(n, -1).mean(1).max() < 8
