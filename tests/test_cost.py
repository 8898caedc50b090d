"""The cost model of explain() against what the launchers really do.

Launch counts are checked against the launches recorded while the real call runs (forward and
backward, with the dispatcher's own plan or a forced regime); byte counts against hand-derived
figures for cases where the ideal is known exactly.
"""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import make_inputs
from helpers import record_launches
from tritonorm import cost, dispatch


class _Launches:
    def __init__(self, monkeypatch):
        self.names = record_launches(monkeypatch)


CASES = [  # scope, shape, groups, memory format
    ("batch", (4, 6, 5, 5), None, None),
    ("batch", (4, 6, 5, 5), None, torch.channels_last),
    ("group", (2, 8, 4, 4), 2, None),
    ("group", (2, 8, 4, 4), 4, torch.channels_last),
    ("instance", (2, 3, 6, 6), None, None),
    ("positional", (3, 16, 2, 2), None, None),
    ("C", (9, 32), None, None),
]


@pytest.mark.parametrize("regime", [None, "looped", "split"])
@pytest.mark.parametrize("scope,shape,groups,fmt", CASES)
def test_predicted_launches_are_the_launches_run(scope, shape, groups, fmt, regime, monkeypatch):
    launches = _Launches(monkeypatch)
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=True, memory_format=fmt)
    for t in (x, w, b, r):
        t.requires_grad_()
    kw = dict(num_groups=groups, weight=w, bias=b, residual=r, activation="silu")
    force = dispatch.forced(regime, block_m=16, split=2) if regime else _nothing()
    with force:
        plain = {**kw, "weight": w.detach(), "bias": b.detach(), "residual": r.detach()}
        fwd = tritonorm.explain(x.detach(), scope, op="forward", **plain)
        bwd = tritonorm.explain(x.detach(), scope, op="backward", **plain)
        y = tritonorm.norm(x, scope, backend="triton", **kw)
        ran_fwd = list(launches.names)
        launches.names.clear()
        torch.autograd.grad(y, [x, w, b, r], dy)
    assert fwd.cost.launches == len(ran_fwd), ran_fwd
    assert bwd.cost.launches == len(launches.names), launches.names


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fused_layer_norm_rows_move_the_ideal_bytes_plus_statistics():
    x = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    w = torch.empty(4096, device="meta", dtype=torch.bfloat16)
    plan = tritonorm.explain(x, "C", weight=w, device="h200")
    assert plan.kernel == "fused"
    n = 4096 * 4096 * 2
    assert plan.cost.ideal_read == n + 4096 * 2 and plan.cost.ideal_written == n
    # Beyond the ideal: only the [5, P] fp32 statistics.
    assert plan.cost.bytes == plan.cost.ideal + 5 * 4096 * 4
    prof = dispatch.PROFILES["h200"]
    assert plan.cost.predicted_us == pytest.approx(prof.launch_us + plan.cost.bytes / (prof.hbm_gbps * 1e3))


def test_split_batch_norm_reads_x_twice_and_says_so():
    x = torch.empty(256, 64, 56, 56, dtype=torch.bfloat16, device="meta")
    plan = tritonorm.explain(x, "batch", device="h200")
    assert plan.kernel == "split"
    assert plan.cost.launches == 2
    assert 1.4 < plan.cost.ratio < 1.6  # two reads and one write of x over one read and one write
    assert isinstance(plan.cost, cost.Cost) and "launches" in plan.cost.summary()


@pytest.mark.parametrize("regime", [None, "looped", "split"])
@pytest.mark.parametrize("scope,shape,groups,fmt", [CASES[0], CASES[3], CASES[6]])
def test_add_norm_predicted_launches_are_the_launches_run(scope, shape, groups, fmt, regime, monkeypatch):
    launches = _Launches(monkeypatch)
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=True, memory_format=fmt)
    for t in (x, w, b, r):
        t.requires_grad_()
    force = dispatch.forced(regime, block_m=16, split=2) if regime else _nothing()
    with force:
        plain = dict(num_groups=groups, weight=w.detach(), bias=b.detach(), add_residual=r.detach())
        fwd = tritonorm.explain(x.detach(), scope, op="forward", **plain)
        bwd = tritonorm.explain(x.detach(), scope, op="backward", **plain)
        y, h = tritonorm.add_norm(x, r, scope, num_groups=groups, weight=w, bias=b, backend="triton")
        ran_fwd = list(launches.names)
        launches.names.clear()
        torch.autograd.grad([y, h], [x, w, b, r], [dy, dy])
    assert fwd.cost.launches == len(ran_fwd), ran_fwd
    assert bwd.cost.launches == len(launches.names), launches.names


def test_fused_add_rms_norm_rows_move_the_ideal_bytes_plus_statistics():
    x = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    w = torch.empty(4096, device="meta", dtype=torch.bfloat16)
    fwd = tritonorm.explain(x, "C", weight=w, center=False, device="h200", add_residual=x,
                            residual_dtype=torch.float32)
    assert fwd.kernel == "fused"
    n = 4096 * 4096
    # Reads x (bf16) and the residual (bf16), writes y (bf16) and h (fp32): once each.
    assert fwd.cost.ideal_read == 4 * n + 4096 * 2 and fwd.cost.ideal_written == 6 * n
    assert fwd.cost.bytes == fwd.cost.ideal + 5 * 4096 * 4
    bwd = tritonorm.explain(x, "C", weight=w, center=False, device="h200", op="backward", add_residual=x)
    # Reads h, dy and dh; writes dx (one tensor for x and the residual) and dweight.
    assert bwd.cost.ideal_read == 6 * n + 4096 * 2 and bwd.cost.ideal_written == 2 * n + 4096 * 2


@pytest.mark.parametrize("regime", [None, "looped", "split"])
def test_broadcast_affine_launches_count_the_expansions(regime, monkeypatch):
    # Triton launches run, plus one torch copy per broadcast parameter forward, and backward one
    # copy (only the unexpanded parameter is saved) and one reduction per parameter.
    # (Per-(sample, channel) parameters are read in place: tests/test_sample_affine.py.)
    launches = _Launches(monkeypatch)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.rand(1, 8, 4, 4) + 0.5).requires_grad_()
    b = torch.randn(2, 1, 1, 1).requires_grad_()
    force = dispatch.forced(regime, block_m=16, split=2) if regime else _nothing()
    with force:
        kw = dict(num_groups=2, weight=w.detach(), bias=b.detach(), activation="silu")
        fwd = tritonorm.explain(x.detach(), "group", op="forward", **kw)
        bwd = tritonorm.explain(x.detach(), "group", op="backward", **kw)
        y = tritonorm.norm(x, "group", num_groups=2, weight=w, bias=b, activation="silu", backend="triton")
        ran_fwd = list(launches.names)
        launches.names.clear()
        torch.autograd.grad(y, [x, w, b], torch.randn_like(y))
    assert fwd.cost.launches == len(ran_fwd) + 2, ran_fwd
    assert bwd.cost.launches == len(launches.names) + 4, launches.names
    assert fwd.cost.bytes > fwd.cost.ideal  # the x-sized expansions are counted, not hidden


@pytest.mark.parametrize("fill", [True, False])
def test_split_partials_are_counted_once_per_apply_program_of_the_launchers_grid(fill, monkeypatch):
    """The split regime's [2, P, SPLIT] partials are read by every column program of the apply
    grid: the model's forward bytes follow the grid the launcher really runs (several tiles a
    program with APPLY_FILL, one without)."""
    from tritonorm.kernels import launch

    monkeypatch.setattr(dispatch, "APPLY_FILL", fill)
    launch.clear()
    x = torch.randn(8, 6, 16, 16)
    with dispatch.forced("split", block_p=2, block_m=16, split=4):
        plan = tritonorm.explain(x, "batch")
        run = launch.forward_plan(x, tritonorm.scope.parse("batch", x.dim()), False, False, False, 0, True,
                                  "train", launch.NO_RUNNING)
    assert plan.kernel == "split" and run.partial is not None
    P, split, programs = 6, run.split, run.grid[1]
    tiles = -(-x.numel() // P // 16)
    assert programs == tiles if not fill else 1 <= programs <= tiles  # without the fill: one tile a program
    n = x.numel() * 4
    partials = 2 * P * split * 4
    # Two sweeps of x, the statistics written, the partials written once and read per program.
    assert plan.cost.bytes_read == 2 * n + partials * programs
    assert plan.cost.bytes_written == n + 5 * P * 4 + partials
