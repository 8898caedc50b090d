"""The looped kernels' second sweeps (the row looped forward's y sweep over columns, the planes
kernels' y and dx sweeps over samples) take their tiles last to first after the first sweep of
the same data (dispatch.sweep_back, switched by APPLY_REVERSE), so the L2 serves the start of the
re-read. Both orders against the float64 reference, with the tiles' count not a multiple of the
block (the reversed sweep starts on the partial tile), and the host ints the launches take."""

from __future__ import annotations

import pytest
import torch
from cases import check_case, make_inputs
from helpers import row_kernels_only

from tritonorm import dispatch
from tritonorm.kernels import launch


@pytest.mark.parametrize("n,block", [(1, 8), (7, 8), (8, 8), (9, 8), (33, 8), (32, 16), (200, 64)])
def test_sweep_back_visits_every_tile_once(n, block):
    for reverse in (True, False):
        back = dispatch.sweep_back(n, block, reverse)
        starts = [abs(back - j) * block for j in range(-(-n // block))]
        assert sorted(starts) == list(range(0, n, block))
        # last to first: the first tile visited is the last one (partial or not)
        assert starts[0] == ((n - 1) // block * block if reverse else 0)
        assert starts == sorted(starts, reverse=reverse)
    assert dispatch.sweep_back(0, 8, True) == 0


@pytest.fixture
def fresh_plans(monkeypatch):
    launch.clear()
    yield
    launch.clear()


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward-order"])
@pytest.mark.parametrize("shape,scope,groups,fmt", [
    ((2, 6, 9, 10), "batch", None, None),             # M = 180 columns: 12 tiles of 16, the last partial
    ((3, 8, 5, 6), "batch", None, torch.channels_last),
    ((2, 6, 10, 15), "group", 2, None),
])
def test_row_looped_forward_both_orders(shape, scope, groups, fmt, reverse, fresh_plans, monkeypatch):
    row_kernels_only(monkeypatch)
    monkeypatch.setattr(dispatch, "APPLY_REVERSE", reverse)
    monkeypatch.setattr(launch, "POISON", True)
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=True, memory_format=fmt)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, residual=r, dy=dy, activation="silu",
               regime="looped", config=dict(block_p=2, block_m=16))
    looped = [p for p in launch._PLANS.values() if p.kernel is launch.fk._fwd_looped_kernel]
    assert looped, "the forward ran the looped kernel"
    plan = looped[-1]
    assert plan.M % 16 != 0
    assert plan.mid[2] == ((plan.M - 1) // 16 if reverse else 0)


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward-order"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_looped_forward_both_orders_16_bit(dtype, reverse, fresh_plans, monkeypatch):
    row_kernels_only(monkeypatch)
    monkeypatch.setattr(dispatch, "APPLY_REVERSE", reverse)
    x, w, b, r, dy = make_inputs((3, 6, 7, 11), dtype, residual=True, memory_format=torch.channels_last)
    check_case(x, "batch", weight=w, bias=b, residual=r, dy=dy, activation="silu", regime="looped",
               config=dict(block_p=2, block_m=16))
    (plan,) = [p for p in launch._PLANS.values() if p.kernel is launch.fk._fwd_looped_kernel]
    assert plan.mid[2] == ((plan.M - 1) // 16 if reverse else 0) and plan.M % 16 != 0


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward-order"])
@pytest.mark.parametrize("shape,dtype", [((5, 16, 7, 7), torch.float32), ((5, 8, 14, 14), torch.bfloat16)])
def test_planes_looped_both_orders(shape, dtype, reverse, planes_profile, monkeypatch):
    # 256-element fused limits and 512-element tiles (conftest.planes_regime's looped): 5 samples
    # take several tiles, the last one partial.
    planes_profile.update(fused_max={4: 256, 2: 256}, fused_max_backward={4: 256, 2: 256}, tile=512)
    monkeypatch.setattr(dispatch, "APPLY_REVERSE", reverse)
    launch.clear()
    x, w, b, r, dy = make_inputs(shape, dtype, residual=True)
    check_case(x, "batch", weight=w, bias=b, residual=r, dy=dy, activation="silu")
    (plan,) = [p for p in launch._PLANS.values()]
    assert plan.planes is not None and plan.plan.kernel == "looped"
    fwd, bwds = plan.planes, [bp.planes for bp in plan._backward.values() if bp.planes is not None]
    assert bwds, "the backward ran the planes kernel"
    sweeps = [(fwd, fwd.plan.config["block_n"])] + [(q, q.plan.config["block_n"]) for q in bwds]
    for p, block in sweeps:
        assert block < p.N, (p.N, block)  # several sample tiles
        assert p.n_back == ((p.N - 1) // block if reverse else 0)
    if shape[2] == 7:  # 7x7 planes take tiles of several samples; 14x14 ones a sample a tile
        assert any(p.N % block for p, block in sweeps), "one sweep starts on a partial tile"
