"""memory-maze: the ray caster (analytic depth, the reference twin), camera poses and
intrinsics, grid moves, the expert, the memory demand, bad inputs, and recording depth and
pose as LeRobot v3.0 features."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from memvla import envs
from memvla.data.lerobot_v3 import LeRobotV3Dataset, LeRobotV3Writer, load_stats, read_info
from memvla.data.record import generate_dataset
from memvla.data.stats import array_stats, merge_array_stats
from memvla.envs import camera, raycast
from memvla.envs import grid_maze as gm
from memvla.envs.memory_maze import MARKER_COLORS, decode_action, one_hot
from memvla.envs.render import COLOR_NAMES

DEPTH, POSE, K_KEY, IMG = ("observation.depth", "observation.pose", "observation.intrinsics",
                           "observation.images.top")


def view(maze, x, y, yaw, size=32, fov=90.0, markers=None):
    k = camera.intrinsics(size, size, fov)
    caster = raycast.Raycaster(k, size, size)
    scene = raycast.make_scene(maze, markers)
    image, depth = caster.render(scene, camera.pose_from_yaw(x, y, raycast.CAMERA_HEIGHT, yaw))
    return image, depth, caster


def analytic(caster, column_depth):
    """Per-pixel depth: the wall at ``column_depth`` (W,) unless the floor or ceiling plane
    (both 0.5 m from the camera) is nearer along the row's ray."""
    plane = 0.5 / np.abs(caster.ys)  # (H,)
    return np.minimum(plane[:, None], column_depth[None, :])  # (H, W)


# -- the ray caster --------------------------------------------------------------------------------
@pytest.mark.parametrize(("x", "yaw", "far"), [(0.5, 0.0, 4.5), (3.5, np.pi, 3.5),
                                               (1.5, 0.0, 3.5)])
def test_corridor_depth_is_the_distance_to_the_walls(x, yaw, far):
    """A 5x1 corridor: a column sees the end wall at ``far`` unless a side wall (0.5 m to
    the side) is nearer along its ray: depth 0.5 / |slope|."""
    _, depth, caster = view(gm.open_room(5, 1), x, 0.5, yaw)
    column = np.minimum(far, 0.5 / np.abs(caster.xs))  # (W,)
    np.testing.assert_allclose(depth, analytic(caster, column), rtol=1e-6)
    assert depth.dtype == np.float32 and depth.shape == (32, 32)


@pytest.mark.parametrize("yaw", [0.0, 0.3, 1.0, np.pi / 2, 2.5, -2.0])
def test_box_depth_at_any_heading(yaw):
    """A 1x1 box seen from its centre: the ray forward + x·right meets the walls at
    t = 0.5 / max(|dx|, |dy|), which is the depth since forward·ray = 1."""
    _, depth, caster = view(gm.open_room(1, 1), 0.5, 0.5, yaw)
    dx = np.cos(yaw) + caster.xs * np.sin(yaw)  # (W,)
    dy = np.sin(yaw) - caster.xs * np.cos(yaw)
    np.testing.assert_allclose(depth, analytic(caster, 0.5 / np.maximum(np.abs(dx), np.abs(dy))),
                               rtol=1e-5)


def test_interior_wall_is_seen_in_front_of_the_far_wall():
    room = gm.open_room(3, 3)
    _, before, _ = view(room, 0.5, 1.5, 0.0)
    room.vwall[2, 1] = True  # the line X = 2, Y in [1, 2): straight ahead
    _, after, caster = view(room, 0.5, 1.5, 0.0)
    mid = [15, 16]  # the middle columns look along Y = 1.5
    np.testing.assert_allclose(before[16, mid], 2.5, rtol=1e-6)
    np.testing.assert_allclose(after[16, mid], 1.5, rtol=1e-6)
    # the columns whose ray meets X = 2 inside the wall's span see it, the others do not
    y_at = 1.5 - caster.xs * 1.5  # (W,) Y where each column's ray crosses X = 2
    inside = (y_at > 1.0) & (y_at < 2.0)
    np.testing.assert_allclose(after[16, inside], 1.5, rtol=1e-6)
    assert np.all(after[16, ~inside] > 1.5)


def test_vectorised_renderer_matches_the_reference():
    rng = np.random.default_rng(0)
    k = camera.intrinsics(24, 24, 75.0)
    caster = raycast.Raycaster(k, 24, 24)
    for n in (3, 5, 8):
        maze = gm.random_maze(rng, n, openings=3)
        markers = {(int(rng.integers(n)), int(rng.integers(n))): MARKER_COLORS[i] for i in range(3)}
        scene = raycast.make_scene(maze, markers)
        for _ in range(4):
            pose = camera.pose_from_yaw(*rng.uniform(0.05, n - 0.05, size=2), 0.5,
                                        rng.uniform(-np.pi, np.pi))
            image, depth = caster.render(scene, pose)
            ref_image, ref_depth = raycast.render_reference(scene, pose, k, 24, 24)
            np.testing.assert_allclose(depth, ref_depth, rtol=1e-6)
            assert (image != ref_image).any(-1).mean() < 0.01  # ties on texel edges at most


def test_textures_make_places_look_different():
    """Faces have their own textures: the views of the four walls of a box differ, and
    the wall colours are far from every marker colour."""
    views = [view(gm.open_room(1, 1), 0.5, 0.5, k * np.pi / 2)[0] for k in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(views[i], views[j])
    tex = raycast.position_textures((5, 5)).reshape(-1, 3).astype(int)  # (n, 3)
    gap = np.abs(tex[:, None, :] - MARKER_COLORS[None].astype(int)).sum(-1)  # (n, 4)
    assert gap.min() > 100


# -- camera: intrinsics, poses, unprojection -------------------------------------------------------
def test_intrinsics_match_the_field_of_view():
    k = camera.intrinsics(64, 48, 90.0)
    assert np.isclose(k[0, 0], 32.0) and k[0, 0] == k[1, 1]
    assert (k[0, 2], k[1, 2]) == (31.5, 23.5)
    # the image's left and right edges (-0.5 and W - 0.5) are at ±45°
    assert np.isclose(np.degrees(np.arctan((63.5 - k[0, 2]) / k[0, 0])), 45.0)


def test_unprojected_depth_lies_on_the_maze_surfaces():
    """Depth, pose and intrinsics of the observation agree: every pixel unprojects onto
    the floor (Z = 0), the ceiling (Z = 1) or a wall on a grid line (integer X or Y)."""
    env = envs.make("memory-maze", image_size=32)
    rng = np.random.default_rng(1)
    obs, _ = env.reset(seed=4)
    for _ in range(6):
        points = camera.unproject(obs[DEPTH], obs[K_KEY], obs[POSE])  # (H, W, 3)
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        off = np.minimum.reduce([np.abs(z), np.abs(z - 1), np.abs(x - np.round(x)),
                                 np.abs(y - np.round(y))])  # (H, W)
        assert off.max() < 1e-4
        obs = env.step(int(rng.integers(3)))[0]


def test_pose_moves_as_the_actions_say():
    """Forward moves the camera 1 m along its optical axis unless a wall closes that side
    of the cell; the turns rotate it ±90° about the vertical; the state is the pose's
    odometry; every pose is rigid."""
    env = envs.make("memory-maze")
    u = env.unwrapped
    rng = np.random.default_rng(0)
    bumps = moves = 0
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        for _ in range(40):
            a = int(rng.integers(3))  # forward / left / right (stop would end the return)
            before = obs[POSE].astype(np.float64)
            blocked = u.maze.blocked(u.cell, u.heading)
            obs, _, terminated, truncated, _ = env.step(one_hot(a))
            after = camera.check_pose(obs[POSE])
            forward = before[:3, 2]
            if a == gm.FORWARD:
                shift = 0.0 if blocked else 1.0
                bumps, moves = bumps + blocked, moves + (not blocked)
                np.testing.assert_allclose(after[:3, :3], before[:3, :3], atol=1e-6)
                np.testing.assert_allclose(after[:3, 3], before[:3, 3] + shift * forward, atol=1e-6)
            else:
                turn = np.pi / 2 if a == gm.LEFT else -np.pi / 2
                rz = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0],
                               [0, 0, 1]])
                np.testing.assert_allclose(after[:3, :3], rz @ before[:3, :3], atol=1e-6)
                np.testing.assert_allclose(after[:3, 3], before[:3, 3], atol=1e-6)
            x, y, c, s = obs["observation.state"]
            np.testing.assert_allclose([x, y, 0.5], after[:3, 3], atol=1e-6)
            np.testing.assert_allclose([c, s, 0.0], after[:3, 2], atol=1e-6)
            if terminated or truncated:
                break
    assert bumps > 0 and moves > 0  # both cases were seen


def test_observation_pose_is_opencv_world_from_camera():
    env = envs.make("memory-maze")
    obs, _ = env.reset(seed=0)
    u = env.unwrapped
    pose = camera.check_pose(obs[POSE])
    assert obs[POSE].dtype == np.float32 and obs[K_KEY].dtype == np.float32
    np.testing.assert_allclose(pose[:3, 1], [0, 0, -1])  # camera y is world down
    np.testing.assert_allclose(pose[:3, 3], [u.cell[0] + 0.5, u.cell[1] + 0.5, 0.5])
    heading = gm.HEADINGS[u.heading]
    np.testing.assert_allclose(pose[:2, 2], heading, atol=1e-7)  # camera z: the heading
    np.testing.assert_allclose(obs[K_KEY], camera.intrinsics(64, 64, 90.0), rtol=1e-6)


# -- grid moves and the expert ---------------------------------------------------------------------
def test_action_distances_match_a_forward_search():
    maze = gm.random_maze(np.random.default_rng(3), 4, openings=2)
    goal = (2, 1)
    dist = gm.action_distances(maze, goal)
    for cell in maze.cells():
        for k in range(4):
            seen, queue = {(cell, k): 0}, deque([(cell, k)])
            while queue:  # breadth-first search forwards until the goal cell
                state = queue.popleft()
                if state[0] == goal:
                    break
                for a in (gm.FORWARD, gm.LEFT, gm.RIGHT):
                    nxt = gm.step(maze, *state, a)
                    if nxt not in seen:
                        seen[nxt] = seen[state] + 1
                        queue.append(nxt)
            assert dist[cell[0], cell[1], k] == seen[state]


def run_expert(env, seed):
    expert = envs.make_expert(env)
    obs, info = env.reset(seed=seed)
    expert.reset()
    actions = []
    while True:
        a = expert.act(obs)
        assert a.shape == (4,) and a.dtype == np.float32 and a.sum() == 1.0
        actions.append(decode_action(a))
        obs, _, terminated, truncated, info = env.step(a)
        if terminated or truncated:
            return info["is_success"], actions


@pytest.mark.parametrize("name", ["memory-maze", "memory-maze-memoryless"])
def test_expert_succeeds_at_least_98_percent(name):
    env = envs.make(name)
    results = [run_expert(env, seed) for seed in range(120)]
    assert np.mean([ok for ok, _ in results]) >= 0.98
    assert all(acts[-1] == gm.STOP for _, acts in results)
    assert max(len(acts) for _, acts in results) <= env.unwrapped.max_episode_steps


@pytest.mark.parametrize("options", [{"maze_size": 3, "n_markers": 1},
                                     {"maze_size": 8, "n_markers": 4, "openings": 0},
                                     {"fov": 60.0, "image_size": 32, "return_slack": 0}])
def test_expert_other_options(options):
    env = envs.make("memory-maze", **options)
    assert np.mean([run_expert(env, seed)[0] for seed in range(20)]) >= 0.95


# -- the task: phases, display, memory demand ------------------------------------------------------
def hud(image):
    return image[:8, 28:36]  # the display's box at 64x64


def test_display_guides_the_tour_and_goes_dark_for_the_return():
    for memoryless in (False, True):
        env = envs.make("memory-maze", memoryless=memoryless)
        obs, _ = env.reset(seed=2)
        u = env.unwrapped
        expert = envs.make_expert(env)
        target = MARKER_COLORS[u.marker_colors[u.target]]
        while True:
            box = hud(obs[IMG])
            if u.phase == "tour":
                assert (box == 0).all(-1).sum() > 10 and (box == 235).all(-1).any()
            elif memoryless:
                assert (box == target).all(-1).any()  # the target's colour shows the way
            else:
                assert not (box == 0).all(-1).any()  # no box at all
            obs, _, terminated, truncated, info = env.step(expert.act(obs))
            if terminated or truncated:
                break
        assert info["is_success"] and u.phase == "return"


def test_instruction_names_the_target_colour():
    env = envs.make("memory-maze", n_markers=3)
    texts = set()
    for seed in range(30):
        obs, _ = env.reset(seed=seed)
        u = env.unwrapped
        named = [c for c in COLOR_NAMES if c in obs["task"].split()]
        assert named == [COLOR_NAMES[u.marker_colors[u.target]]]
        texts.add(obs["task"].replace(named[0], "X"))
        assert u.markers == [c for c in u.route if c in u.markers]  # all on the route
        assert u.route[0] not in u.markers and u.end not in u.markers
    assert len(texts) >= 2
    obs, _ = env.reset(seed=0, options={"cue": 2})
    assert env.unwrapped.target == 2


def test_target_is_out_of_sight_when_the_return_starts():
    """From the end cell, in none of the four headings does the target's colour show
    (in at least 95% of the episodes; the rest had no hidden layout)."""
    env = envs.make("memory-maze", image_size=32)
    u = env.unwrapped
    hidden = 0
    for seed in range(40):
        env.reset(seed=seed)
        target = MARKER_COLORS[u.marker_colors[u.target]]
        frames = [u.caster.render_at(u._scene, u.end[0] + 0.5, u.end[1] + 0.5, k * np.pi / 2)[0]
                  for k in range(4)]
        hidden += not any((f == target).all(-1).any() for f in frames)
    assert hidden >= 38


def test_stop_decides_and_the_return_has_a_time_limit():
    env = envs.make("memory-maze", return_slack=3)
    u = env.unwrapped
    expert = envs.make_expert(env)
    obs, _ = env.reset(seed=5)
    pose = obs[POSE]
    obs, _, terminated, _, _ = env.step(gm.STOP)  # stop does nothing during the tour
    assert not terminated and np.array_equal(obs[POSE], pose) and u.phase == "tour"
    while u.phase == "tour":
        obs, *_ = env.step(expert.act(obs))
    assert u.cell != u.target_cell
    _, reward, terminated, _, info = env.step(gm.STOP)  # stop on the wrong cell
    assert terminated and not info["is_success"] and reward == 0.0
    # running out of the return budget fails
    obs, _ = env.reset(seed=5)
    while u.phase == "tour":
        obs, *_ = env.step(expert.act(obs))
    budget = u.return_budget
    assert budget == u._waypoint_dist[u.target][(*u.cell, u.heading)] + 1 + 3
    for t in range(budget):
        _, _, terminated, _, info = env.step(gm.LEFT)
        assert terminated == (t == budget - 1) and not info["is_success"]


def test_random_policy_rarely_succeeds():
    env = envs.make("memory-maze")
    rng = np.random.default_rng(0)
    wins = 0
    for seed in range(60):
        env.reset(seed=seed)
        while True:
            _, _, terminated, truncated, info = env.step(rng.uniform(0, 1, size=4))
            if terminated or truncated:
                wins += info["is_success"]
                break
    assert wins / 60 <= 0.1


# -- bad input -------------------------------------------------------------------------------------
def test_decode_action():
    assert [decode_action(i) for i in range(4)] == [0, 1, 2, 3]
    assert decode_action(np.int64(2)) == 2
    assert decode_action([0.1, 0.7, 0.3, -1.0]) == gm.LEFT  # the nearest one-hot
    assert decode_action(one_hot(gm.STOP)) == gm.STOP
    for bad, match in [(4, r"action: expected an int in \[0, 4\).*got 4"),
                       (-1, r"got -1"), (True, "got True"),
                       (np.zeros(3), r"action: expected shape \(4,\).*got shape \(3,\)"),
                       ([0, np.nan, 0, 0], "finite"), ("left", "got 'left'")]:
        with pytest.raises(ValueError, match=match):
            decode_action(bad)


@pytest.mark.parametrize(("option", "value", "allowed"), [
    ("maze_size", 2, "[3, 9]"), ("maze_size", 10, "[3, 9]"), ("n_markers", 5, "[1, 4]"),
    ("n_markers", 0, "[1, 4]"), ("openings", -1, "[0, "), ("fov", 10.0, "[30.0, 150.0]"),
    ("fov", "wide", "[30.0, 150.0]"), ("return_slack", -2, "[0, "), ("image_size", 8, "[16, 512]"),
])
def test_bad_options_name_the_key_the_range_and_the_value(option, value, allowed):
    with pytest.raises(ValueError) as e:
        envs.make("memory-maze", **{option: value})
    msg = str(e.value)
    assert repr(option) in msg and allowed in msg and f"got {value!r}" in msg


def test_bad_reset_option_and_unknown_option():
    with pytest.raises(ValueError, match=r"'cue'.*\[0, 1\].*got 2"):
        envs.make("memory-maze").reset(seed=0, options={"cue": 2})
    with pytest.raises(ValueError, match="Did you mean 'maze_size'"):
        envs.make("memory-maze", maze_sise=4)


def test_non_rigid_pose_is_rejected():
    pose = camera.pose_from_yaw(0.5, 0.5, 0.5, 0.0)
    scaled = pose.copy()
    scaled[:3, :3] *= 1.1
    with pytest.raises(ValueError, match=r"pose: expected a rigid transform.*got max "):
        camera.check_pose(scaled)
    with pytest.raises(ValueError,
                       match=r"observation.pose: expected shape \(4, 4\).*got \(3, 4\)"):
        camera.check_pose(pose[:3], key="observation.pose")
    bottom = pose.copy()
    bottom[3] = (0, 0, 1, 1)
    with pytest.raises(ValueError, match=r"last row \[0, 0, 0, 1\].*got \[0.0, 0.0, 1.0, 1.0\]"):
        camera.check_pose(bottom)
    k = camera.intrinsics(16, 16, 90.0)
    caster, scene = raycast.Raycaster(k, 16, 16), raycast.make_scene(gm.open_room(2, 2))
    with pytest.raises(ValueError, match="rigid"):
        caster.render(scene, scaled)
    tilted = camera.pose_from_yaw(0.5, 0.5, 0.5, 0.0)
    tilted[:3, :3] = tilted[:3, :3] @ np.array([[1, 0, 0], [0, 0.8, -0.6], [0, 0.6, 0.8]])
    with pytest.raises(ValueError, match="level camera"):
        caster.render(scene, tilted)
    with pytest.raises(ValueError, match=r"inside the 2x2 maze.*got \(2.5, 0.5\)"):
        caster.render(scene, camera.pose_from_yaw(2.5, 0.5, 0.5, 0.0))


def test_depth_of_the_wrong_resolution_is_rejected(tmp_path):
    env = envs.make("memory-maze")
    obs, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match=r"depth: expected a depth map of shape \(64, 64\) "
                                         r"\(H, W\), got \(32, 32\)"):
        camera.unproject(obs[DEPTH][::2, ::2], obs[K_KEY], obs[POSE], shape=(64, 64))
    with pytest.raises(ValueError, match=r"intrinsics: expected shape \(3, 3\), got \(2, 2\)"):
        camera.unproject(obs[DEPTH], obs[K_KEY][:2, :2], obs[POSE])
    frames = {DEPTH: np.stack([obs[DEPTH]] * 3), "action": np.zeros((3, 4), np.float32)}
    writer = LeRobotV3Writer(tmp_path / "ds", fps=10)
    writer.add_episode(frames, task="t")
    frames[DEPTH] = frames[DEPTH][:, ::2, ::2]
    with pytest.raises(ValueError, match=r"'observation.depth': expected frames of shape "
                                         r"\(64, 64\), got \(32, 32\)"):
        writer.add_episode(frames, task="t")
    writer.abort()


# -- datasets --------------------------------------------------------------------------------------
def test_datagen_records_depth_pose_and_intrinsics(tmp_path):
    out = tmp_path / "maze"
    generate_dataset("memory-maze", 3, out, options={"image_size": 32}, progress=False)
    info = read_info(out)
    feats = info["features"]
    assert feats[DEPTH] == {"dtype": "float32", "shape": [32, 32], "names": None}
    assert feats[POSE]["shape"] == [4, 4] and feats[K_KEY]["shape"] == [3, 3]
    assert feats["action"]["shape"] == [4] and feats["observation.state"]["shape"] == [4]
    ds = LeRobotV3Dataset(out)
    env = envs.make("memory-maze", image_size=32)
    start, end = ds.episode_range(0)
    obs, _ = env.reset(seed=info["memvla"]["seeds"][0])  # the first attempt succeeded
    for i in range(start, end):  # the recording replays: same observations, one-hot actions
        item = ds[i]
        assert item[DEPTH].shape == (32, 32) and item[POSE].shape == (4, 4)
        np.testing.assert_array_equal(item[DEPTH].numpy(), obs[DEPTH])
        np.testing.assert_array_equal(item[POSE].numpy(), obs[POSE])
        np.testing.assert_array_equal(item[K_KEY].numpy(), obs[K_KEY])
        np.testing.assert_array_equal(ds.get_numpy(IMG, np.array(i)), obs[IMG])
        action = item["action"].numpy()
        assert sorted(action.tolist()) == [0, 0, 0, 1]
        obs, *_ = env.step(action)
    assert bool(ds.get_numpy("next.success", np.array(end - 1)))
    stats = load_stats(out)
    assert tuple(stats[DEPTH]["mean"].shape) == (1, 1) and tuple(stats[POSE]["std"].shape) == (1, 1)
    depths = ds.get_numpy(DEPTH, np.arange(len(ds)))  # (N, 32, 32)
    assert np.isclose(stats[DEPTH]["mean"].item(), depths.mean(), rtol=1e-5)
    assert np.isclose(stats[DEPTH]["max"].item(), depths.max())
    assert tuple(stats["observation.state"]["mean"].shape) == (4,)


def test_merged_array_stats_equal_the_stats_of_all_the_data():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 3, 5)) * (i + 1) for i, n in enumerate((4, 9, 2))]
    merged = merge_array_stats([array_stats(p) for p in parts])
    whole = array_stats(np.concatenate(parts))
    for key in ("min", "max", "mean", "std", "count"):
        np.testing.assert_allclose(merged[key], whole[key], rtol=1e-10)
    assert merged["q50"].shape == (1, 1)
