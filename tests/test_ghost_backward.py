"""Ghost BatchNorm's backward (``scope="batch", sample_groups=S``) in two launches, and
batch_group's (channel groups, any S).

Each statistic is one (sample group, channel) segment: the dx pass's per-statistic sums of gz and
gz * xhat are dweight/dbias partials [2, S, C] (layout.batch_segments), added over the S
groups by ``_finish_kernel`` (fused) or by the apply kernel's first programs (looped, split);
batch_group's statistic (s, g) is Cg such segments.
Every regime, layout, dtype and affine combination is checked against the float64 reference run
on each group of samples, with the launches recorded and compared to explain()'s count.
"""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import make_inputs
from helpers import LOW, assert_sample_group_grads, record_launches, small_tiles
from tritonorm import dispatch, planes_plan, reference, scope as scopes
from tritonorm.kernels import launch


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)
    launch.clear()


# The backward's launches with dweight or dbias asked for next to dx: no channel-view sweep.
TWO = {"fused": ["_bwd_fused_kernel", "_finish_kernel"],
       "looped": ["_bwd_sums_kernel", "_bwd_apply_kernel"],
       "split": ["_bwd_sums_kernel", "_bwd_apply_kernel"]}


def _chunked(leaves, s, activation, compute_dtype=None, scope="batch", groups=None):
    """The oracle: the reference (the scope without sample groups) on each group of samples."""
    x, w, b, r = leaves
    spec = scopes.parse(scope, x.dim(), groups, x.shape[1])
    res = [None] * s if r is None else r.chunk(s)
    return torch.cat([reference.norm(xc, spec, w, b, 1e-5, True, activation, rc, compute_dtype=compute_dtype)
                      for xc, rc in zip(x.chunk(s), res)])


def _check(shape, s, monkeypatch, *, dtype=torch.float32, fmt=None, regime=None, affine="wb",
           residual=False, activation=None, want="xwbr", x=None, scope="batch", groups=None):
    """Forward and the gradients named in ``want`` (of x, weight, bias, residual that exist)
    against the chunked float64 reference; returns the backward's recorded launches."""
    if x is None:
        x, *_ = make_inputs(shape, dtype, memory_format=fmt, offset=1.5)
    _, w, b, r, dy = make_inputs(x.shape, dtype, residual=residual)
    leaves = [x, w if "w" in affine else None, b if "b" in affine else None, r]
    grad = [t is not None and k in want for t, k in zip(leaves, "xwbr")]
    ours = [None if t is None else t.detach().clone(memory_format=torch.preserve_format).requires_grad_(g)
            for t, g in zip(leaves, grad)]
    ref = [None if t is None else t.detach().double().requires_grad_(g) for t, g in zip(leaves, grad)]
    names = record_launches(monkeypatch)
    with small_tiles(regime) if regime else _null():
        y = tritonorm.norm(ours[0], scope, num_groups=groups, sample_groups=s, weight=ours[1], bias=ours[2],
                           residual=ours[3], activation=activation, backend="triton")
        plain = [None if t is None else t.detach() for t in ours]
        predicted = tritonorm.explain(plain[0], scope, num_groups=groups, sample_groups=s, weight=plain[1],
                                      bias=plain[2], residual=plain[3], activation=activation,
                                      op="backward").cost.launches
        names.clear()
        live = [t for t, g in zip(ours, grad) if g]
        got = torch.autograd.grad(y, live, dy)
    y64 = _chunked(ref, s, activation, scope=scope, groups=groups)
    exp = torch.autograd.grad(y64, [t for t, g in zip(ref, grad) if g], dy.double())
    eager_y = eager_g = None
    if dtype in LOW:
        low = [None if t is None else t.detach().clone().requires_grad_(g) for t, g in zip(leaves, grad)]
        eager_y = _chunked(low, s, activation, compute_dtype=dtype, scope=scope, groups=groups)
        eager_g = torch.autograd.grad(eager_y, [t for t, g in zip(low, grad) if g], dy)
    spec = scopes.parse(scope, x.dim(), groups, x.shape[1], sample_groups=s)
    labels = [n for n, g in zip(("dx", "dweight", "dbias", "dresidual"), grad) if g]
    assert_sample_group_grads(x, spec, leaves, r, dy, y, y64, got, exp, live, labels, dtype, eager_y, eager_g)
    if want == "xwbr" or (grad[0] and (grad[1] or grad[2])):
        assert predicted == len(names), (predicted, names)  # explain counts every gradient asked for
    return names


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("regime", ["fused", "looped", "split"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_every_regime_and_layout_in_two_launches(regime, fmt, monkeypatch):
    names = _check((6, 4, 3, 5), 3, monkeypatch, fmt=fmt, regime=regime, residual=True, activation="silu")
    assert names == TWO[regime], names


@pytest.mark.parametrize("regime", ["fused", "split"])
@pytest.mark.parametrize("affine", ["w", "b"])
def test_weight_only_or_bias_only(affine, regime, monkeypatch):
    names = _check((4, 5, 7), 2, monkeypatch, regime=regime, affine=affine)
    assert names == TWO[regime], names


@pytest.mark.parametrize("regime", ["fused", "split"])
def test_without_affine_nothing_to_finish(regime, monkeypatch):
    names = _check((6, 3, 2, 4), 3, monkeypatch, regime=regime, affine="")
    assert names == (["_bwd_fused_kernel"] if regime == "fused" else TWO[regime]), names


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("regime,fmt", [("fused", torch.channels_last), ("split", None)])
def test_low_precision(dtype, regime, fmt, monkeypatch):
    names = _check((8, 4, 3, 3), 4, monkeypatch, dtype=dtype, fmt=fmt, regime=regime)
    assert names == TWO[regime], names


def test_dispatchers_own_plan_2d_and_3d(monkeypatch):
    # No forced regime: whatever the dispatcher picks still takes two launches.
    for shape, s, fmt in (((8, 5), 4, None), ((4, 3, 2, 3, 2), 2, torch.channels_last_3d)):
        names = _check(shape, s, monkeypatch, fmt=fmt, residual=True, activation="relu")
        assert len(names) == 2 and "_dwdb_kernel" not in names, names


@pytest.mark.parametrize("regime", ["fused", "looped", "split"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
@pytest.mark.parametrize("s", [1, 2])
def test_batch_group(s, fmt, regime, monkeypatch):
    # Statistic (s, g) spans Cg channels: segments s*C + c of the same partials, on the segment
    # view (rows (s, c)) in the looped/split sums kernel, on a (position, channel) tile when fused
    # in channels_last. NCHW has no such fused tile (the channel digit is inside N): the fused dx
    # kernel plus the channel-view sweep.
    names = _check((4, 6, 3, 2), s, monkeypatch, fmt=fmt, regime=regime, scope="batch_group", groups=3,
                   residual=True, activation="gelu")
    if fmt is None and regime == "fused":
        assert names[:2] == ["_bwd_fused_kernel", "_dwdb_kernel"], names
    else:
        assert names == TWO[regime], names


def test_weight_gradient_alone_sweeps_the_channel_view(monkeypatch):
    # x needs no gradient: no dx pass to ride on, so the channel-view sweep (one or two launches).
    for regime in ("fused", "split"):
        names = _check((6, 4, 3, 2), 3, monkeypatch, regime=regime, want="wb")
        assert names[0] == "_dwdb_kernel" and len(names) <= 2, names


def test_dx_alone_one_pass(monkeypatch):
    names = _check((6, 4, 3, 2), 3, monkeypatch, regime="fused", want="x")
    assert names == ["_bwd_fused_kernel"], names


def test_channel_outside_n_keeps_the_sweep(monkeypatch):
    # C outside N in memory: the statistic view's rows are channel-major, not s*C + c, the order
    # the partials are added in; the channel-view sweep runs instead, and explain says so.
    x = torch.randn(5, 8, 6).permute(1, 0, 2)
    names = _check(x.shape, 4, monkeypatch, regime="split", x=x)
    assert "_dwdb_kernel" in names, names


def test_cost_counts_the_partials_not_a_second_sweep(monkeypatch):
    # Fused (ResNet-50's last stage, batch 256 in groups of 32, on the row/column kernels: the
    # planes kernels, which take it when enabled, are test_planes_groups.py's): beyond the ideal
    # only the statistics read and the [2, S, C] fp32 partials written and read back.
    monkeypatch.setattr(planes_plan, "ENABLED", False)
    S, C = 8, 2048
    x = torch.empty(256, C, 7, 7, dtype=torch.bfloat16, device="meta")
    w = torch.empty(C, dtype=torch.bfloat16, device="meta")
    plan = tritonorm.explain(x, "batch", sample_groups=S, weight=w, bias=w, device="h200", op="backward")
    assert plan.kernel == "fused" and plan.cost.launches == 2
    assert plan.cost.bytes == plan.cost.ideal + 3 * S * C * 4 + 2 * (2 * S * C * 4)
    # Looped/split: the second read of x and dy any two-stage backward makes, the statistics,
    # the [4, S*C, split] partials written and read back: no third sweep.
    x = torch.empty(256, 64, 56, 56, dtype=torch.bfloat16, device="meta")
    w = torch.empty(64, dtype=torch.bfloat16, device="meta")
    kw = dict(sample_groups=S, weight=w, bias=w, device="h200")
    plan = tritonorm.explain(x, "batch", op="backward", **kw)
    assert plan.kernel in ("looped", "split") and plan.cost.launches == 2
    split = tritonorm.explain(x, "batch", op="dwdb", **kw).config.get("split", 1)
    n, P = x.numel() * 2, S * 64
    part = 4 * P * split * 4
    # Each apply program reads its statistics' S1, S2 partials (half of them; dispatch.apply_grid
    # as the launcher runs it), the dweight/dbias planes once.
    merges = 1
    if plan.kernel == "split":
        cfg, prof = plan.config, dispatch.PROFILES["h200"]
        merges = dispatch.apply_grid(P, x.numel() // P, cfg["block_p"], cfg["block_m"],
                                     fill=dispatch._fill(cfg["num_warps"], prof))[0][1]
    partials = part + part + part // 2 * (merges - 1)
    assert plan.cost.bytes == plan.cost.ideal + 2 * n + 2 * 64 * 2 + 3 * P * 4 + 3 * P * 4 + partials
