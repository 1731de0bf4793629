"""The memory bank: writes equal their loop twin, the bank never exceeds its size, merges
as documented, retrieval returns the exact top-k, oldest first, and the attention read
equals its loop twin."""

import pytest
import torch

from memvla.configs import ContextConfig
from memvla.layers.memory_bank import (
    bank_attend,
    bank_attend_ref,
    bank_newest,
    bank_retrieve,
    bank_write,
    bank_write_ref,
)


def empty(b: int, s: int, d: int):
    return torch.zeros(b, s, d), torch.zeros(b, s), torch.zeros(b, s)


@pytest.mark.parametrize("threshold", [None, 0.99])
def test_writes_equal_the_loop_twin_and_stay_bounded(threshold):
    torch.manual_seed(0)
    b, s, d = 6, 4, 5
    fast, slow = empty(b, s, d), empty(b, s, d)
    base = torch.randn(3, d)
    for t in range(40):
        noisy = torch.rand(b, 1) < 0.5  # some exact repeats, some near ones
        e = base[torch.randint(0, 3, (b,))] + 0.05 * torch.randn(b, d) * noisy
        fast = bank_write(*fast, e, float(t), threshold)
        slow = bank_write_ref(*slow, e, float(t), threshold)
        torch.testing.assert_close(fast[0], slow[0])
        assert torch.equal(fast[1], slow[1]) and torch.equal(fast[2], slow[2])
        assert ((fast[1] > 0).sum(1) <= s).all()
        assert fast[1].sum(1).eq(t + 1).all()  # every observation is in some entry
    n = (fast[1] > 0).sum(1)
    assert (n == s).all()  # filled, then kept at its size by merging


def test_merges_as_documented():
    d = 3
    a, c, x, y = (torch.tensor([v]) for v in ([1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0],
                                                 [1.0, 1.0, 0]))
    bank = empty(1, 3, d)
    bank = bank_write(*bank, a, 0.0, 0.95)
    bank = bank_write(*bank, a, 1.0, 0.95)  # a repeat merges into the newest entry
    assert bank[1].tolist() == [[2.0, 0.0, 0.0]] and bank[2][0, 0] == 1.0
    bank = bank_write(*bank, c, 2.0, 0.95)
    bank = bank_write(*bank, x, 3.0, 0.95)  # full: a, c, x
    assert bank[1].tolist() == [[2.0, 1.0, 1.0]]
    # full and no near-duplicate pair: the most similar adjacent pair merges (all
    # orthogonal: the oldest), then the new entry is appended
    bank = bank_write(*bank, y, 4.0, 0.95)
    keys, count, time = bank
    assert count.tolist() == [[3.0, 1.0, 1.0]]
    torch.testing.assert_close(keys[0, 0], torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert time.tolist() == [[2.0, 3.0, 4.0]]
    torch.testing.assert_close(keys[0, 2], y[0])


def test_a_full_bank_merges_its_most_similar_pair_and_keeps_a_near_cue():
    """Pooled frames share a large common part: a cue frame is 0.999-similar to the frames
    after it, which are identical to each other; the repeats merge, the cue stays."""
    common = torch.tensor([10.0, 0, 0, 0])
    cue, blank = common + torch.tensor([0, 0.45, 0, 0]), common + torch.tensor([0, 0, 0.1, 0])
    bank = empty(1, 3, 4)
    for t, e in enumerate([cue, blank, blank, blank, blank]):
        bank = bank_write(*bank, e[None], float(t))
    keys, count, time = bank
    assert torch.nn.functional.cosine_similarity(cue, blank, dim=0) > 0.998
    assert count.tolist() == [[1.0, 3.0, 1.0]] and time.tolist() == [[0.0, 3.0, 4.0]]
    torch.testing.assert_close(keys[0, 0], cue)
    # ties: the oldest pair of equals merges first
    e = torch.eye(4)
    keys = torch.stack([e[0], e[1], e[1], e[2], e[2]])[None]
    _, new_count, new_time = bank_write(keys, torch.ones(1, 5), torch.arange(5.0)[None],
                                        e[3][None], 5.0)
    assert new_count.tolist() == [[1.0, 2.0, 1.0, 1.0, 1.0]]
    assert new_time.tolist() == [[0.0, 2.0, 3.0, 4.0, 5.0]]


def test_retrieval_is_the_exact_top_k_oldest_first():
    torch.manual_seed(1)
    scores = torch.randn(3, 6)
    count = torch.ones(3, 6)
    count[2, 4:] = 0  # sample 2 holds 4 entries
    idx, top, exists = bank_retrieve(scores, count, 3)
    for b in range(3):
        s = [(float(scores[b, i]), i) for i in range(6) if count[b, i] > 0]
        want = sorted(i for _, i in sorted(s, reverse=True)[:3])
        assert idx[b].tolist() == want and exists[b].all()
        torch.testing.assert_close(top[b], scores[b, idx[b]])
    one = torch.zeros(3, 6).index_fill_(1, torch.tensor([0]), 1.0)
    _, _, exists = bank_retrieve(scores, one, 3)
    assert exists.sum(1).tolist() == [1, 1, 1]  # one entry held: the rest do not exist


def test_the_attention_read_equals_its_twin_over_held_entries_only():
    torch.manual_seed(2)
    scores = torch.randn(3, 4, 6) * 5  # (B, K, S)
    count = torch.ones(3, 6)
    count[1, 2:] = 0  # sample 1 holds 2 entries
    count[2] = 0  # sample 2 holds none
    w = bank_attend(scores, count)
    torch.testing.assert_close(w, bank_attend_ref(scores, count))
    torch.testing.assert_close(w[:2].sum(-1), torch.ones(2, 4))
    assert (w[1, :, 2:] == 0).all() and (w[2] == 0).all() and not w.isnan().any()


def test_an_attention_read_reaches_an_entry_the_top_k_leaves_out():
    """A cue unlike the frames after it is the least similar to the query: the top-k read
    never gives it a gradient, the attention read does."""
    from memvla.context.bank import BankContext

    torch.manual_seed(0)
    grads = {}
    for read in ("topk", "attention"):
        ctx = BankContext(ContextConfig(kind="bank", bank_size=4, bank_topk=1,
                                        bank_read=read), 8)
        keys = torch.randn(1, 3, 8).requires_grad_()
        state = {"keys": keys, "count": torch.ones(1, 3), "time": torch.arange(3.0)[None],
                 "turn": 3, "observed": [torch.randn(1, 8)]}
        read_tokens = ctx.extend_prefix([], state)[0]
        read_tokens.embs.sum().backward()
        grads[read] = keys.grad.abs().sum(-1)[0]  # (S,)
    assert (grads["topk"] > 0).sum() == 1  # only the one entry read
    assert (grads["attention"] > 0).all()


def test_a_chained_write_starts_from_the_newest_entry():
    from memvla.context.bank import BankContext

    keys, count = torch.randn(3, 4, 5), torch.tensor([[1.0, 2, 1, 0], [0, 0, 0, 0],
                                                       [1, 1, 1, 1]])
    newest = bank_newest(keys, count)
    torch.testing.assert_close(newest, torch.stack([keys[0, 2], torch.zeros(5), keys[2, 3]]))
    written = {}
    for chain in (False, True):
        torch.manual_seed(0)  # the same write vector
        ctx = BankContext(ContextConfig(kind="bank", bank_size=4, bank_chain=chain), 5)
        state = {"keys": keys, "count": count, "time": torch.zeros(3, 4), "turn": 3,
                 "observed": [torch.randn(3, 5)]}
        written[chain] = ctx.extend_prefix([], state)[-1].embs[:, 0]  # (B, D) write token
    torch.testing.assert_close(written[True] - written[False], newest)


def test_bank_options_are_checked():
    with pytest.raises(ValueError, match="bank_topk in \\[1, bank_size\\]"):
        ContextConfig(kind="bank", bank_size=2, bank_topk=3)
    with pytest.raises(ValueError, match="bank_merge is a cosine similarity in"):
        ContextConfig(kind="bank", bank_merge=1.5)
    with pytest.raises(ValueError, match="context.bank_read must be one of \\('topk', "
                       "'attention'\\), got 'soft'"):
        ContextConfig(kind="bank", bank_read="soft")
    with pytest.raises(ValueError, match="read tokens of bank_read='attention'.*bank_topk=0"):
        ContextConfig(kind="bank", bank_read="attention", bank_topk=0)
    ContextConfig(kind="bank", bank_size=2, bank_topk=3, bank_read="attention")  # 3 mixes
    with pytest.raises(ValueError, match="context.bank_chain must be true or false, got 1"):
        ContextConfig(kind="bank", bank_chain=1)
    with pytest.raises(ValueError, match="context.bank_size is an option of "
                       "context.kind='bank'"):
        ContextConfig(kind="memory_tokens", bank_size=4)
