"""Actions as text tokens (the parallel family's ``model.action_head=text``): the tokens
round-trip to actions, the slots are causal, greedy decoding equals teacher forcing with
the decoded tokens, a tiny model learns a chunk, bad configs are named."""

import pytest
import torch
import torch.nn.functional as F
from helpers import narrow_config

from memvla.layers.action_tokens import (
    SYMBOLS,
    action_logits,
    actions_to_tokens,
    slot_inputs,
    tokens_to_actions,
)
from memvla.policies import make_policy
from memvla.presets import get_preset


def _policy(*extra):
    torch.manual_seed(0)
    return make_policy(narrow_config("tiny-oft-text", extra=list(extra)))


def _obs(b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"observation.images.top": torch.randint(0, 256, (b, 64, 64, 3), dtype=torch.uint8,
                                                    generator=g),
            "observation.state": torch.randn(b, 3, generator=g),
            "task": ["go back to the red marker"] * b}


def test_tokens_round_trip_to_actions():
    first, n = 100, 4
    ids = torch.tensor([[100, 103, 101, 102], [102, 102, 100, 103]])
    actions = tokens_to_actions(ids, first, n)  # (B, K, n) one-hot
    assert actions.shape == (2, 4, 4) and (actions.sum(-1) == 1).all()
    assert torch.equal(actions_to_tokens(actions, first), ids)
    assert torch.equal(slot_inputs(ids, 7), torch.tensor([[7, 100, 103, 101], [7, 102, 102, 100]]))
    assert SYMBOLS[4] == ("↑", "←", "→", "STOP")
    with pytest.raises(ValueError, match=r"action tokens must be ids 100..103, got \[99, 100\]"):
        tokens_to_actions(torch.tensor([[99, 100]]), first, n)


def test_slots_are_causal_and_the_prefix_does_not_see_them():
    policy = _policy().eval()
    model, cfg = policy.model, policy.config.model
    inputs = policy.encode_observation(_obs())
    a = slot_inputs(torch.full((2, 4), cfg.first_action_id), cfg.stop_token_id)
    b = a.clone()
    b[:, 2] = cfg.first_action_id + 3  # a later slot's input changes ...
    ha, seq, _ = model.action_hidden(*inputs, slot_ids=a)
    hb, _, _ = model.action_hidden(*inputs, slot_ids=b)
    torch.testing.assert_close(ha[:, :2], hb[:, :2])  # ... the slots before it do not
    assert not torch.allclose(ha[:, 2:], hb[:, 2:])
    full_a = model.hidden_states(model.encode(*inputs, slot_ids=a))
    full_b = model.hidden_states(model.encode(*inputs, slot_ids=b))
    real = seq.valid[:, : seq.action_start]  # (padding rows see nothing: left out)
    torch.testing.assert_close(full_a[:, : seq.action_start][real],
                               full_b[:, : seq.action_start][real])


def test_greedy_decoding_equals_teacher_forcing_with_the_decoded_tokens():
    policy = _policy().eval()
    model, cfg = policy.model, policy.config.model
    inputs = policy.encode_observation(_obs())
    actions, _ = model.predict(*inputs)  # (B, A, n) one-hot
    ids = actions_to_tokens(actions, cfg.first_action_id)  # (B, A)
    h, _, _ = model.action_hidden(*inputs, slot_ids=slot_inputs(ids, cfg.stop_token_id))
    logits = action_logits(model.language_model.lm_head(h), cfg.first_action_id, 4)
    assert torch.equal(logits.argmax(-1) + cfg.first_action_id, ids)
    chunk = policy.predict_action_chunk(_obs())  # one-hot, not unnormalised
    assert torch.equal(chunk, actions[..., :4])


def test_a_tiny_text_head_learns_a_chunk_with_the_loss_on_action_tokens_only():
    policy = _policy()
    targets = torch.tensor([[0, 0, 1, 3], [2, 2, 0, 3]])  # ↑ ↑ ← STOP, → → ↑ STOP
    batch = {**_obs(), "action": F.one_hot(targets, 4).float(),
             "action_is_pad": torch.tensor([[False] * 4, [False, False, False, True]])}
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, info = policy(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first and info["valid_steps"] == 7
    chunk = policy.eval().predict_action_chunk(_obs())
    assert torch.equal(chunk.argmax(-1)[0], targets[0])
    assert torch.equal(chunk.argmax(-1)[1, :3], targets[1, :3])  # the padded step is free


def test_bad_text_head_configs_are_named():
    with pytest.raises(ValueError, match=r"model.action_head must be one of \('l1', 'text'\), "
                       r"got 'tokens'"):
        get_preset("tiny-oft", ["model.action_head=tokens"])
    with pytest.raises(ValueError, match=r"reads the language-model head: set "
                       r"model.text.lm_head=true"):
        get_preset("tiny-oft-text", ["model.text.lm_head=false"])
    with pytest.raises(ValueError, match=r"expected policy.action_dim=4, got 3"):
        get_preset("tiny-oft-text", ["action_dim=3"])
    with pytest.raises(ValueError, match=r"uses the last 4 ids of the vocabulary as action "
                       r"tokens, but the tokenizer has \d+ tokens"):
        make_policy(get_preset("tiny-oft-text", [
            f"model.text.vocab_size={get_preset('tiny-oft').model.text.vocab_size}"]))


@pytest.mark.parametrize("kind", [["context.kind=memory_tokens", "context.layout=rmt"],
                                  ["context.kind=slow_fast", "context.num_turns=2",
                                   "context.num_history=1"]], ids=["rmt", "slow_fast"])
def test_the_text_head_streams_with_a_recurrent_context_as_it_trains(kind):
    policy = _policy(*kind).eval()
    obs = [_obs(1, seed=t) for t in range(4)]
    policy.reset()
    streamed = [policy.predict_action_chunk(o) for o in obs]
    carried = None  # the training path, fed the decoded tokens as targets
    for o, chunk in zip(obs, streamed, strict=True):
        batch = {**o, "action": chunk, "action_is_pad": torch.zeros(1, 4, dtype=torch.bool)}
        state = policy._segment_state(batch, carried, 1)
        with torch.no_grad():
            want, _ = policy.model.predict(*policy.encode_observation(o), context_state=state)
            _, _, carried = policy._segment_losses(batch, carried)
        assert torch.equal(want, chunk)
    assert policy.context_state is not None
