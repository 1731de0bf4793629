"""π0.5 in the flow-matching family: the state discretised into the prompt, the flow time
conditioning the expert through adaptive RMSNorms with gated residuals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memvla.config_utils import apply_overrides
from memvla.configs import DecoderConfig
from memvla.layers.norm import AdaRMSNorm, gated_residual, rms_norm
from memvla.models.decoder import DecoderLayer
from memvla.policies import make_policy
from memvla.policies.processor import discretize_state, state_prompts
from memvla.presets import get_preset

PI05 = ["model.state_token=prompt", "model.time_conditioning=adarms",
        "model.expert.cond_dim=48", "tokenizer.max_length=96"]


def test_adaptive_norm_is_scale_shift_and_gate_of_the_rms_norm():
    torch.manual_seed(0)
    x, cond = torch.randn(2, 5, 8), torch.randn(2, 6)
    norm = AdaRMSNorm(8, 6, eps=1e-6)
    with torch.no_grad():
        norm.dense.weight.normal_()
    out, gate = norm(x, cond)
    scale, shift, want_gate = norm.dense(cond).chunk(3, -1)
    want = rms_norm(x, None, 1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert torch.allclose(out, want, atol=1e-6) and torch.equal(gate, want_gate[:, None])
    y = torch.randn(2, 5, 8)
    assert torch.allclose(gated_residual(x, y, gate), x + y * want_gate[:, None])
    with pytest.raises(ValueError, match="needs its condition"):
        norm(x, None)


def test_an_adaptive_layer_with_unit_modulation_is_the_plain_layer():
    """scale 0, shift 0, gate 1: the adaptive layer computes what the plain pre-norm layer
    (RMSNorm of weight 1) does with the same attention and MLP weights."""
    torch.manual_seed(0)
    base = dict(width=16, depth=1, heads=4, kv_heads=2, head_dim=4, mlp_dim=32)
    plain = DecoderLayer(DecoderConfig(**base))
    ada = DecoderLayer(DecoderConfig(**base, cond_dim=6))
    ada.load_state_dict({k: v for k, v in plain.state_dict().items() if "norm" not in k},
                        strict=False)
    with torch.no_grad():
        for norm in (ada.input_layernorm, ada.post_attention_layernorm):
            norm.dense.weight.zero_()
            norm.dense.bias.copy_(torch.cat([torch.zeros(32), torch.ones(16)]))
    x = torch.randn(2, 5, 16)
    cos, sin = torch.ones(2, 5, 4), torch.zeros(2, 5, 4)
    mask = torch.ones(2, 5, 5, dtype=torch.bool)
    assert torch.allclose(ada(x, cos, sin, mask, cond=torch.randn(2, 6)),
                          plain(x, cos, sin, mask), atol=1e-6)


def test_state_bins_are_numpys_digitize():
    x = torch.tensor([[-1.5, -1.0, -0.9999, -0.5, 0.0, 0.3, 0.99, 0.9922, 1.0, 2.0]])
    want = np.digitize(x.numpy().astype(np.float64), np.linspace(-1, 1, 257)[:-1]) - 1
    assert discretize_state(x).tolist() == want.tolist()
    assert state_prompts(["pick_up the\ncube "], torch.tensor([[-1.0, 0.0, 0.999]])) == [
        "Task: pick up the cube, State: 0 128 255;\nAction: "]


def test_pi05_policy_writes_the_state_into_the_prompt_and_conditions_on_time():
    cfg = apply_overrides(get_preset("tiny"), PI05)
    torch.manual_seed(0)
    policy = make_policy(cfg)
    model = policy.model
    assert not hasattr(model, "state_proj") and hasattr(model, "time_mlp_in")
    obs = {"observation.images.top": torch.rand(1, 3, 64, 64), "task": ["touch the red ball"]}
    a = policy.encode_observation({**obs, "observation.state": torch.zeros(1, 3)})
    b = policy.encode_observation({**obs, "observation.state": torch.full((1, 3), 0.5)})
    assert not torch.equal(a[1], b[1])  # other token ids: the state is in the prompt
    # the expert's output depends on the time through its norms alone
    images, ids, pad, state = a
    cache, _ = model.prefill(images, ids, pad, state)
    x = torch.randn(1, cfg.model.chunk_size, cfg.model.max_action_dim)
    v1 = model.velocity(cache, state, x, torch.tensor([0.2]))
    v2 = model.velocity(cache, state, x, torch.tensor([0.8]))
    assert not torch.allclose(v1, v2)


def test_pi05_options_are_checked():
    with pytest.raises(ValueError, match="model.expert.cond_dim must be 48"):
        apply_overrides(get_preset("tiny"), ["model.time_conditioning=adarms"])
    with pytest.raises(ValueError, match="model.time_conditioning must be one of"):
        apply_overrides(get_preset("tiny"), ["model.time_conditioning=film"])
    with pytest.raises(ValueError, match="model.expert.cond_dim must be 0"):
        apply_overrides(get_preset("tiny"), ["model.expert.cond_dim=48"])
