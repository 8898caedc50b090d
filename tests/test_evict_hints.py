"""Second passes over data the L2 cannot keep whole load and store with
eviction_policy="evict_first" (dispatch.second_pass_policy): the split forward's and the
two-stage backward's apply kernels, the looped forward's y sweep, the planes kernels' y and dx
sweeps. The interpreter ignores the hint, so these tests check that the hinted kernels (with an L2
of 0 bytes every second pass takes the hint) compute what the float64 reference does, that the
launches carry the hint exactly where the plan says, and that on the h200 plan only tensors
past half the L2 take it."""

from __future__ import annotations

import pytest
import torch
from cases import check_case, make_inputs
from helpers import row_kernels_on_profile

from tritonorm import dispatch
from tritonorm.bench import l2
from tritonorm.bench.shapes import cases
from tritonorm.kernels import launch


def test_policy_threshold():
    h200 = dispatch.profile_named("h200")
    assert dispatch.second_pass_policy(h200.l2_bytes // 2, h200) == ""
    assert dispatch.second_pass_policy(h200.l2_bytes // 2 + 1, h200) == "evict_first"
    assert h200.l2_bytes == 50 << 20


def test_switch_off(monkeypatch):
    monkeypatch.setattr(dispatch, "EVICT_FIRST", False)
    assert dispatch.second_pass_policy(1 << 40, dispatch.profile_named("h200")) == ""


@pytest.fixture
def no_l2(monkeypatch):
    """The device's profile with an L2 of 0 bytes: every second pass takes the hint."""
    yield row_kernels_on_profile(monkeypatch, l2_bytes=0)
    launch.clear()


def _ev_of_launchers():
    """EV of every launcher of the cached plans, by kernel name."""
    got: dict = {}
    for plan in list(launch._PLANS.values()):
        plans = [plan, *plan._backward.values()]
        for p in plans:
            for value in vars(p).values():
                for item in (value if isinstance(value, tuple) else (value,)):
                    kernel = getattr(item, "kernel", None)
                    if kernel is not None and hasattr(item, "constexprs"):
                        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
                        got.setdefault(name, set()).add(item.constexprs.get("EV", ""))
    return got


@pytest.mark.parametrize("regime,config", [("split", dict(block_p=2, block_m=16, split=3)),
                                           ("looped", dict(block_p=2, block_m=16))])
@pytest.mark.parametrize("shape,scope,groups,fmt", [((2, 6, 9, 10), "batch", None, None),
                                                    ((3, 8, 5, 6), "batch", None, torch.channels_last),
                                                    ((2, 6, 10, 15), "group", 2, None)])
def test_row_kernels_with_the_hint(shape, scope, groups, fmt, regime, config, no_l2):
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=True, memory_format=fmt)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, residual=r, dy=dy, activation="silu",
               regime=regime, config=config)
    ev = _ev_of_launchers()
    second = "_fwd_apply_kernel" if regime == "split" else "_fwd_looped_kernel"
    assert ev[second] == {"evict_first"}, ev
    assert ev["_bwd_apply_kernel"] == {"evict_first"}, ev
    for first in ("_fwd_partial_kernel", "_bwd_sums_kernel"):  # first passes take no hint
        assert ev.get(first, {""}) == {""}, ev


@pytest.mark.parametrize("shape,dtype", [((5, 16, 7, 7), torch.float32), ((5, 8, 14, 14), torch.bfloat16)])
def test_planes_kernels_with_the_hint(shape, dtype, planes_profile, monkeypatch):
    planes_profile.update(fused_max={4: 256, 2: 256}, fused_max_backward={4: 256, 2: 256}, tile=512, l2_bytes=0)
    launch.clear()
    x, w, b, r, dy = make_inputs(shape, dtype, residual=True)
    check_case(x, "batch", weight=w, bias=b, residual=r, dy=dy, activation="silu")
    (plan,) = list(launch._PLANS.values())
    assert plan.planes is not None and plan.plan.kernel == "looped"
    assert plan.planes.launch.constexprs["EV"] == "evict_first"
    bwds = [bp.planes for bp in plan._backward.values() if bp.planes is not None]
    assert bwds and all(p.launch.constexprs["EV"] == "evict_first" for p in bwds)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("regime,config", [("split", dict(block_p=2, block_m=16, split=3)),
                                           ("looped", dict(block_p=2, block_m=16))])
def test_row_kernels_with_the_hint_16_bit(regime, config, dtype, no_l2):
    # odd sizes (M = 3 * 7 * 11 = 231 columns: the last tile partial), channels_last
    x, w, b, r, dy = make_inputs((3, 6, 7, 11), dtype, residual=True, memory_format=torch.channels_last)
    check_case(x, "batch", weight=w, bias=b, residual=r, dy=dy, activation="silu", regime=regime, config=config)
    ev = _ev_of_launchers()
    assert ev["_fwd_apply_kernel" if regime == "split" else "_fwd_looped_kernel"] == {"evict_first"}, ev
    assert ev["_bwd_apply_kernel"] == {"evict_first"}, ev


def test_no_hint_without_a_second_pass(no_l2):
    # fused: one pass; eval (running statistics): the apply kernel's only pass
    x, w, b, _, dy = make_inputs((2, 6, 9, 10), torch.float32)
    check_case(x, "batch", weight=w, bias=b, dy=dy, regime="fused")
    ev = _ev_of_launchers()
    assert "_fwd_fused_kernel" in ev and all(v == {""} for v in ev.values()), ev
    launch.clear()
    import tritonorm

    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    with dispatch.forced("split", block_p=2, block_m=16, split=3):
        tritonorm.norm(x, "batch", weight=w, bias=b, running_mean=rm, running_var=rv, training=False,
                       backend="triton")
    ev = _ev_of_launchers()
    assert "_fwd_apply_kernel" in ev and all(v == {""} for v in ev.values()), ev


def _case(name):
    (c,) = [c for c in cases("all") if c.name == name]
    return c


@pytest.mark.parametrize("name,fwd,bwd", [
    ("bn 64x112^2 b32", "evict_first", "evict_first"),    # x 49 MiB: past half the L2 both ways
    ("bn 512x28^2 b32", "", "evict_first"),               # x 24.5 MiB; x and dy 49 MiB
    ("gn32+silu 320x64^2 b2", "", ""),                    # 5 MiB: stays in the L2 for the next layer
    ("bn 2048x7^2 b256", "evict_first", "evict_first"),   # planes kernels, looped
])
def test_h200_plan_hints_only_large_second_passes(name, fwd, bwd):
    case = _case(name)
    f, b = l2.record_call(case, torch.bfloat16, case.channels_last, "h200")
    for launches, want in ((f, fwd), (b, bwd)):
        evs = {la.name: l2._args(la).get("EV", "") for la in launches}
        second = [n for n in evs if "apply" in n or n.startswith("_planes")]
        assert second, evs
        assert {evs[n] for n in second} == {want}, evs
        assert all(evs[n] == "" for n in evs if n not in second), evs
