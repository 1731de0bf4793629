"""The segment-recurrent text LM (LM-RMT): streaming, the XL cache, truncated BPTT over the
memory, bad configurations, and a tiny copy task that only the memory can solve."""

from __future__ import annotations

import pytest
import torch

from memvla.configs import DecoderConfig
from memvla.layers.masks import block_mask
from memvla.models.copy_tasks import (
    ANSWER,
    BLANK,
    CopyTaskConfig,
    make_batch,
    train_copy,
    variant_config,
)
from memvla.models.text_lm import SegmentRecurrentLM, TextLMConfig

V = 12


def dec(depth: int = 2, vocab: int = V) -> DecoderConfig:
    return DecoderConfig(width=32, depth=depth, heads=4, kv_heads=2, head_dim=8, mlp_dim=64,
                         vocab_size=vocab)


def lm(**kw) -> SegmentRecurrentLM:
    kw.setdefault("segment_len", 4)
    return SegmentRecurrentLM(TextLMConfig(dec(kw.pop("depth", 2)), **kw)).eval()


VARIANT_KW = {
    "none": {},
    "cache": {"mem_len": 6},  # not a multiple of segment_len: crops inside a segment
    "memory_rmt": {"num_mem_tokens": 3},
    "memory_smolvla": {"num_mem_tokens": 3, "mem_layout": "smolvla"},
    "memory_cache": {"num_mem_tokens": 2, "mem_len": 4},
}


@pytest.mark.parametrize("name", list(VARIANT_KW))
def test_streaming_equals_full_forward(name):
    model = lm(**VARIANT_KW[name])
    ids = torch.randint(0, V, (2, 18))  # 5 segments, the last one of 2 tokens
    with torch.no_grad():
        full = model(ids).logits  # (B, T, V)
        state = model.init_state(2)
        steps = []
        for s in range(5):
            out, state = model.step_segment(state, ids[:, 4 * s:4 * s + 4])
            steps.append(out)
            if model.cfg.mem_len:
                assert len(state.cache) == min(model.cfg.mem_len, ids[:, :4 * s + 4].shape[1])
        split = model(ids[:, :8]).state  # two calls carrying the state
        second = model(ids[:, 8:], state=split).logits
    assert state.segment == 5
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(second, full[:, 8:], atol=1e-5, rtol=0)


def test_unbounded_xl_cache_is_a_causal_decoder_over_the_whole_sequence():
    # Cached keys are rotated back by each segment's length, so with the whole past cached
    # (and no memory tokens) the model is the plain causal decoder over the sequence.
    model = lm(mem_len=100, segment_len=5)
    ids = torch.randint(0, V, (2, 23))
    with torch.no_grad():
        got = model(ids).logits  # (B, T, V)
        t = ids.shape[1]
        pos = torch.arange(t)[None].expand(2, t)  # (B, T)
        mask = block_mask(torch.ones(2, t, dtype=torch.long))  # (B, T, T)
        want = model.lm_head(model.decoder(model.decoder.embed(ids), pos, mask))  # (B, T, V)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _changed_segments(model, segment_len=4, segments=4) -> list[bool]:
    """Which segments' logits change when only segment 0's tokens change."""
    ids = torch.randint(2, V, (2, segment_len * segments))
    other = ids.clone()
    other[:, :segment_len] = (ids[:, :segment_len] + 1 - 2) % (V - 2) + 2
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits  # (B, T, V)
    return [not torch.equal(a[:, s * segment_len:(s + 1) * segment_len],
                            b[:, s * segment_len:(s + 1) * segment_len])
            for s in range(segments)]


def test_what_reaches_later_segments():
    assert _changed_segments(lm()) == [True, False, False, False]
    assert _changed_segments(lm(num_mem_tokens=2)) == [True, True, True, True]
    # A one-segment cache reaches one segment further back per layer: depth 2 -> 2 segments.
    assert _changed_segments(lm(mem_len=4)) == [True, True, True, False]
    assert _changed_segments(lm(mem_len=4, depth=1)) == [True, True, False, False]


def _grads(k: int, loss_segment: int, **kw):
    """Gradients, from the loss of one segment only, of the initial memory and of the
    embedding of a token that occurs in segment 0 only."""
    model = lm(num_mem_tokens=2, mem_backprop_depth=k, **kw).train()
    ids = torch.randint(0, V - 1, (2, 12))  # 3 segments of 4
    ids[:, 1] = V - 1  # only in segment 0
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 4 * loss_segment:4 * loss_segment + 4] = True
    model(ids, ids, mask).loss.backward()
    init = model.memory.init.grad
    emb = model.decoder.embed_tokens.weight.grad[V - 1]
    return (0.0 if init is None else init.abs().max().item()), emb.abs().max().item()


def test_mem_backprop_depth_truncates_the_gradient_through_the_memory():
    assert _grads(0, 1) == (0.0, 0.0)  # detached at every segment
    assert min(_grads(1, 1)) > 0  # segment 1's loss reaches segment 0
    assert _grads(1, 2) == (0.0, 0.0)  # detached before segment 2 (2 % 2 == 0)
    assert min(_grads(-1, 2)) > 0  # the whole sequence
    assert min(_grads(2, 2)) > 0
    # a depth of at least the number of segments (3) is the whole sequence, not an error
    torch.manual_seed(0)
    whole = _grads(-1, 2)
    for k in (3, 4, 10):
        torch.manual_seed(0)
        assert _grads(k, 2) == whole
    assert _grads(0, 1, mem_layout="smolvla") == (0.0, 0.0)
    assert min(_grads(1, 1, mem_layout="smolvla")) > 0


def test_xl_cache_keys_are_detached():
    model = lm(mem_len=4).train()
    ids = torch.randint(0, V - 1, (2, 8))
    ids[:, 1] = V - 1  # only in segment 0, which segment 1 sees through the cache
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 4:] = True
    out = model(ids, ids, mask)
    assert all(not k.requires_grad and not v.requires_grad
               for k, v in zip(out.state.cache.keys, out.state.cache.values, strict=True))
    out.loss.backward()
    assert model.decoder.embed_tokens.weight.grad[V - 1].abs().max().item() == 0.0
    assert model.lm_head.weight.grad.abs().max().item() > 0


@pytest.mark.parametrize("kw, match", [
    ({"num_mem_tokens": -1}, r"num_mem_tokens must be >= 0"),
    ({"mem_layout": "xl"}, r"mem_layout must be one of \('smolvla', 'rmt'\).*'xl'"),
    ({"mem_backprop_depth": -2}, r"mem_backprop_depth must be -1.*got -2"),
    ({"mem_len": -1}, r"mem_len must be >= 0"),
    ({"segment_len": 0}, r"segment_len must be > 0"),
])
def test_bad_config_is_an_actionable_error(kw, match):
    with pytest.raises(ValueError, match=match):
        TextLMConfig(dec(), **kw)


def test_bad_inputs_are_actionable_errors():
    with pytest.raises(ValueError, match=r"vocab_size must be > 0"):
        TextLMConfig(dec(vocab=0))
    model = lm(num_mem_tokens=2)
    with pytest.raises(ValueError, match=r"1 <= T <= segment_len \(4\)"):
        model.step_segment(model.init_state(1), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"state is for batch 2.*init_state\(1\)"):
        model.step_segment(model.init_state(2), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"needs mem_tokens > 0"):
        variant_config("memory", dec(), 4, mem_tokens=0)
    with pytest.raises(ValueError, match=r"task must be one of \('copy', 'reverse'\)"):
        CopyTaskConfig("sort")


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_copy_task_layout(task):
    cfg = CopyTaskConfig(task, alphabet=5, length=6, segment_len=4, gap_segments=2)
    ids, targets, mask = make_batch(cfg, 3, torch.Generator().manual_seed(0))
    assert ids.shape == (3, (2 + 2 + 2) * 4) and cfg.answer_start == 16
    symbols = ids[:, :6]
    assert ((symbols >= 2) & (symbols < 7)).all()
    assert (ids[:, 6:16] == BLANK).all() and (ids[:, 16:22] == ANSWER).all()
    assert (ids[:, 22:] == BLANK).all()
    want = symbols if task == "copy" else symbols.flip(1)
    assert torch.equal(targets[:, 16:22], want) and torch.equal(mask.sum(1), torch.full((3,), 6))
    assert mask[:, 16:22].all()


@pytest.fixture
def one_thread():
    # A tiny model trains fastest on one thread, and steadily when the CPU is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_copy_task_needs_the_memory(one_thread):
    # 4 symbols in segment 0, 2 blank segments, the answer in segment 3.
    task = CopyTaskConfig("copy", alphabet=8, length=4, segment_len=4, gap_segments=2)
    d = DecoderConfig(width=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64,
                      vocab_size=task.vocab_size)
    acc = {}
    for variant in ("memory", "none"):
        cfg = variant_config(variant, d, task.segment_len, mem_tokens=4)
        fig, _ = train_copy(cfg, task, steps=200, batch=32, lr=5e-3, seed=0, eval_size=256)
        acc[variant] = fig["token_accuracy"]
    assert acc["memory"] > 3 * task.chance, acc
    assert acc["none"] < 1.6 * task.chance, acc
    assert acc["memory"] - acc["none"] > 0.3, acc
