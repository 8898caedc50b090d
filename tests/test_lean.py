"""Lean statistics: a training call whose statistics only its backward reads keeps rstd (and the
shifted mean) alone, and the backward kernels read each statistic's pivot again from x
(common.store_stats / load_stats LEAN). Checked against the float64 reference on inputs far from
zero (a pivot read from the wrong place, or not subtracted, shows up as a large error there),
in every regime, with what autograd saved inspected."""

from __future__ import annotations

import pytest
import torch

import tritonorm
from helpers import LOW, assert_close, record_launches, saved_tensors, small_tiles
from tritonorm import dispatch, reference, scope as scopes
from tritonorm.kernels import launch


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)
    launch.clear()


def _saved_stats(fn, p):
    """Run ``fn`` recording what autograd saves; return (its result, the shapes of the fp32
    statistics buffers: [rows, ``p``] for ``p`` statistics)."""
    out, saved = saved_tensors(fn)
    return out, [tuple(t.shape) for t in saved
                 if t.dtype == torch.float32 and t.dim() == 2 and t.shape[0] <= 5 and t.shape[1] == p]


def _inputs(shape, dtype, c, offset, fmt=None):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + offset).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, dtype=torch.float64).to(dtype)
    return x, w, b


def _compare(x, w, b, dy, y, grads, spec, center, dtype):
    p64 = [None if t is None else t.double().requires_grad_() for t in (w, b)]
    x64 = x.double().requires_grad_()
    y64 = reference.norm(x64, spec, p64[0], p64[1], 1e-5, center)
    live = [x64] + [t for t in p64 if t is not None]
    g64 = torch.autograd.grad(y64, live, dy.double())
    eager_y = eager_g = None
    if dtype in LOW:
        xl = x.clone().requires_grad_()
        pl = [None if t is None else t.clone().requires_grad_() for t in (w, b)]
        eager_y = reference.norm(xl, spec, pl[0], pl[1], 1e-5, center, compute_dtype=dtype)
        eager_g = torch.autograd.grad(eager_y, [xl] + [t for t in pl if t is not None], dy)
    assert_close(y, y64, dtype, eager_y, "y", term_scale=3.0)
    _, var = reference.moments(x.double(), spec, center)
    dx_terms = (var + 1e-5).rsqrt().max().item() * dy.double().abs().max().item() * 2.0
    for i, (g, r) in enumerate(zip(grads, g64)):
        assert_close(g, r, dtype, None if eager_g is None else eager_g[i], f"grad {i}",
                     term_scale=dx_terms if i == 0 else 0.0)


@pytest.mark.parametrize("regime", ["fused", "looped", "split"])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_keep_lean_statistics_and_match_the_reference(regime, center, affine, dtype):
    shape = (6, 48)
    x, w, b = _inputs(shape, dtype, shape[1], 40.0 if center else 0.0)
    if not affine:
        w = b = None
    if not center:
        b = None
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b)]
    dy = torch.randn(shape).to(dtype)
    with small_tiles(regime):
        y, kept = _saved_stats(lambda: tritonorm.norm(leaves[0], "layer", weight=leaves[1], bias=leaves[2],
                                                      center=center, backend="triton"), shape[0])
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    # Every regime of rows reads lean statistics: outside the fused one, dweight and dbias come
    # from the first stage's per-column sums (_bwd_col_sums_kernel), not the channel-view sweep.
    assert kept == [(2 if center else 1, shape[0])], kept
    spec = scopes.parse("layer", 2, None, shape[1])
    _compare(x, w, b, dy, y, grads, spec, center, dtype)


@pytest.mark.parametrize("regime", ["fused", "split"])
def test_channels_last_batch_norm_reads_each_channels_pivot_again(regime):
    # BatchNorm on channels_last: each row of the statistic view is one channel, its pivot x[0, c, 0, 0].
    shape = (3, 5, 4, 6)
    x, w, b = _inputs(shape, torch.float32, shape[1], -30.0, torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    dy = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    with small_tiles(regime):
        y, kept = _saved_stats(lambda: tritonorm.norm(leaves[0], "batch", weight=leaves[1], bias=leaves[2],
                                                      backend="triton"), shape[1])
        grads = torch.autograd.grad(y, leaves, dy)
    assert kept == [(2, shape[1])], kept
    _compare(x, w, b, dy, y, grads, scopes.parse("batch", 4, None, shape[1]), True, torch.float32)


def test_only_weight_gradients_and_returned_statistics_use_the_full_buffer():
    # dweight alone (x needs no gradient): the channel-view sweep reads the [5, P] buffer; a call
    # that returns its statistics (norm_with_stats) keeps them whole too.
    shape = (5, 32)
    x, w, b = _inputs(shape, torch.float32, shape[1], 25.0)
    wl = w.clone().requires_grad_()
    dy = torch.randn(shape)
    with small_tiles("looped"):
        y, kept = _saved_stats(lambda: tritonorm.norm(x, "layer", weight=wl, backend="triton"), shape[0])
        (gw,) = torch.autograd.grad(y, [wl], dy)
    assert kept == [(5, shape[0])], kept
    w64 = w.double().requires_grad_()
    spec = scopes.parse("layer", 2, None, shape[1])
    (gw64,) = torch.autograd.grad(reference.norm(x.double(), spec, w64), [w64], dy.double())
    assert_close(gw, gw64, torch.float32, what="dweight")
    xl = x.clone().requires_grad_()
    (y, mean, var), kept = _saved_stats(lambda: tritonorm.norm_with_stats(xl, "layer", backend="triton"), shape[0])
    assert kept == [(5, shape[0])], kept
    mean64, var64 = reference.moments(x.double(), spec, True)
    assert_close(mean, mean64.reshape(mean.shape), torch.float32, what="mean")
    assert_close(var, var64.reshape(var.shape), torch.float32, what="var")


def test_a_non_finite_first_element_gives_the_same_pivot_both_ways():
    # The forward's pivot of a row starting with inf is 0 (common.finite_pivot); the backward must
    # take the same, so the other rows stay exact and that row's gradient is what the reference says.
    shape = (4, 32)
    x, w, b = _inputs(shape, torch.float32, shape[1], 10.0)
    x[2, 0] = float("inf")
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    dy = torch.randn(shape)
    y, kept = _saved_stats(lambda: tritonorm.norm(leaves[0], "layer", weight=leaves[1], bias=leaves[2],
                                                  backend="triton"), shape[0])
    assert kept == [(2, shape[0])], kept
    (gx,) = torch.autograd.grad(y, [leaves[0]], dy)
    x64 = x.double().requires_grad_()
    spec = scopes.parse("layer", 2, None, shape[1])
    (gx64,) = torch.autograd.grad(reference.norm(x64, spec, w.double(), b.double()), [x64], dy.double())
    finite = torch.isfinite(gx64).all(dim=1)
    assert torch.equal(torch.isfinite(gx).all(dim=1), finite)
    assert_close(gx[finite], gx64[finite], torch.float32, what="dx of the finite rows", term_scale=10.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_norm_keeps_lean_statistics_and_reads_the_pivot_from_h(dtype):
    shape = (6, 40)
    x = (torch.randn(shape, dtype=torch.float64) + 20).to(dtype)
    r = (torch.randn(shape, dtype=torch.float64) * 2 + 15).to(dtype)
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    dy = torch.randn(shape).to(dtype)
    (y, h), kept = _saved_stats(lambda: tritonorm.add_norm(leaves[0], leaves[1], "layer", weight=leaves[2],
                                                           backend="triton"), shape[0])
    assert kept == [(2, shape[0])], kept
    gx, gr, gw = torch.autograd.grad(y, leaves, dy)
    assert torch.equal(gx, gr)
    spec = scopes.parse("layer", 2, None, shape[1])
    _compare(h.detach(), w, None, dy, y, (gx, gw), spec, True, dtype)


def test_a_plan_that_changes_between_forward_and_backward_rebuilds_the_statistics():
    # The forward (fused) keeps lean statistics; the backward then runs in the torch regime,
    # which reads the [5, P] buffer: it is rebuilt from x, and the answer is exact.
    shape = (6, 48)
    x, w, b = _inputs(shape, torch.float32, shape[1], 30.0)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    dy = torch.randn(shape)
    with small_tiles("fused"):
        y, kept = _saved_stats(lambda: tritonorm.norm(leaves[0], "layer", weight=leaves[1], bias=leaves[2],
                                                      backend="triton"), shape[0])
    assert kept == [(2, shape[0])], kept
    with dispatch.forced(dispatch.NATIVE, op="backward"):
        grads = torch.autograd.grad(y, leaves, dy)
    _compare(x, w, b, dy, y, grads, scopes.parse("layer", 2, None, shape[1]), True, torch.float32)


@pytest.mark.parametrize("regime", ["looped", "split"])
def test_rows_first_stage_programs_take_several_row_blocks(regime, monkeypatch):
    # Fewer first-stage programs than row blocks (as on a GPU with long inputs): each program
    # carries its column tile's dweight/dbias sums over several row blocks.
    monkeypatch.setattr(dispatch, "col_tile_programs", lambda row_blocks, tiles, warps, profile: 2)
    launch.clear()
    shape = (13, 40)
    x, w, b = _inputs(shape, torch.float32, shape[1], -12.0)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    dy = torch.randn(shape)
    with small_tiles(regime):
        y = tritonorm.norm(leaves[0], "layer", weight=leaves[1], bias=leaves[2], activation="silu",
                           backend="triton")
        grads = torch.autograd.grad(y, leaves, dy)
    spec = scopes.parse("layer", 2, None, shape[1])
    p64 = [t.double().requires_grad_() for t in (x, w, b)]
    y64 = reference.norm(p64[0], spec, p64[1], p64[2], 1e-5, True, "silu")
    g64 = torch.autograd.grad(y64, p64, dy.double())
    assert_close(y, y64, torch.float32, what="y")
    for i, (g, r) in enumerate(zip(grads, g64)):
        assert_close(g, r, torch.float32, what=f"grad {i}", term_scale=10.0 if i == 0 else 0.0)


@pytest.mark.parametrize("regime", ["looped", "split"])
@pytest.mark.parametrize("shape", [(2, 300), (5, 200)])
def test_rows_two_stage_backward_sums_the_columns_in_its_apply_kernel(regime, shape, monkeypatch):
    # Looped/split LayerNorm rows: the apply kernel's programs add the first stage's per-column
    # dweight/dbias sums (FINISH_COLS), column blocks shared out over the grid: 2 launches. With
    # 300 columns (5 blocks of 64) and one row block, a looped apply grid of 1 program adds every
    # block; the split one spreads them.
    from helpers import record_launches

    runs = record_launches(monkeypatch)
    monkeypatch.setattr(dispatch, "col_tile_programs", lambda row_blocks, tiles, warps, profile: 3)
    launch.clear()
    x, w, b = _inputs(shape, torch.float32, shape[1], 7.0)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    dy = torch.randn(shape)
    with dispatch.forced(regime, block_p=8, block_m=16, split=4):
        y = tritonorm.norm(leaves[0], "layer", weight=leaves[1], bias=leaves[2], backend="triton")
        runs.clear()
        grads = torch.autograd.grad(y, leaves, dy)
    assert runs == ["_bwd_col_sums_kernel", "_bwd_apply_kernel"], runs
    spec = scopes.parse("layer", 2, None, shape[1])
    _compare(x, w, b, dy, y, grads, spec, True, torch.float32)


@pytest.mark.parametrize("rows,launches", [(1, 1), (3, 2), (40, 2)])
def test_fused_rows_dweight_from_one_program_or_partials(rows, launches, monkeypatch):
    # One row: its program stores dweight/dbias itself (1 launch); more: per-program partials
    # and the finish (2 launches; 40 rows take several programs). All against the reference.
    names = record_launches(monkeypatch)
    shape = (rows, 24)
    x, w, b = _inputs(shape, torch.float32, shape[1], 7.0)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    dy = torch.randn(shape)
    with dispatch.forced("fused", block_p=1):
        y = tritonorm.norm(leaves[0], "layer", weight=leaves[1], bias=leaves[2], backend="triton")
        names.clear()
        grads = torch.autograd.grad(y, leaves, dy)
    assert len(names) == launches, names
    _compare(x, w, b, dy, y, grads, scopes.parse("layer", 2, None, shape[1]), True, torch.float32)
