"""StreamVLN's slow-memory building blocks: 2-D pooling of a frame's token grid and the
choice of the history frames."""

from __future__ import annotations

import pytest
import torch

from memvla.context.history import (
    history_index_tensor,
    history_indices,
    max_history,
)
from memvla.layers.pooling import MODES, GridPool, pool_grid, pool_grid_ref


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grid, stride, side", [(27, 2, 14), (16, 2, 8), (27, 3, 9),
                                                (5, 4, 2), (1, 2, 1)])
def test_pooled_shape(mode, grid, stride, side):
    x = torch.randn(2, grid * grid, 6)
    assert pool_grid(x, grid, stride, mode).shape == (2, side * side, 6)


def test_streamvln_frame_is_196_tokens():
    assert pool_grid(torch.randn(1, 729, 4), 27).shape == (1, 196, 4)


@pytest.mark.parametrize("mode", MODES)
def test_stride_one_is_identity(mode):
    x = torch.randn(2, 49, 5)
    torch.testing.assert_close(pool_grid(x, 7, 1, mode), x, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grid, stride", [(27, 2), (16, 2), (9, 3), (10, 3), (7, 1), (3, 5)])
def test_fast_matches_reference(mode, grid, stride, dtype):
    x = torch.randn(3, grid * grid, 8, dtype=dtype)
    # PyTorch's float32 bilinear places its samples in float32 (a ulp of ~2e-6 at row 25):
    # a few 1e-6 off the exact resampling; everything else agrees to 1e-6.
    atol = 1e-5 if mode == "bilinear" and dtype == torch.float32 else 1e-6
    torch.testing.assert_close(pool_grid(x, grid, stride, mode),
                               pool_grid_ref(x, grid, stride, mode), atol=atol, rtol=0)


# A 3×3 grid holding 3·row + col, pooled with stride 2 to 2×2 (row-major):
#   0 1 2     avg: mean{0,1,3,4} mean{2,5}   max: 4 5   bilinear (scale 3/2): samples at
#   3 4 5          mean{6,7}   8             7 8        rows/cols 0.25 and 1.75 of the
#   6 7 8                                               ramp, 3·r + c
WORKED = {"avg": [2.0, 3.5, 6.5, 8.0], "max": [4.0, 5.0, 7.0, 8.0],
          "bilinear": [1.0, 2.5, 5.5, 7.0]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", [pool_grid, pool_grid_ref])
def test_worked_example(fn, mode):
    x = torch.arange(9.0).view(1, 9, 1)
    out = fn(x, 3, 2, mode)
    assert out.view(-1).tolist() == pytest.approx(WORKED[mode])


def test_avg_of_a_divisible_grid_is_the_block_mean():
    x = torch.randn(2, 16 * 16, 3)
    blocks = x.view(2, 8, 2, 8, 2, 3).mean(dim=(2, 4)).reshape(2, 64, 3)
    torch.testing.assert_close(pool_grid(x, 16, 2, "avg"), blocks)


@pytest.mark.parametrize("mode", MODES)
def test_bf16(mode):
    x = torch.randn(2, 729, 16)
    out = pool_grid(x.bfloat16(), 27, 2, mode)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 196, 16)
    torch.testing.assert_close(out.float(), pool_grid(x, 27, 2, mode), atol=5e-2, rtol=2e-2)
    assert pool_grid_ref(x.bfloat16(), 27, 2, mode).dtype == torch.bfloat16


def test_module():
    pool = GridPool(2, "max")
    assert list(pool.parameters()) == [] and "mode='max'" in repr(pool)
    x = torch.randn(2, 729, 4)
    torch.testing.assert_close(pool(x, 27), pool_grid(x, 27, 2, "max"))


@pytest.mark.parametrize("args, words", [
    ((torch.randn(1, 700, 4), 27), ["grid × grid = 729", "grid=27", "(1, 700, 4)"]),
    ((torch.randn(700, 4), 27), ["(B, P, D)", "(700, 4)"]),
    ((torch.randn(1, 9, 4), -3), ["grid must be >= 1", "got -3"]),
    ((torch.randn(1, 9, 4), 3, 0), ["stride must be >= 1", "got 0"]),
    ((torch.randn(1, 9, 4), 3, 2, "mean"), ["'avg', 'max', 'bilinear'", "got 'mean'"]),
])
def test_bad_input_is_a_clear_error(args, words):
    for fn in (pool_grid, pool_grid_ref):
        with pytest.raises(ValueError) as err:
            fn(*args)
        assert all(w in str(err.value) for w in words), str(err.value)


def test_module_checks_its_options():
    with pytest.raises(ValueError, match="got 'average'"):
        GridPool(2, "average")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        GridPool(0)


# --- history frames ----------------------------------------------------------------------

T0S = [0, 1, 5, 7, 8, 9, 15, 16, 17, 31, 32, 64, 100]


def _formula(t0: int, num_history: int) -> list[int]:
    """slice(0, t0, max(t0 // num_history, 1)) over frames 0..t0-1, spelled out."""
    step = max(t0 // num_history, 1)
    out, i = [], 0
    while i < t0:
        out.append(i)
        i += step
    return out


@pytest.mark.parametrize("num_history", [1, 8])
@pytest.mark.parametrize("t0", T0S)
def test_history_indices_follow_the_formula(t0, num_history):
    assert history_indices(t0, num_history) == _formula(t0, num_history)
    assert history_indices(t0, num_history) == list(range(t0))[slice(0, t0, max(
        t0 // num_history, 1))]


def test_history_indices_by_hand():
    assert history_indices(0, 8) == []
    assert history_indices(5, 8) == [0, 1, 2, 3, 4]
    assert history_indices(9, 8) == list(range(9))  # step 1, not capped at 8
    assert history_indices(32, 8) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert history_indices(100, 8) == [0, 12, 24, 36, 48, 60, 72, 84, 96]
    assert history_indices(31, 1) == [0]
    assert history_indices(1, 1) == [0]


def test_max_history_is_the_most_any_t0_gives():
    for n in (1, 2, 3, 8):
        assert max(len(history_indices(t, n)) for t in range(200)) == max_history(n)


@pytest.mark.parametrize("num_history", [1, 8])
@pytest.mark.parametrize("max_len", [None, 20])
def test_history_index_tensor_matches_the_list(num_history, max_len):
    t0 = torch.tensor(T0S)
    indices, valid = history_index_tensor(t0, num_history, max_len)
    k = max_history(num_history) if max_len is None else max_len
    assert indices.shape == valid.shape == (len(T0S), k)
    assert indices.dtype == torch.long and valid.dtype == torch.bool
    for b, t in enumerate(T0S):
        want = history_indices(t, num_history)
        assert indices[b][valid[b]].tolist() == want
        assert valid[b].tolist() == [i < len(want) for i in range(k)]  # a prefix
        assert not indices[b][~valid[b]].any()


def test_history_bad_input():
    with pytest.raises(ValueError, match="num_history must be >= 1, got 0"):
        history_indices(4, 0)
    with pytest.raises(ValueError, match="t0 must be >= 0, got -1"):
        history_indices(-1, 8)
    with pytest.raises(ValueError, match=r"max_len must be >= 15 .* got 8"):
        history_index_tensor(torch.tensor([32, 15]), 8, max_len=8)
    with pytest.raises(ValueError, match="integer tensor"):
        history_index_tensor(torch.tensor([3.0]), 8)
    with pytest.raises(ValueError, match="t0 must be >= 0"):
        history_index_tensor(torch.tensor([3, -2]), 8)
