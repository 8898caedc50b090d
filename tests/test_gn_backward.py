"""GroupNorm and InstanceNorm backward: dweight/dbias from the dx pass's per-(sample, channel)
partials (kernels/backward.py, layout.Segments), two launches in every regime.

Every case runs under launch.POISON against the float64 reference; the launches are recorded.
"""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import check_case, make_inputs
from helpers import assert_close, record_launches, row_kernels_only, small_tiles
from tritonorm import dispatch, reference, scope as scopes

CL, CL3 = torch.channels_last, torch.channels_last_3d

# shape, scope, groups, memory format: 1-D, 2-D, 3-D spatial; NCHW and channels_last; segments
# of one channel a statistic (InstanceNorm, groups == C), several (GroupNorm), all (groups = 1).
CASES = [
    ((2, 6, 5), "group", 3, None),
    ((2, 8, 4, 4), "group", 2, None),
    ((2, 8, 3, 5), "group", 4, CL),
    ((2, 8, 2, 3, 4), "group", 4, CL3),
    ((2, 8, 4, 4), "group", 8, None),
    ((2, 3, 7), "instance", None, None),
    ((2, 3, 5, 6), "instance", None, CL),
    ((2, 3, 2, 3, 4), "instance", None, None),
]
REGIMES = ("fused", "looped", "split")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    row_kernels_only(monkeypatch)  # here the row/column kernels' segment path, in every layout


def _force(regime):
    return small_tiles(regime)


def _expected(regime):
    """The backward's launches: the dx pass and either the finish (fused) or the sums kernel."""
    if regime == "fused":
        return ["_bwd_fused_kernel", "_finish_kernel"]
    return ["_bwd_sums_kernel", "_bwd_apply_kernel"]


# (case, regime) pairs: every case, every regime, each layout in fused and a two-stage regime
# (the interpreter is slow; the full product adds no path).
PAIRS = [(0, "fused"), (0, "split"), (1, "fused"), (1, "looped"), (1, "split"), (2, "fused"), (2, "split"),
         (3, "fused"), (3, "looped"), (4, "split"), (5, "looped"), (6, "fused"), (6, "split"), (7, "split")]


@pytest.mark.parametrize("shape,scope,groups,fmt,regime", [(*CASES[i], r) for i, r in PAIRS])
def test_gradients_in_two_launches(shape, scope, groups, fmt, regime, monkeypatch):
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=True, memory_format=fmt)
    names = record_launches(monkeypatch)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, residual=r, dy=dy, activation="silu",
               regime=regime, config=dict(block_p=4, block_m=16, split=2) if regime != "fused" else None)
    fwd = {"fused": 1, "looped": 1, "split": 2}[regime]
    assert names[fwd:] == _expected(regime), names


@pytest.mark.parametrize("shape,scope,groups,fmt,regime", [(*CASES[1], "split"), (*CASES[2], "fused"),
                                                            (*CASES[6], "looped")])
def test_bf16_without_activation(shape, scope, groups, fmt, regime):
    x, w, b, _, dy = make_inputs(shape, torch.bfloat16, memory_format=fmt)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, dy=dy, regime=regime,
               config=dict(block_p=4, block_m=16, split=2) if regime != "fused" else None)


# Which of x, weight, bias, residual require grad (the backward is planned for exactly those),
# with a case and regime each.
SUBSETS = [("w", 1, "fused"), ("b", 3, "split"), ("x", 5, "fused"), ("x", 1, "split"), ("xw", 3, "fused"),
           ("xb", 1, "looped"), ("rw", 5, "split"), ("rb", 3, "fused")]


@pytest.mark.parametrize("want,case,regime", SUBSETS)
def test_gradient_subsets(want, case, regime, monkeypatch):
    shape, scope, groups, fmt = CASES[case]
    _subset(shape, scope, groups, fmt, regime, want, monkeypatch)


def _subset(shape, scope, groups, fmt, regime, want, monkeypatch):
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=True, memory_format=fmt)
    spec = scopes.parse(scope, x.dim(), groups, x.shape[1])
    leaves = {"x": x, "w": w, "b": b, "r": r}
    ours = {k: t.detach().requires_grad_(k in want) for k, t in leaves.items()}
    ref = {k: t.detach().double().requires_grad_(k in want) for k, t in leaves.items()}
    names = record_launches(monkeypatch)
    with _force(regime):
        y = tritonorm.norm(ours["x"], scope, num_groups=groups, weight=ours["w"], bias=ours["b"],
                           residual=ours["r"], activation="gelu", backend="triton")
        names.clear()
        got = torch.autograd.grad(y, [ours[k] for k in want], dy)
    y64 = reference.norm(ref["x"], spec, ref["w"], ref["b"], 1e-5, True, "gelu", ref["r"])
    exp = torch.autograd.grad(y64, [ref[k] for k in want], dy.double())
    for k, a, e in zip(want, got, exp):
        assert a.dtype == leaves[k].dtype
        term = 1.2 * (reference.moments(x.double(), spec)[1] + 1e-5).rsqrt().max().item() * dy.abs().max().item()
        assert_close(a, e, torch.float32, what=k, term_scale=term * 1.5 if k in "xr" else 0.0)
    dx_pass = "x" in want or "r" in want  # dresidual is gz, written by the dx pass
    if dx_pass:
        expected = _expected(regime)
        if regime == "fused" and "w" not in want and "b" not in want:
            expected = expected[:1]  # dx alone: nothing to finish
        assert names == expected, names
    else:  # dweight/dbias alone: one channel-view sweep (plus a finish when it splits)
        assert 1 <= len(names) <= 2 and names[0] == "_dwdb_kernel", names


def test_finish_loops_over_channel_blocks_when_programs_are_few(monkeypatch):
    # LayerNorm over (C, H, W) of one sample: one statistic, one apply program, 130 channels =
    # three channel blocks of the apply kernel's finish.
    x, w, b, _, dy = make_inputs((1, 130, 2, 3), torch.float32)
    names = record_launches(monkeypatch)
    check_case(x, "group", num_groups=1, weight=w, bias=b, dy=dy, regime="looped",
               config=dict(block_p=64, block_m=1024))
    assert names == ["_fwd_looped_kernel", "_bwd_sums_kernel", "_bwd_apply_kernel"], names


def test_fused_limit_counts_the_padded_channel_tile():
    # 5 channels of 1100 positions a group: M = 5500 fits the fused backward (8192), but the
    # (channel, position) tile it needs for dweight/dbias is 8 x 2048 = 16384.
    x = torch.empty(64, 160, 1100, dtype=torch.bfloat16, device="meta")
    w = torch.empty(160, dtype=torch.bfloat16, device="meta")
    assert tritonorm.explain(x, "group", num_groups=32, device="h200", op="backward").kernel == "fused"
    plan = tritonorm.explain(x, "group", num_groups=32, weight=w, device="h200", op="backward")
    assert plan.kernel != "fused" and plan.cost.launches == 2


@pytest.mark.parametrize("shape,groups", [((64, 320, 16, 16), 32), ((1, 320, 64, 64), 32), ((2, 64, 32, 32), 64)])
def test_cost_counts_partials_not_a_second_sweep(shape, groups):
    # Bytes beyond the ideal: the statistics and the fp32 partials only (fused), or the second
    # read of x and dy that any two-stage backward makes, plus statistics and partials.
    x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    w = torch.empty(shape[1], dtype=torch.bfloat16, device="meta")
    b = torch.empty(shape[1], dtype=torch.bfloat16, device="meta")
    kw = dict(num_groups=groups, weight=w, bias=b, device="h200")
    plan = tritonorm.explain(x, "group", op="backward", **kw)
    N, C = shape[:2]
    P = N * groups
    n = x.numel() * 2
    c = plan.cost
    assert c.launches == 2
    if plan.kernel == "fused":
        assert c.bytes == c.ideal + 3 * P * 4 + 2 * (2 * N * C * 4)
    else:
        split = tritonorm.explain(x, "group", op="dwdb", **kw).config.get("split", 1)
        part = 4 * N * C * split * 4
        # Each apply program reads its statistics' S1, S2 partials (half of them; dispatch.apply_grid
        # as the launcher runs it), the dweight/dbias planes once.
        merges = 1
        if plan.kernel == "split":
            cfg, prof = plan.config, dispatch.PROFILES["h200"]
            merges = dispatch.apply_grid(P, x.numel() // P, cfg["block_p"], cfg["block_m"],
                                         fill=dispatch._fill(cfg["num_warps"], prof))[0][1]
        assert c.bytes == c.ideal + 2 * n + 2 * C * 2 + 3 * P * 4 + 3 * N * C * 4 + 2 * part + part // 2 * (merges - 1)
