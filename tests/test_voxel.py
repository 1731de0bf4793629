"""Voxel pruning of memory tokens: the pure functions against their slow twins and
analytic cases, and the slow-fast context pruning its slow memory with them."""

import math

import pytest
import torch
from helpers import narrow_config

from memvla.configs import ContextConfig
from memvla.layers.voxel import (
    VoxelPruner,
    backproject,
    patch_centres,
    voxel_keep,
    voxel_keep_ref,
)
from memvla.policies import make_policy


def _pose(yaw: float = 0.0, at=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """World-from-camera: a rotation about the camera's y axis (down) and a translation."""
    c, s = math.cos(yaw), math.sin(yaw)
    p = torch.eye(4)
    p[:3, :3] = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    p[:3, 3] = torch.tensor(at)
    return p


def _intrinsics(f: float = 32.0, size: int = 64) -> torch.Tensor:
    return torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])


def test_voxel_keep_equals_its_slow_twin():
    g = torch.Generator().manual_seed(0)
    for size in (0.1, 0.5, 2.0):
        points = torch.rand(3, 40, 3, generator=g) * 3 - 1  # (B, N, 3)
        valid = torch.rand(3, 40, generator=g) > 0.2  # (B, N)
        assert torch.equal(voxel_keep(points, valid, size), voxel_keep_ref(points, valid, size))


def test_exactly_one_token_per_occupied_voxel_and_it_is_the_newest():
    g = torch.Generator().manual_seed(1)
    points = torch.randint(0, 4, (2, 50, 3), generator=g).float() * 0.5 + 0.1  # (B, N, 3)
    valid = torch.ones(2, 50, dtype=torch.bool)
    keep = voxel_keep(points, valid, 0.5)
    for b in range(2):
        cells = {}
        for j in range(50):
            cells.setdefault(tuple((points[b, j] / 0.5).floor().long().tolist()), []).append(j)
        assert int(keep[b].sum()) == len(cells)
        for members in cells.values():
            assert [j for j in members if keep[b, j]] == [max(members)]


def test_a_camera_that_has_not_moved_keeps_one_token_per_voxel_however_many_frames_pass():
    depth = torch.full((1, 64, 64), 2.0)
    depth[:, :, 32:] = 3.5  # two walls at different depths
    uv, inside = patch_centres(4, 64, 64, 64)  # (16, 2)
    pts, valid = backproject(depth, _pose(0.3, (1, 0, 2))[None], _intrinsics()[None], uv)
    one = int(voxel_keep(pts, valid, 0.25).sum())
    for frames in (1, 3, 10):
        many = pts.repeat(1, frames, 1)  # (1, frames·16, 3): the same view, oldest first
        present = torch.ones(1, frames * 16, dtype=torch.bool)
        keep = VoxelPruner(0.25)(many, valid.repeat(1, frames), present)
        assert int(keep.sum()) == one
        assert bool(keep[0, -16:].sum() == one)  # and the tokens kept are the newest frame's


def test_backprojection_is_the_analytic_point():
    # a wall 2 m in front: the centre pixel is 2 m along the optical axis; a pixel f to the
    # right of the centre is 2 m to the right; the pose moves and turns the camera
    k = _intrinsics()[None]
    depth = torch.full((1, 64, 64), 2.0)
    uv = torch.tensor([[32.0, 32.0], [64.0 - 1e-3, 32.0]])  # the centre, the right edge
    pts, valid = backproject(depth, torch.eye(4)[None], k, uv)
    torch.testing.assert_close(pts[0, 0], torch.tensor([0.0, 0.0, 2.0]))
    torch.testing.assert_close(pts[0, 1], torch.tensor([2.0, 0.0, 2.0]), atol=1e-3, rtol=0)
    pose = _pose(math.pi / 2, (5.0, 0.0, 1.0))  # camera z now points along world +x
    pts, _ = backproject(depth, pose[None], k, uv[:1])
    torch.testing.assert_close(pts[0, 0], torch.tensor([7.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    depth[0, 32, 32] = float("inf")  # no depth there: no point
    assert not backproject(depth, pose[None], k, uv[:1])[1].any()


def test_patch_centres_undo_the_resize_and_padding():
    uv, inside = patch_centres(2, 64, 64, 64)
    assert uv.tolist() == [[16, 16], [48, 16], [16, 48], [48, 48]] and inside.all()
    # a 32 × 64 image (H × W) resized to 64 × 64 is scaled by 1 and padded 32 rows on top
    uv, inside = patch_centres(2, 64, 32, 64)
    assert inside.tolist() == [False, False, True, True]
    assert uv[2:].tolist() == [[16, 16], [48, 16]]


def test_bad_voxel_sizes_are_refused():
    for bad in (0, -0.5):
        with pytest.raises(ValueError, match=r"context.voxel_size must be > 0 metres \(or "
                           rf"None: no voxel pruning\), got {bad}"):
            ContextConfig(kind="slow_fast", voxel_size=bad)
    with pytest.raises(ValueError, match=r"context.voxel_size is an option of "
                       r"context.kind='frames', not of 'memory_tokens'"):
        ContextConfig(kind="memory_tokens", voxel_size=0.5)
    with pytest.raises(ValueError, match=r"context.frames_mode='mem' puts none there: "
                       r"expected 'tokens' or 'pooled', got 'mem'"):
        ContextConfig(kind="frames", frames_mode="mem", voxel_size=0.5)


# -- the slow-fast context with voxel pruning ------------------------------------------------------
def _policy():
    torch.manual_seed(0)
    cfg = narrow_config("tiny", extra=["model.num_steps=2", "context.kind=slow_fast",
                                       "context.num_turns=2", "context.num_history=4",
                                       "context.voxel_size=0.5"])
    return make_policy(cfg).eval()


def _obs(t: int, pose=None, **change) -> dict:
    g = torch.Generator().manual_seed(t)
    obs = {"observation.images.top": torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8,
                                                   generator=g),
           "observation.state": torch.randn(1, 3, generator=g), "task": ["go back"],
           "observation.depth": torch.full((1, 64, 64), 2.0),
           "observation.pose": (pose if pose is not None else _pose())[None],
           "observation.intrinsics": _intrinsics()}
    obs.update(change)
    return obs


def test_a_static_camera_keeps_one_frame_of_slow_tokens_and_a_moving_one_more():
    policy = _policy()
    grid = policy.model.context.memory_grid(policy.config.model.tokens_per_image)
    for moving in (False, True):
        policy.reset()
        for t in range(9):  # turns 0..8; from turn 4 the slow memory holds 4 frames
            pose = _pose(0.4 * t, (t, 0, 0)) if moving else None
            policy.predict_action_chunk(_obs(t, pose))
        last = policy.model.context.last_memory
        tokens, kept = int(last["tokens"][0]), int(last["kept"][0])
        assert tokens == 4 * grid * grid
        if moving:
            assert grid * grid < kept <= tokens
        else:
            assert kept <= grid * grid
    info = policy._stats({})
    assert info["memory_tokens"] == tokens and 0 <= info["memory_pruned_share"] < 1


def test_missing_or_bad_geometry_is_named():
    policy = _policy()
    obs = _obs(0)
    del obs["observation.depth"]
    with pytest.raises(ValueError, match=r"missing key 'observation.depth': "
                       r"context.voxel_size=0.5"):
        policy.predict_action_chunk(obs)
    with pytest.raises(ValueError, match=r"observation.depth: expected float depth of shape "
                       r"\(1, 64, 64\) \(the camera's resolution\), got torch.float32 "
                       r"\(1, 32, 32\)"):
        policy.predict_action_chunk(_obs(0, **{"observation.depth": torch.ones(1, 32, 32)}))
    sheared = _pose()
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match=r"observation.pose\[0\]: expected a rigid "
                       r"world-from-camera matrix"):
        policy.predict_action_chunk(_obs(0, sheared))
    with pytest.raises(ValueError, match=r"expected 1 camera, got 2"):
        narrow_config("tiny", extra=["context.kind=slow_fast", "context.voxel_size=0.5",
                                     'cameras=["top", "wrist"]'])


def test_voxel_pruning_streams_as_it_trains():
    policy = _policy()
    m = policy.config.model
    obs = [_obs(t, _pose(0.4 * t, (0.3 * t, 0, 0))) for t in range(7)]
    noise = torch.randn(1, m.chunk_size, m.max_action_dim)
    policy.reset()
    streamed = [policy.predict_action_chunk(o, noise=noise) for o in obs]
    carried = None  # the training path: the state carried by the segment losses
    for t, o in enumerate(obs):
        batch = {**o, "action": torch.zeros(1, m.chunk_size, 3),
                 "action_is_pad": torch.zeros(1, m.chunk_size, dtype=torch.bool)}
        state = policy._segment_state(batch, carried, 1)
        with torch.no_grad():
            x, _ = policy.model.sample_actions(*policy.encode_observation(o), noise,
                                               context_state=state)
            _, _, carried = policy._segment_losses(batch, carried)
        want = policy.normalizer.unnormalize("action", x[..., :3])
        assert (streamed[t] - want).abs().max().item() <= 1e-5, t


def test_segments_past_an_episodes_end_need_no_geometry():
    policy = _policy()
    obs = _obs(0)
    both = {k: (torch.cat([v, torch.zeros_like(v)]) if isinstance(v, torch.Tensor) and k !=
                "observation.intrinsics" else v) for k, v in obs.items()}
    both["task"] = obs["task"] * 2  # the second sample: zeros, past its episode's end
    with pytest.raises(ValueError, match=r"observation.pose\[1\]: expected a rigid"):
        policy._segment_state(both, None, 2)
    state = policy._segment_state({**both, "segment_is_pad": torch.tensor([False, True])},
                                  None, 2)
    assert state["geometry"]["points"].shape[0] == 2


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    """Two expert episodes of memory-maze, with depth, pose and intrinsics."""
    from memvla.data.record import generate_dataset

    root = tmp_path_factory.mktemp("maze") / "ds"
    generate_dataset("memory-maze", 2, root, seed=3, progress=False)
    return root


@pytest.mark.parametrize("kind", [
    ["context.kind=frames", "context.num_frames=2", "context.frame_stride=3"],
    ["context.kind=frames", "context.num_frames=3", "context.frame_stride=2",
     "context.frames_mode=pooled", "context.pool_stride=1"],
    ["context.kind=slow_fast", "context.num_turns=2", "context.num_history=4",
     "context.pool_stride=1"]],
    ids=["frames", "frames-pooled", "slow_fast"])
def test_voxel_pruning_on_memory_maze_streams_as_it_trains(kind, maze):
    from memvla.data.lerobot_v3 import LeRobotV3Dataset
    from memvla.data.segments import EpisodeSegmentLoader
    from memvla.policies.frames import FrameCollate, frame_delta_indices

    torch.manual_seed(0)
    cfg = narrow_config("tiny", extra=["model.num_steps=2", "n_action_steps=2", "state_dim=4",
                                       "action_dim=4", "tokenizer.max_length=32", *kind,
                                       "context.voxel_size=0.5"])
    policy = make_policy(cfg).eval()
    ds = LeRobotV3Dataset(maze)
    length = 16
    assert int(ds[length - 1]["episode_index"]) == 0  # every frame of the first episode
    keys = ("observation.images.top", "observation.state", "observation.depth",
            "observation.pose", "observation.intrinsics")
    frames = [{**{k: ds[t][k][None] for k in keys}, "task": [ds[t]["task"]]}
              for t in range(length)]
    m, n = cfg.model, cfg.n_action_steps
    noises = [torch.randn(1, m.chunk_size, m.max_action_dim) for _ in range(0, length, n)]
    policy.reset()
    streamed, kept = [], []
    for t, obs in enumerate(frames):
        if policy.queued_actions == 0:
            first = policy.select_action(obs, noise=noises[t // n])
            streamed.append(torch.stack([first, *policy._queue], 1))
            kept.append(dict(policy.model.context.last_memory))
        else:
            policy.select_action(obs)
    if cfg.context.recurrent:  # the training path: segments with their geometry
        ep = EpisodeSegmentLoader(ds, m.chunk_size, 1, shuffle=False, stride=n).collate([0])
        states, carried = [], None
        for s in range(len(streamed)):
            seg = ep.segment(s)
            states.append(policy._segment_state(seg, carried, 1))
            with torch.no_grad():
                _, _, carried = policy._segment_losses(seg, carried)
    else:
        hist = LeRobotV3Dataset(maze, delta_indices=frame_delta_indices(cfg))
        states = [policy._history_from_batch(FrameCollate(cfg)([hist[t]]))
                  for t in range(0, length, n)]
    for i, (chunk, state) in enumerate(zip(streamed, states, strict=True)):
        with torch.no_grad():
            x, _ = policy.model.sample_actions(*policy.encode_observation(frames[i * n]),
                                               noises[i], context_state=state)
        want = policy.normalizer.unnormalize("action", x[..., :4])[:, :n]
        assert (chunk - want).abs().max().item() <= 1e-5, i
    pruned = [k for k in kept if k and int(k["kept"][0]) < int(k["tokens"][0])]
    assert pruned, "voxel pruning never removed a token along the episode"


def test_a_checkpoint_prunes_by_voxel_when_loaded_with_the_option(tmp_path):
    from memvla.policies import load_policy

    torch.manual_seed(0)
    plain = make_policy(narrow_config("tiny", extra=["model.num_steps=2",
                                                     "context.kind=slow_fast"]))
    plain.save_pretrained(tmp_path / "sf")
    voxel = load_policy(tmp_path / "sf", device="cpu", overrides=["context.voxel_size=0.5"])
    assert voxel.config.context.voxel_size == 0.5 and voxel.model.context.voxel is not None
    for a, b in zip(plain.state_dict().values(), voxel.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # training-free: the same weights
    with pytest.raises(ValueError, match=r"weights do not match the config: \d+ missing keys"):
        load_policy(tmp_path / "sf", device="cpu", overrides=["context.kind=memory_tokens"])
