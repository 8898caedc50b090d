"""Ghost BatchNorm (``scope="batch", sample_groups=S``) on dense NCHW tensors with planes of
other than 16k elements: the flat channel-block kernels (kernels/planes.py) with a program per
(channel block, sample group), statistics at s*C + c, and dweight/dbias from [2, S, C] fp32
partials added by ``_finish_kernel``. Forward and every gradient against the float64 reference
run on each group of samples; the launches recorded against explain()'s count; running
statistics (blended by the caller with torch ops) against the chunked reference."""

from __future__ import annotations


import pytest
import torch

import tritonorm
from cases import make_inputs
from helpers import LOW, assert_close, assert_sample_group_grads, record_launches
from tritonorm import cost, dispatch, planes_plan, reference, scope as scopes
from tritonorm.kernels import launch
from tritonorm.nn import GhostBatchNorm2d

# (shape, dtype, S): fp32 7^2 blocks are 4 channels (2 blocks of 8), bf16 8 (one block); every
# case has at least the interpreter profile's 2 programs. fp32 groups of 3 samples: the looped
# regime's forward tiles of 2 samples, the last one partial.
CASES = [((6, 8, 7, 7), torch.float32, 2), ((12, 8, 7, 7), torch.float32, 4),
         ((4, 8, 7, 7), torch.bfloat16, 2), ((8, 8, 7, 7), torch.bfloat16, 4)]


pytestmark = pytest.mark.usefixtures("planes_profile")


@pytest.fixture
def regime(planes_regime):
    return planes_regime


def _chunked(leaves, s, activation, compute_dtype=None):
    """The oracle: plain BatchNorm's reference on each group of samples."""
    x, w, b, r = leaves
    spec = scopes.parse("batch", x.dim(), None, x.shape[1])
    res = [None] * s if r is None else r.chunk(s)
    return torch.cat([reference.norm(xc, spec, w, b, 1e-5, True, activation, rc, compute_dtype=compute_dtype)
                      for xc, rc in zip(x.chunk(s), res)])


def _check(shape, dtype, s, monkeypatch, *, affine="wb", residual=False, activation=None, want="xwbr"):
    """Forward and the gradients named in ``want`` against the chunked float64 reference, with
    the planes kernels asserted to run; returns (forward launches, backward launches, the
    backward explain() predicts)."""
    x, w, b, r, dy = make_inputs(shape, dtype, residual=residual, offset=1.5)
    leaves = [x, w if "w" in affine else None, b if "b" in affine else None, r]
    grad = [t is not None and k in want for t, k in zip(leaves, "xwbr")]
    ours = [None if t is None else t.detach().clone().requires_grad_(g) for t, g in zip(leaves, grad)]
    ref = [None if t is None else t.detach().double().requires_grad_(g) for t, g in zip(leaves, grad)]
    names = record_launches(monkeypatch)
    kw = dict(sample_groups=s, activation=activation)
    y = tritonorm.norm(ours[0], "batch", weight=ours[1], bias=ours[2], residual=ours[3], backend="triton", **kw)
    fwd = list(names)
    plain = [None if t is None else t.detach() for t in ours]
    predicted = tritonorm.explain(plain[0], "batch", weight=plain[1], bias=plain[2], residual=plain[3],
                                  op="backward", **kw)
    names.clear()
    live = [t for t, g in zip(ours, grad) if g]
    got = torch.autograd.grad(y, live, dy)
    (plan,) = launch._PLANS.values()
    assert plan.planes is not None and plan.planes.S == s
    y64 = _chunked(ref, s, activation)
    exp = torch.autograd.grad(y64, [t for t, g in zip(ref, grad) if g], dy.double())
    eager_y = eager_g = None
    if dtype in LOW:
        low = [None if t is None else t.detach().clone().requires_grad_(g) for t, g in zip(leaves, grad)]
        eager_y = _chunked(low, s, activation, compute_dtype=dtype)
        eager_g = torch.autograd.grad(eager_y, [t for t, g in zip(low, grad) if g], dy)
    spec = scopes.parse("batch", x.dim(), None, x.shape[1], sample_groups=s)
    labels = [n for n, g in zip(("dx", "dweight", "dbias", "dresidual"), grad) if g]
    assert_sample_group_grads(x, spec, leaves, r, dy, y, y64, got, exp, live, labels, dtype, eager_y, eager_g)
    return fwd, list(names), predicted


@pytest.mark.parametrize("shape,dtype,s", CASES)
def test_forward_and_backward_per_sample_group(monkeypatch, shape, dtype, s, regime):
    fwd, bwd, predicted = _check(shape, dtype, s, monkeypatch, residual=True, activation="silu")
    assert fwd == ["_planes_fwd_kernel"]
    assert bwd == ["_planes_bwd_kernel", "_finish_kernel"]  # [2, S, C] partials added over S
    assert predicted.cost.launches == 2 and "planes" in predicted.config
    (plan,) = launch._PLANS.values()
    assert plan.plan.kernel == regime
    assert next(iter(plan._backward.values())).planes.plan.kernel == regime


@pytest.mark.parametrize("affine,want,launched", [
    ("", "x", ["_planes_bwd_kernel"]),                      # nothing to add over the groups
    ("w", "xw", ["_planes_bwd_kernel", "_finish_kernel"]),
    ("b", "xb", ["_planes_bwd_kernel", "_finish_kernel"]),
    ("wb", "x", ["_planes_bwd_kernel"]),                    # dx alone: no partials
    ("wb", "wb", ["_planes_bwd_kernel", "_finish_kernel"]),  # no dx: the sums only
])
def test_affine_and_gradient_subsets(monkeypatch, affine, want, launched, regime):
    _, bwd, predicted = _check((6, 8, 7, 7), torch.float32, 2, monkeypatch, affine=affine, want=want,
                               activation="relu")
    assert bwd == launched
    if want.startswith("x") and want[1:] == affine:  # explain counts every gradient asked for
        assert predicted.cost.launches == len(bwd)


def test_one_sample_group_keeps_one_backward_launch(monkeypatch):
    # S = 1 is plain BatchNorm: dweight and dbias stored directly by the planes kernel.
    fwd, bwd, predicted = _check((3, 8, 7, 7), torch.float32, 1, monkeypatch, residual=True, activation="gelu")
    assert (fwd, bwd) == (["_planes_fwd_kernel"], ["_planes_bwd_kernel"])
    assert predicted.cost.launches == 1


def test_running_statistics_blended_by_the_caller(regime):
    # The kernels store the S*C statistics; core blends their mean over the groups (unbiased
    # variance of each group) into the per-channel running buffers with torch ops, once.
    s, shape = 2, (6, 8, 7, 7)
    x, w, b, _, _ = make_inputs(shape, torch.float32, offset=1.5)
    rm, rv = torch.randn(8), torch.rand(8) + 0.5
    plain = scopes.parse("batch", 4, None, 8)
    m = 3 * 49
    stats = [reference.moments(c, plain) for c in x.double().chunk(s)]
    rm64 = 0.7 * rm.double() + 0.3 * torch.stack([mu for mu, _ in stats]).mean(0)
    rv64 = 0.7 * rv.double() + 0.3 * torch.stack([v * m / (m - 1) for _, v in stats]).mean(0)
    tritonorm.norm(x, "batch", sample_groups=s, weight=w, bias=b, running_mean=rm, running_var=rv, momentum=0.3,
                   backend="triton")
    (plan,) = launch._PLANS.values()
    assert plan.planes is not None and not plan.planes.blends
    assert_close(rm, rm64, torch.float32, what="running_mean")
    assert_close(rv, rv64, torch.float32, what="running_var")


def test_ghost_module_trains_and_evaluates_on_the_planes_kernels(monkeypatch):
    m = GhostBatchNorm2d(8, 3, momentum=0.2)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
        m.running_var.uniform_(0.5, 1.5)
    x, _, _, _, dy = make_inputs((6, 8, 7, 7), torch.float32)
    x64 = x.double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (m.weight, m.bias))
    y64 = torch.cat([reference.norm(c, scopes.parse("batch", 4), w64, b64) for c in x64.split(3)])
    chunks = x.double().split(3)
    means = torch.stack([c.transpose(0, 1).reshape(8, -1).mean(1) for c in chunks]).mean(0)
    variances = torch.stack([c.transpose(0, 1).reshape(8, -1).var(1) for c in chunks]).mean(0)
    rm64 = 0.8 * m.running_mean.double() + 0.2 * means
    rv64 = 0.8 * m.running_var.double() + 0.2 * variances
    names = record_launches(monkeypatch)
    xs = x.clone().requires_grad_()
    y = m(xs)
    g = torch.autograd.grad(y, (xs, m.weight, m.bias), dy)
    assert names == ["_planes_fwd_kernel", "_planes_bwd_kernel", "_finish_kernel"]
    assert_close(y, y64, torch.float32)
    for name, a, e in zip(("dx", "dweight", "dbias"), g, torch.autograd.grad(y64, (x64, w64, b64), dy.double())):
        assert_close(a, e, torch.float32, what=name)
    assert_close(m.running_mean, rm64, torch.float32, what="running_mean")
    assert_close(m.running_var, rv64, torch.float32, what="running_var")
    # Eval: the running statistics over the whole batch (one group), the plain planes kernel.
    m.eval()
    names.clear()
    before = m.running_mean.clone(), m.running_var.clone()
    y = m(x)
    assert names == ["_planes_fwd_kernel"]
    e64 = reference.norm(x.double(), scopes.parse("batch", 4), m.weight.double(), m.bias.double(),
                         running_mean=m.running_mean.double(), running_var=m.running_var.double(), training=False)
    assert_close(y, e64, torch.float32)
    assert torch.equal(before[0], m.running_mean) and torch.equal(before[1], m.running_var)


def test_applies_counts_programs_of_every_sample_group():
    # One 8-channel bf16 block at 7^2: too few programs for the interpreter's 4 SMs alone, enough
    # with 2 sample groups; S must divide N (validation says so first).
    prof = dispatch.PROFILES["interpreter"]
    stride = (392, 49, 7, 1)
    one = scopes.parse("batch", 4, None, 8)
    two = scopes.parse("batch", 4, None, 8, sample_groups=2)
    assert not planes_plan.applies((4, 8, 7, 7), stride, stride, one, 2, prof)
    assert planes_plan.applies((4, 8, 7, 7), stride, stride, two, 2, prof)
    # batch_group reduces channels: not these kernels.
    bg = scopes.parse("batch_group", 4, 2, 8, sample_groups=2)
    assert not planes_plan.applies((4, 8, 7, 7), stride, stride, bg, 4, prof)
    # The regime follows the group's samples, not the batch.
    assert planes_plan.choose((64, 8, 7, 7), 4, prof, "forward", groups=16).kernel == "fused"


def test_resnet_stages_on_h200_explain_and_cost():
    # The ghost-bn suite's 14^2 and 7^2 stages (batch 256 in groups of 32): 512 and 256 channel
    # blocks x 8 groups; forward one launch, backward two with the [2, S, C] partials written
    # and read back beyond the sweeps of plain planes.
    S = 8
    for C, hw in ((1024, 14), (2048, 7)):
        x = torch.empty(256, C, hw, hw, dtype=torch.bfloat16, device="meta")
        w = torch.empty(C, dtype=torch.bfloat16, device="meta")
        kw = dict(sample_groups=S, weight=w, bias=w, activation="relu", device="h200")
        fwd = tritonorm.explain(x, "batch", op="forward", **kw)
        bwd = tritonorm.explain(x, "batch", op="backward", **kw)
        assert "planes" in fwd.config and "planes" in bwd.config and "8 sample groups" in bwd.reason
        assert fwd.cost.launches == 1 and bwd.cost.launches == 2
        blocks = C // fwd.config["planes"]
        assert blocks * S >= dispatch.PROFILES["h200"].sm_count
        plain = cost.planes_backward_cost(bwd, _problem(x, S), dispatch.PROFILES["h200"], elem_bytes=2, channels=C,
                                          has_w=True, has_b=True, has_res=False, act=True, param_bytes=2)
        assert plain.launches == 1 and bwd.cost.bytes == plain.bytes + 2 * (2 * S * C * 4)


def _problem(x, s):
    spec = scopes.parse("batch", 4, None, x.shape[1], sample_groups=s)
    from tritonorm.kernels.layout import stat_view

    view = stat_view(tuple(x.shape), spec, x.stride(), x.stride())
    return dispatch.problem_from_view("backward", view, 2, spec=spec)
