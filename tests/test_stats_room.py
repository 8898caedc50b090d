"""The split partials in the statistics buffer (launch.part_row): an eager forward whose backward
has sums partials allocates one buffer for its statistics, its own partials and the backward's
(the kernels' PART_ROW), so a forward+backward allocates two fp32 buffers fewer.

Here ROOM_FRACTION is lifted so the small shapes of the interpreter take that path; every case
runs under launch.POISON against the float64 reference (tests/cases.check_case), and checks that
the room was really used: the saved buffer's rows, and the backward's allocations.
"""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import check_case, make_inputs
from helpers import record_launches, row_kernels_only, saved_tensors
from tritonorm.kernels import launch

CONFIG = dict(block_p=4, block_m=16, split=2)


@pytest.fixture(autouse=True)
def _room(monkeypatch, request):
    if "pixels" not in request.node.name:
        row_kernels_only(monkeypatch)  # the row kernels' split path in every layout (not pixels/planes)
    monkeypatch.setattr(launch, "ROOM_FRACTION", float("inf"))
    launch.clear()
    yield
    launch.clear()


def _saved_stats(fn):
    """``fn()`` with the fp32 2-D tensors autograd saves recorded: (result, their shapes)."""
    out, saved = saved_tensors(fn)
    return out, [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.dim() == 2]


def _room_against_none(monkeypatch, run):
    """``run`` (a forward+backward) in the split regime with the room (the fixture's
    ROOM_FRACTION) and without it: the statistics buffer saved has rows past 5 with it, 5 or
    fewer without; the backward allocates two fp32 buffers fewer with it; the results are
    bit-identical."""
    with launch.dispatch.forced("split", **CONFIG):
        (y, grads), kept = _saved_stats(run)
        with_room = _backward_allocations(monkeypatch, run)
    assert len(kept) == 1 and kept[0][0] > 5, kept
    monkeypatch.setattr(launch, "ROOM_FRACTION", 0.0)
    launch.clear()
    with launch.dispatch.forced("split", **CONFIG):
        (y2, grads2), kept2 = _saved_stats(run)
        without = _backward_allocations(monkeypatch, run)
    assert len(kept2) == 1 and kept2[0][0] <= 5, kept2
    # Forward: statistics + partials -> one buffer; backward: its partials -> none.
    assert without - with_room == 2, (without, with_room)
    for a, c in zip((y, *grads), (y2, *grads2)):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def _backward_allocations(monkeypatch, fn) -> int:
    """How many fp32 buffers launch._empty allocates while ``fn`` runs."""
    calls = []
    real = launch._empty

    def counting(shape, device, dtype=torch.float32):
        if dtype == torch.float32:
            calls.append(shape)
        return real(shape, device, dtype)
    monkeypatch.setattr(launch, "_empty", counting)
    fn()
    monkeypatch.setattr(launch, "_empty", real)
    return len(calls)


# (shape, scope, groups, memory format, activation, residual): GroupNorm on its segment view
# (FINISH), BatchNorm rows (ROW_CHANNEL, lean statistics), InstanceNorm 3-D, channels_last
# GroupNorm on the row kernels, RMS-style GroupNorm (center off), an activation with a residual.
CASES = [
    ((2, 8, 6, 6), "group", 2, None, None, False),
    ((3, 5, 6, 7), "batch", None, None, None, False),
    ((2, 3, 4, 4, 5), "instance", None, None, "silu", True),
    ((2, 8, 5, 6), "group", 4, torch.channels_last, "gelu_tanh", False),
    ((4, 6, 9), "batch", None, None, "relu", True),
]


@pytest.mark.parametrize("regime", ["split", "looped"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_partials_in_the_statistics_buffer_match_the_reference(case, regime, monkeypatch):
    shape, scope, groups, fmt, act, res = CASES[case]
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=res, memory_format=fmt, offset=3.0)
    names = record_launches(monkeypatch)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, residual=r, dy=dy, activation=act,
               regime=regime, config=CONFIG)
    assert names[-2:] == ["_bwd_sums_kernel", "_bwd_apply_kernel"], names


@pytest.mark.parametrize("case", [0, 1, 2])
def test_the_room_is_used_and_saves_the_backwards_allocation(case, monkeypatch):
    shape, scope, groups, fmt, act, res = CASES[case]
    x, w, b, _, dy = make_inputs(shape, torch.float32, memory_format=fmt)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()

    def run():
        y = tritonorm.norm(x, scope, num_groups=groups, weight=w, bias=b, activation=act, backend="triton")
        return y, torch.autograd.grad(y, [x, w, b], dy)

    _room_against_none(monkeypatch, run)


def test_default_fraction_keeps_small_calls_apart(monkeypatch):
    # A tiny call: its backward's partials would weigh more than ROOM_FRACTION of x, so the
    # statistics stay [5, P] (or lean) and the backward allocates its own.
    monkeypatch.setattr(launch, "ROOM_FRACTION", 1 / 32)
    launch.clear()
    x, w, b, _, dy = make_inputs((2, 8, 6, 6), torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    with launch.dispatch.forced("split", **CONFIG):
        y, kept = _saved_stats(lambda: tritonorm.norm(x, "group", num_groups=2, weight=w, bias=b,
                                                      backend="triton"))
        torch.autograd.grad(y, leaves, dy)
    assert len(kept) == 1 and kept[0][0] <= 5, kept


def test_compiled_ops_keep_plain_statistics():
    # The one-shot forward of the registered ops (torch.compile's path) never passes room: its
    # statistics are [5, P], as the ops' fake implementations say.
    from tritonorm import scope as scopes

    x, w, b, _, _ = make_inputs((2, 8, 6, 6), torch.float32)
    spec = scopes.parse("group", 4, 2, 8)
    with launch.dispatch.forced("split", **CONFIG):
        y, stats = launch.forward(x, spec, w, b, None, 1e-5, True, 0)
    assert tuple(stats.shape) == (5, 4), stats.shape
    assert y.shape == x.shape


# channels_last GroupNorm with groups of 10 and 4 channels, InstanceNorm: the whole-pixel kernels
# (pixels.py, pixels_backward.py), whose split partials take the same room.
PIXEL_CASES = [
    ((2, 20, 5, 6), "group", 2, "silu", True),
    ((3, 12, 4, 7), "group", 3, None, False),
    ((2, 8, 3, 4, 5), "instance", None, "relu", False),
]


@pytest.mark.parametrize("case", range(len(PIXEL_CASES)))
def test_pixels_partials_in_the_statistics_buffer(case, monkeypatch):
    shape, scope, groups, act, res = PIXEL_CASES[case]
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=res, memory_format=fmt, offset=2.0)
    names = record_launches(monkeypatch)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, residual=r, dy=dy, activation=act,
               regime="split", config=CONFIG)
    assert names == ["_pixels_partial_kernel", "_pixels_apply_kernel", "_pixels_bwd_sums_kernel",
                     "_pixels_bwd_apply_kernel"], names
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]

    def run():
        y = tritonorm.norm(leaves[0], scope, num_groups=groups, weight=leaves[1], bias=leaves[2],
                           activation=act, backend="triton")
        return y, torch.autograd.grad(y, leaves, dy)

    _room_against_none(monkeypatch, run)
