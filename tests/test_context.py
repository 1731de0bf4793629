"""The temporal-context interface: state trees (detach, select, batch), the registry, and
what every kind must do behind a policy: step-by-step inference with carried state equals
the episode training forward, ``reset()`` clears the state, the state changes from one
step to the next, a save/load round trip gives the same actions."""

import pytest
import torch
from helpers import episode_batch, narrow_config, params_without_gradient, write_episode

from memvla.configs import ContextConfig
from memvla.context import (
    CONTEXTS,
    TemporalContext,
    detach_state,
    make_context,
    map_state,
    select_state,
    state_batch,
    state_leaves,
)
from memvla.policies import load_policy, make_policy

KINDS = {"none": [],
         "memory_tokens": ["context.kind=memory_tokens", "context.num_tokens=3"],
         "memory_tokens-gated": ["context.kind=memory_tokens", "context.num_tokens=3",
                                 "context.memory_update=gated", "context.memory_noise=0.1",
                                 "context.memory_scale=match"],
         "memory_tokens-assoc": ["context.kind=memory_tokens", "context.num_tokens=3",
                                 "context.memory_update=associative",
                                 "context.memory_key_dim=8"],
         "frames": ["context.kind=frames", "context.num_frames=2", "context.frame_stride=3"],
         "frames-pooled": ["context.kind=frames", "context.num_frames=2",
                           "context.frame_stride=3", "context.frames_mode=pooled"],
         "frames-mem": ["context.kind=frames", "context.num_frames=3", "context.frame_stride=2",
                        "context.frames_mode=mem"],
         "slow_fast": ["context.kind=slow_fast", "context.num_turns=2", "context.num_history=2"],
         "slow_fast-slide": ["context.kind=slow_fast", "context.num_turns=2",
                             "context.window=slide", "context.num_history=1"],
         "ssm_state": ["context.kind=ssm_state"],
         # two entries for four chunks: entries merge on the way
         "bank": ["context.kind=bank", "context.bank_size=2", "context.bank_topk=2"],
         "bank-attention": ["context.kind=bank", "context.bank_size=2", "context.bank_topk=3",
                            "context.bank_read=attention"],
         "bank-chain": ["context.kind=bank", "context.bank_size=2", "context.bank_topk=2",
                        "context.bank_chain=true"],
         # the state also written from the frame 2 steps into each 4-step chunk
         "memory_tokens-observe": ["context.kind=memory_tokens", "context.num_tokens=3",
                                   "context.observe_every=2"],
         "slow_fast-observe": ["context.kind=slow_fast", "context.num_turns=2",
                               "context.num_history=2", "context.observe_every=2"],
         "bank-observe": ["context.kind=bank", "context.bank_size=2", "context.bank_topk=2",
                          "context.observe_every=2"],
         "ssm_state-observe": ["context.kind=ssm_state", "context.observe_every=2"],
         # items of a store of the test's episode (attached by _with_store)
         "experience": ["context.kind=experience", "context.store_chunk=4",
                        "context.store_topk=2"]}
MAMBA_ONLY = ("ssm_state",)  # the kinds of a Mamba backbone, and what it runs with
CASES = [(kind, preset) for kind in KINDS for preset in ("tiny", "tiny-oft")
         if not kind.startswith(MAMBA_ONLY)]
CASES += [(kind, "tiny-mamba") for kind in ("ssm_state", "ssm_state-observe", "none",
                                            "memory_tokens", "frames")]


def test_every_registered_kind_is_tested_here():
    assert {k.split("-")[0] for k in KINDS} == set(CONTEXTS)


def test_state_trees_detach_select_and_batch():
    a = torch.randn(2, 3, requires_grad=True)
    state = {"memory": a * 2, "frames": [torch.zeros(2, 4), torch.ones(2, 1, 5)], "t": 7}
    assert state_batch(state) == 2 and state_batch(None) is None
    assert len(state_leaves(state)) == 3
    d = detach_state(state)
    assert not d["memory"].requires_grad and d["t"] == 7 and detach_state(None) is None
    new = map_state(lambda x: x + 10, state)
    assert new["t"] == 7 and torch.equal(new["frames"][1], state["frames"][1] + 10)
    keep = torch.tensor([True, False])
    picked = select_state(keep, state, new)
    assert torch.equal(picked["frames"][1][0], state["frames"][1][0])
    assert torch.equal(picked["frames"][1][1], new["frames"][1][1])
    assert torch.equal(picked["memory"][1], new["memory"][1])
    assert select_state(keep, None, new) is new  # a fresh episode takes the new state


def test_registry_and_state_checks():
    assert type(make_context(ContextConfig(), 16, 4)) is TemporalContext
    ctx = make_context(ContextConfig(kind="memory_tokens", num_tokens=2), 16, 4)
    assert ctx.recurrent and ctx.initial_state(3).shape == (3, 2, 16)
    with pytest.raises(ValueError, match=r"observation batch size 2 differs from the 3 episodes "
                       r"whose memory_tokens state this policy holds; call reset\(\) first"):
        ctx.check_state(ctx.initial_state(3), 2)
    with pytest.raises(ValueError, match=r"context.kind must be one of \('none', "
                       r"'memory_tokens', 'frames', 'slow_fast', 'ssm_state', 'bank', "
                       r"'experience'\), "
                       r"got 'tape'"):
        ContextConfig(kind="tape")
    with pytest.raises(ValueError, match=r"context.num_frames is an option of "
                       r"context.kind='frames', not of 'memory_tokens': expected its default "
                       r"6, got 3"):
        ContextConfig(kind="memory_tokens", num_frames=3)
    with pytest.raises(ValueError, match=r"context.frame_stride must be > 0, got 0"):
        ContextConfig(kind="frames", frame_stride=0)


def _with_store(policy, root):
    """``policy`` reading a store of the dataset at ``root`` (context.kind=experience)."""
    if policy.model.context.retrieves:
        from memvla.retrieval import store_from_dataset

        c = policy.config
        policy.attach_experience(store_from_dataset(root, c.context.store_chunk,
                                                    c.n_action_steps, progress=False))
    return policy


def _obs(seg: dict) -> dict:
    return {k: seg[k] for k in ("observation.images.top", "observation.state", "task")}


def _training_states(policy, root, length: int) -> list:
    """The model state each predicted chunk reads, as training builds it: carried through
    the episode's segments (recurrent kinds) or from a frame sample (the others)."""
    from memvla.data.lerobot_v3 import LeRobotV3Dataset
    from memvla.data.segments import EpisodeSegmentLoader
    from memvla.policies.frames import FrameCollate, frame_delta_indices

    cfg, n = policy.config, policy.config.n_action_steps
    if cfg.context.recurrent:  # a segment per write: a chunk, or a write pass between
        stride = cfg.segment_stride
        ep = EpisodeSegmentLoader(LeRobotV3Dataset(root), cfg.model.chunk_size, 1,
                                  shuffle=False, stride=stride).collate([0])
        states, carried = [], None
        for s in range(ep.num_segments):
            if s * stride % n:
                carried = policy._segment_write(ep.segment(s), carried)
                continue
            states.append(carried if carried is not None else policy.model.initial_state(1))
            _, _, carried = policy._segment_losses(ep.segment(s), carried)
        return states
    ds = LeRobotV3Dataset(root, delta_indices=frame_delta_indices(cfg))
    return [policy._history_from_batch(FrameCollate(cfg)([ds[t]])) for t in range(0, length, n)]


def _chunk(policy, obs: dict, noise, state):
    """The chunk the model predicts from ``state`` (the training path's model state)."""
    inputs = policy.encode_observation(obs)
    if policy.config.family == "flow":
        x, _ = policy.model.sample_actions(*inputs, noise=noise, context_state=state)
    else:  # regressed: no noise
        x, _ = policy.model.predict(*inputs, context_state=state)
    return policy.normalizer.unnormalize("action", x[..., : policy.config.action_dim])


@pytest.mark.parametrize("kind, preset", CASES)
def test_a_kind_streams_as_it_trains_resets_changes_and_round_trips(kind, preset, tmp_path):
    from memvla.data.lerobot_v3 import LeRobotV3Dataset

    torch.manual_seed(0)
    steps = ["model.num_steps=2"] if preset != "tiny-oft" else []
    cfg = narrow_config(preset, extra=[*steps, "n_action_steps=4", *KINDS[kind]])
    policy = make_policy(cfg).eval()
    length, n, m = 13, 4, cfg.model
    write_episode(tmp_path / "ds", cfg, length)
    _with_store(policy, tmp_path / "ds")
    ds = LeRobotV3Dataset(tmp_path / "ds")
    frames = [{"observation.images.top": ds[t]["observation.images.top"][None],
               "observation.state": ds[t]["observation.state"][None], "task": [ds[t]["task"]]}
              for t in range(length)]
    noises = [torch.randn(1, m.chunk_size, m.max_action_dim) for _ in range(0, length, n)]

    def run(p) -> list:
        """Step through the episode with select_action: the chunk and the carried state of
        every step that predicts one."""
        p.reset()
        out = []
        for t, obs in enumerate(frames):
            predicts = p.queued_actions == 0
            first = p.select_action(obs, noise=noises[t // n] if predicts else None)
            if predicts:
                out.append((torch.stack([first, *p._queue], 1),
                            map_state(torch.clone, p.context_state)))  # (a ring is in place)
        return out

    steps = run(policy)
    # the training path: the model state each chunk reads, the same noise
    for (chunk, _), state, noise, t in zip(steps, _training_states(policy, tmp_path / "ds",
                                                                  length), noises,
                                           range(0, length, n), strict=True):
        want = _chunk(policy, frames[t], noise, state)[:, :n]
        assert (chunk - want).abs().max().item() <= 1e-5, (kind, t)
    carried = [state_leaves(s) for _, s in steps]
    if policy.model.context.stateful:  # a state that never changes is a bug
        assert all(not torch.equal(a[0], b[0]) for a, b in zip(carried, carried[1:],
                                                                  strict=False))
    else:
        assert all(c == [] for c in carried)
    policy.reset()
    assert policy.context_state is None
    assert torch.equal(run(policy)[0][0], steps[0][0])  # a fresh episode repeats itself
    # a save/load round trip gives the same actions, step after step
    loaded = _with_store(load_policy(policy.save_pretrained(tmp_path / "p"), device="cpu"),
                         tmp_path / "ds").eval()
    for (a, _), (b, _) in zip(run(loaded), steps, strict=True):
        torch.testing.assert_close(a, b)


def test_checkpoints_of_earlier_versions_load_under_todays_names(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = narrow_config("tiny", extra=KINDS["memory_tokens"])
    policy = make_policy(cfg)
    d = policy.save_pretrained(tmp_path / "p")
    weights = load_file(d / "model.safetensors")
    weights["memory_tokens.init"] = weights.pop("context.tokens.init")  # the earlier name
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    loaded = load_policy(d, device="cpu")
    assert torch.equal(loaded.model.context.tokens.init, policy.model.context.tokens.init)


def test_a_recurrent_model_needs_its_state():
    cfg = narrow_config("tiny", extra=KINDS["memory_tokens"])
    policy = make_policy(cfg)
    seg = episode_batch(cfg).segment(0)
    images, ids, pad, state = policy.encode_observation(_obs(seg))
    with pytest.raises(ValueError, match=r"context.kind='memory_tokens' needs its state"):
        policy.model.prefill(images, ids, pad, state)
    plain = make_policy(narrow_config("tiny"))
    assert plain.model.initial_state(2) is None


@pytest.mark.parametrize("preset", ["tiny", "tiny-oft"])
@pytest.mark.parametrize("kind", ["memory_tokens", "memory_tokens-gated", "memory_tokens-assoc",
                                  "frames",
                                  "frames-mem", "bank", "experience"])
def test_every_parameter_learns_with_each_kind_on_both_families(kind, preset, tmp_path):
    from memvla.data.lerobot_v3 import LeRobotV3Dataset
    from memvla.data.segments import EpisodeSegmentLoader
    from memvla.policies.frames import FrameCollate, frame_delta_indices

    cfg = narrow_config(preset, extra=["n_action_steps=4", *KINDS[kind]])
    policy = make_policy(cfg)
    write_episode(tmp_path / "ds", cfg, 13)
    _with_store(policy, tmp_path / "ds")
    if cfg.context.recurrent:
        batch = EpisodeSegmentLoader(LeRobotV3Dataset(tmp_path / "ds"), cfg.model.chunk_size,
                                     1, shuffle=False, stride=4).collate([0])
    else:
        ds = LeRobotV3Dataset(tmp_path / "ds", delta_indices=frame_delta_indices(cfg))
        batch = FrameCollate(cfg)([ds[0], ds[7], ds[12]])
    loss, _ = policy(batch)
    loss.backward()
    missing = params_without_gradient(policy.model)
    assert not missing


def test_a_checkpoint_of_another_context_kind_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    memory = make_policy(narrow_config("tiny", extra=[*KINDS["memory_tokens"]]))
    memory.save_pretrained(tmp_path / "memory")
    frames = make_policy(narrow_config("tiny", extra=[*KINDS["frames"]]))
    with pytest.raises(ValueError, match=r"config.json: a checkpoint of another temporal "
                       r"context: context.kind is 'memory_tokens' there, 'frames' here; "
                       r"context.num_tokens is 3 there, 4 here"):
        frames.load_weights(tmp_path / "memory")
    twin = make_policy(narrow_config("tiny", extra=[*KINDS["memory_tokens"]]))
    assert not torch.equal(twin.model.context.tokens.init, memory.model.context.tokens.init)
    twin.load_weights(tmp_path / "memory")  # the same kind loads, weights and normaliser
    for (k, a), b in zip(memory.model.state_dict().items(), twin.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
