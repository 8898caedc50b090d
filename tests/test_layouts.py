"""Memory layouts: channels_last, sliced and transposed strides, 2-D to 5-D, read in place."""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import check_case, make_inputs
from tritonorm.kernels import launch, layout

REGIMES = ("fused", "looped", "split")
TILES = {"fused": {}, "looped": {"block_m": 16, "block_p": 2}, "split": {"block_m": 8, "block_p": 4, "split": 2}}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("scope,groups", [("batch", None), ("group", 2), ("instance", None), ("positional", None), ("NW", None)])
def test_channels_last_2d(scope, groups, regime):
    x, w, b, r, dy = make_inputs((2, 6, 3, 4), torch.float32, residual=True, memory_format=torch.channels_last)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, residual=r, dy=dy, regime=regime,
               config=TILES[regime])
    y = tritonorm.norm(x, scope, num_groups=groups, backend="triton")
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("regime", REGIMES)
def test_channels_last_3d(regime):
    x, w, b, _, dy = make_inputs((2, 4, 3, 2, 3), torch.float32, memory_format=torch.channels_last_3d)
    check_case(x, "group", num_groups=2, weight=w, bias=b, dy=dy, regime=regime, config=TILES[regime])


def _sliced(shape, dims_step):
    full = list(shape)
    for d, step in dims_step:
        full[d] *= step
    base = torch.randn(full)
    idx = [slice(None)] * len(shape)
    for d, step in dims_step:
        idx[d] = slice(None, None, step)
    return base[tuple(idx)]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("scope,groups", [("batch", None), ("group", 2), ("layer", None), ("HW", None)])
def test_sliced_strides(scope, groups, regime):
    x = _sliced((3, 4, 3, 5), [(3, 2), (1, 2)])
    assert not x.is_contiguous()
    _, w, b, _, dy = make_inputs(x.shape, torch.float32)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, dy=dy, regime=regime, config=TILES[regime])


@pytest.mark.parametrize("regime", REGIMES)
def test_transposed_spatial(regime):
    x = torch.randn(2, 4, 5, 3).transpose(2, 3)
    _, w, b, r, dy = make_inputs(x.shape, torch.float32, residual=True)
    check_case(x, "instance", weight=w, bias=b, residual=r, dy=dy, regime=regime, config=TILES[regime])


def test_residual_and_dy_in_other_layouts():
    x, w, b, _, _ = make_inputs((2, 6, 3, 3), torch.float32, memory_format=torch.channels_last)
    r = torch.randn(x.shape)                       # contiguous while x is channels_last
    dy = torch.randn(3, 3, 6, 2).permute(3, 2, 1, 0)  # yet another stride order
    check_case(x, "group", num_groups=3, weight=w, bias=b, residual=r, dy=dy, activation="relu")


def test_irregular_strides_fall_back_to_a_copy_correctly():
    # Every axis strided on its own: with scope "C" in 2 groups the kept axes N, G, D, H, W
    # cannot merge (five dims), so the launcher copies x into the output's dense layout.
    x = _sliced((2, 4, 2, 3, 2), [(0, 2), (1, 3), (2, 2), (3, 2), (4, 3)])
    _, w, b, _, dy = make_inputs(x.shape, torch.float32)
    from tritonorm import scope as scopes
    with pytest.raises(layout.TooManyDims):
        layout.stat_view(x.shape, scopes.parse("C", 5, 2, 4), x.stride(), x.contiguous().stride())
    check_case(x, "C", num_groups=2, weight=w, bias=b, dy=dy)


@pytest.mark.parametrize("shape,scope", [((4, 3), "batch"), ((4, 3, 5), "batch"), ((2, 3, 4, 5), "batch"),
                                         ((2, 3, 2, 3, 4), "batch"), ((4, 3), "layer"), ((2, 3, 2, 2, 3), "instance")])
def test_ranks_2d_to_5d(shape, scope):
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=True)
    check_case(x, scope, weight=w, bias=b, residual=r, dy=dy)


def test_views_merge_to_one_dim_for_common_cases():
    from tritonorm import scope as scopes
    x = torch.empty(4, 64, 8, 8)
    v = layout.stat_view(x.shape, scopes.parse("group", 4, 32, 64), x.stride(), x.stride())
    # One group's channels and positions are one contiguous run; (N, G) one stride.
    assert v.cols.sizes == (2 * 64, 1, 1, 1) and v.cols.strides[0] == (1, 0, 0, 0)
    assert v.cols.chan == (64, 2, 1)         # channel within the group = col // 64
    assert v.rows.sizes == (4 * 32, 1, 1, 1) and v.rows.chan == (1, 32, 2)
    v = layout.stat_view(x.shape, scopes.parse("layer", 4), x.stride(), x.stride())
    assert v.cols.sizes == (64 * 64, 1, 1, 1) and v.rows.sizes == (4, 1, 1, 1)
    xl = x.contiguous(memory_format=torch.channels_last)
    v = layout.stat_view(xl.shape, scopes.parse("batch", 4), xl.stride(), xl.stride())
    assert v.rows.sizes == (64, 1, 1, 1) and v.rows.strides[0][0] == 1  # channels are unit-stride
    assert v.cols.sizes == (4 * 64, 1, 1, 1)                            # N*H*W merged
    v = layout.channel_view(x.shape, scopes.parse("group", 4, 32, 64), x.stride(), x.stride())
    assert v.rows.numel == 64 and v.rows.chan == (1, 64, 1)          # G and Cg: the channel itself


@pytest.mark.parametrize("regime", REGIMES)
def test_strided_and_expanded_weight_and_bias(regime):
    # Parameters are indexed by channel inside the kernels: views of them must not be misread.
    x, _, _, r, dy = make_inputs((3, 4, 5), torch.float32, residual=True)
    w = (torch.rand(8) + 0.5)[::2]
    b = torch.randn(1).expand(4)
    check_case(x, "batch", weight=w, bias=b, residual=r, dy=dy, regime=regime, config=TILES[regime])
    check_case(x, "group", num_groups=2, weight=w, bias=b, dy=dy, regime=regime, config=TILES[regime])
