"""Split-regime apply programs that take several column tiles each (launch._apply_grid with
``fill``): forward and backward against the float64 reference where the grid really gives a
program more than one tile, and the same calls with one tile a program (APPLY_FILL off); each
with the tiles taken last to first (APPLY_REVERSE, the default) and first to last."""

from __future__ import annotations

import pytest
import torch
from cases import check_case, make_inputs
from helpers import row_kernels_on_profile

from tritonorm import dispatch
from tritonorm.kernels import launch

# (shape, scope, groups, memory format): BatchNorm NCHW (columns N runs of H*W), channels_last
# (unit-stride rows), GroupNorm NCHW; M = 2 * 9 * 10 = 180 .. 300 columns of 16: 12-19 tiles.
CASES = [((2, 6, 9, 10), "batch", None, None), ((3, 8, 5, 6), "batch", None, torch.channels_last),
         ((2, 6, 10, 15), "group", 2, None)]


@pytest.fixture
def one_sm(monkeypatch):
    """The device's profile with 1 SM: the fill is 16 programs, fewer than the tiles."""
    row_kernels_on_profile(monkeypatch, sm_count=1)
    yield
    launch.clear()


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward-order"])
@pytest.mark.parametrize("fill", [True, False], ids=["fill", "tile-a-program"])
@pytest.mark.parametrize("shape,scope,groups,fmt", CASES)
def test_apply_with_several_tiles_a_program(shape, scope, groups, fmt, fill, reverse, one_sm, monkeypatch):
    monkeypatch.setattr(dispatch, "APPLY_FILL", fill)
    monkeypatch.setattr(dispatch, "APPLY_REVERSE", reverse)
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=True, memory_format=fmt)
    cfg = dict(block_p=2, block_m=16, split=4)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, residual=r, dy=dy, activation="silu",
               regime="split", config=cfg)
    fwd = [p for p in launch._PLANS.values() if getattr(p, "partial", None) is not None][-1]
    step, tiles, first = fwd.mid[:3]
    cols = abs(step)
    bwd = [bp for bp in fwd._backward.values() if getattr(bp, "apply", None) is not None]
    assert bwd, "the backward ran its split apply"
    # (launcher, (P, M, split, TILE_STEP, TILES_PER_PROG, FIRST_TILE, ...))
    b_step, b_tiles, b_first = bwd[-1].apply[1][3:6]
    b_cols = abs(b_step)
    # The apply launches take their tiles in the order asked for: last to first from the last
    # tile of the last program, or first to last.
    assert (step < 0, first) == ((True, cols * tiles - 1) if reverse else (False, 0))
    assert (b_step < 0, b_first) == ((True, b_cols * b_tiles - 1) if reverse else (False, 0))
    if fill:
        assert tiles > 1 and cols * tiles >= -(-fwd.M // 16), (cols, tiles)
        assert b_tiles > 1 and b_cols * b_tiles >= -(-fwd.M // 16), (b_cols, b_tiles)
    else:
        assert tiles == 1 and b_tiles == 1
