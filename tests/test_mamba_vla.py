"""The Mamba backbone of the flow-matching VLA (``model.backbone=mamba``, RoboMamba): the
padded prefix, the fixed-size state, the configs it refuses. (Step-by-step equals the
episode training forward in tests/test_context.py, with every other context check.)"""

import pytest
import torch

from memvla.context import state_leaves
from memvla.policies import make_policy
from memvla.presets import get_preset


def _obs(tasks: list[str], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = len(tasks)
    return {"observation.images.top": torch.randint(0, 256, (b, 64, 64, 3), dtype=torch.uint8,
                                                    generator=g),
            "observation.state": torch.randn(b, 3, generator=g), "task": tasks}


def _policy(*extra):
    torch.manual_seed(0)
    return make_policy(get_preset("tiny-mamba", ["model.num_steps=2", *extra])).eval()


def test_padding_changes_neither_the_actions_nor_the_state():
    short, long = _policy(), _policy("tokenizer.max_length=40")  # 16 more padding tokens
    long.load_state_dict(short.state_dict())
    noise = torch.randn(2, 8, 8)
    tasks = ["go", "touch the red disc and then go back to the start"]
    for t in range(3):
        a = short.predict_action_chunk(_obs(tasks, t), noise=noise)
        b = long.predict_action_chunk(_obs(tasks, t), noise=noise)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for x, y in zip(state_leaves(short.context_state), state_leaves(long.context_state),
                    strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_the_carried_state_has_a_fixed_size_whatever_the_episode_length():
    policy = _policy()
    sizes = []
    for t in range(12):
        policy.predict_action_chunk(_obs(["go back"], t))
        sizes.append(sum(x.numel() for x in state_leaves(policy.context_state)))
    assert len(set(sizes)) == 1
    cfg = policy.config.model
    inner = cfg.mamba.expand * cfg.text.width
    assert sizes[0] == cfg.text.depth * inner * (cfg.mamba.d_conv - 1 + cfg.mamba.d_state)


def test_configs_a_mamba_backbone_refuses_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"context.kind='ssm_state' carries a Mamba backbone's "
                       r"recurrent state: expected model.backbone='mamba', got 'transformer'"):
        get_preset("tiny", ["context.kind=ssm_state"])
    with pytest.raises(ValueError, match=r"context.kind='slow_fast' keeps earlier turns in a KV "
                       r"cache; a Mamba backbone carries them in its state"):
        get_preset("tiny-mamba", ["context.kind=slow_fast"])
    with pytest.raises(ValueError, match=r"model.backbone must be one of \('transformer', "
                       r"'mamba'\), got 'rwkv'"):
        get_preset("tiny", ["model.backbone=rwkv"])
    make_policy(get_preset("tiny")).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"a checkpoint of another backbone: model.backbone is "
                       r"'transformer' there, 'mamba' here"):
        _policy("context.kind=none").load_weights(tmp_path / "plain")


def test_a_mixer_leaves_its_state_where_the_real_tokens_end():
    from memvla.layers.mamba import MambaMixer

    torch.manual_seed(0)
    mixer = MambaMixer(16, 32, d_state=4, d_conv=4)
    x = torch.randn(2, 7, 16)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    y, state = mixer(x, mask=mask)
    y1, s1 = mixer(x[1:, :3])  # the second sequence without its padding
    torch.testing.assert_close(y[1:, :3], y1)
    torch.testing.assert_close(state.conv[1:], s1.conv)
    torch.testing.assert_close(state.ssm[1:], s1.ssm)
    with pytest.raises(ValueError, match=r"mask must hold each sequence's real tokens first"):
        mixer(x, mask=torch.tensor([[True] * 7, [False, True] + [False] * 5]))
