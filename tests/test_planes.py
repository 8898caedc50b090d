"""BatchNorm on dense NCHW tensors with planes of other than 16k elements (7x7, 14x14): the flat
channel-block kernels (kernels/planes.py), forward and backward against the float64 reference,
running statistics against torch's, eval mode, and where the kernels are (not) taken."""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import check_case, make_inputs
from helpers import assert_close, record_launches
from tritonorm import cost, dispatch, planes_plan, reference, scope as scopes
from tritonorm.kernels import launch

SHAPES = [((3, 16, 7, 7), torch.float32), ((3, 16, 7, 7), torch.bfloat16),
          ((3, 8, 14, 14), torch.float32), ((3, 8, 14, 14), torch.bfloat16)]


pytestmark = pytest.mark.usefixtures("planes_profile")


@pytest.fixture
def regime(planes_regime):
    return planes_regime


def _applies(x):
    spec = scopes.parse("batch", x.dim(), None, x.shape[1])
    return planes_plan.applies(tuple(x.shape), x.stride(), x.stride(), spec, x.element_size(),
                          dispatch.profile_for_device(x.device))


def _launched(monkeypatch, x, w, **kw):
    """Kernels launched by a forward, then by its backward (dx and dweight)."""
    names = record_launches(monkeypatch)
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = tritonorm.norm(x, "batch", weight=w, backend="triton", **kw)
    fwd = list(names)
    y.backward(torch.randn_like(y))
    return fwd, names[len(fwd):]


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_planes_forward_and_backward(monkeypatch, shape, dtype, regime):
    x, w, b, r, dy = make_inputs(shape, dtype, residual=True)
    assert _applies(x)
    assert _launched(monkeypatch, x, w) == (["_planes_fwd_kernel"], ["_planes_bwd_kernel"])
    (plan,) = [p for p in launch._PLANS.values()]
    assert plan.planes is not None and plan.plan.kernel == regime
    check_case(x, "batch", weight=w, bias=b, residual=r, dy=dy, activation="silu")


def test_planes_offset_uncentred_and_without_affine(regime):
    # |mean| = 1e4 >> std: the per-channel pivot keeps the mean exact; center=False: mean square.
    x, _, _, _, dy = make_inputs((3, 16, 7, 7), torch.float32, offset=1e4, affine=False)
    check_case(x, "batch", dy=dy)
    x, w, _, _, dy = make_inputs((2, 8, 14, 14), torch.bfloat16)
    check_case(x, "batch", weight=w, dy=dy, center=False)


@pytest.mark.parametrize("wants", ["x", "w", "b", "wb", "res"])
def test_planes_backward_gradient_subsets(wants, regime):
    # Only some gradients asked for: what the kernel writes (dx, dweight, dbias, dresidual under
    # an activation) matches the float64 reference.
    x, w, b, r, dy = make_inputs((3, 16, 7, 7), torch.float32, residual=True)
    leaves = {"x": x, "w": w, "b": b, "res": r}
    asked = [w, b] if wants == "wb" else [leaves[wants]]
    inputs = [t.detach().requires_grad_(any(t is a for a in asked)) for t in (x, w, b, r)]
    y = tritonorm.norm(inputs[0], "batch", weight=inputs[1], bias=inputs[2], residual=inputs[3],
                       activation="gelu", backend="triton")
    assert launch._PLANS and all(p.planes is not None for p in launch._PLANS.values())
    grads = torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy)
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    spec = scopes.parse("batch", 4, None, 16)
    y64 = reference.norm(ref_in[0], spec, ref_in[1], ref_in[2], 1e-5, True, "gelu", ref_in[3])
    ref = torch.autograd.grad(y64, [t for t in ref_in if t.requires_grad], dy.double())
    assert len(grads) == len(ref) == len(asked)
    for ours, theirs in zip(grads, ref):
        assert (ours.double() - theirs).abs().max() <= 2e-5 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("shape,dtype", [SHAPES[0], SHAPES[3]])
def test_planes_running_statistics_follow_torch(shape, dtype, regime):
    # Training blends the batch statistics into the running buffers as
    # torch.nn.functional.batch_norm does (momentum 0.1, unbiased variance), in fp32.
    x, w, b, _, _ = make_inputs(shape, dtype)
    C = shape[1]
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    rm_t, rv_t = rm.double().clone(), rv.double().clone()
    y = tritonorm.norm(x, "batch", weight=w, bias=b, running_mean=rm, running_var=rv, momentum=0.1,
                       training=True, backend="triton")
    assert all(p.planes is not None for p in launch._PLANS.values())
    y_t = torch.nn.functional.batch_norm(x.double(), rm_t, rv_t, w.double(), b.double(), training=True,
                                         momentum=0.1)
    eager = torch.nn.functional.batch_norm(x.clone(), torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype),
                                           w, b, training=True) if dtype != torch.float32 else None
    assert_close(y, y_t, dtype, eager, "y")
    assert_close(rm, rm_t, torch.float32, what="running_mean")
    assert_close(rv, rv_t, torch.float32, what="running_var")


def test_planes_eval_mode_forward_and_backward(monkeypatch, regime):
    # Eval normalizes with the running statistics (one sweep) and leaves them untouched; the
    # backward treats them as constants (dx = rstd * g).
    x, w, b, r, dy = make_inputs((3, 16, 7, 7), torch.float32, residual=True)
    rm, rv = torch.randn(16), torch.rand(16) + 0.5
    before = rm.clone(), rv.clone()
    spec = scopes.parse("batch", 4, None, 16)
    leaves64 = [t.double().requires_grad_() for t in (x, w, b, r)]
    y64 = reference.norm(leaves64[0], spec, leaves64[1], leaves64[2], activation="relu", residual=leaves64[3],
                         running_mean=rm.double(), running_var=rv.double(), training=False)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    names = record_launches(monkeypatch)
    y = tritonorm.norm(leaves[0], "batch", weight=leaves[1], bias=leaves[2], residual=leaves[3],
                       activation="relu", running_mean=rm, running_var=rv, training=False, backend="triton")
    assert names == ["_planes_fwd_kernel"]
    assert_close(y, y64, torch.float32)
    g = torch.autograd.grad(y, leaves, dy)
    assert names == ["_planes_fwd_kernel", "_planes_bwd_kernel"]
    g64 = torch.autograd.grad(y64, leaves64, dy.double())
    for name, a, e in zip(("dx", "dweight", "dbias", "dresidual"), g, g64):
        assert_close(a, e, torch.float32, what=name)
    assert torch.equal(before[0], rm) and torch.equal(before[1], rv)


def test_planes_not_taken_elsewhere():
    # Planes of 16k elements (rows already wide), channels_last, no channel block of 16-byte
    # planes (C = 6, 25 fp32 elements), fewer blocks than half the SMs, GroupNorm, a forced regime.
    spec = scopes.parse("batch", 4, None, 16)
    prof = dispatch.PROFILES["interpreter"]
    assert planes_plan.applies((2, 16, 7, 7), (784, 49, 7, 1), (784, 49, 7, 1), spec, 4, prof)
    assert not planes_plan.applies((2, 16, 4, 4), (256, 16, 4, 1), (256, 16, 4, 1), spec, 4, prof)
    cl = torch.empty(2, 16, 7, 7).to(memory_format=torch.channels_last).stride()
    assert not planes_plan.applies((2, 16, 7, 7), cl, cl, spec, 4, prof)
    assert not planes_plan.applies((2, 6, 5, 5), (150, 25, 5, 1), (150, 25, 5, 1), scopes.parse("batch", 4, None, 6), 4,
                              prof)
    assert not planes_plan.applies((2, 8, 7, 7), (392, 49, 7, 1), (392, 49, 7, 1), scopes.parse("batch", 4, None, 8), 2,
                              prof)  # bf16: 8-channel blocks, one program
    assert not planes_plan.applies((2, 16, 7, 7), (784, 49, 7, 1), (784, 49, 7, 1), scopes.parse("group", 4, 4, 16), 4,
                              prof)
    with dispatch.forced("split"):
        assert not planes_plan.applies((2, 16, 7, 7), (784, 49, 7, 1), (784, 49, 7, 1), spec, 4, prof)


def test_planes_blocks_for_resnet_are_16_byte_runs():
    # ResNet-50's 14^2 and 7^2 stages on an H200: the block sizes the brief derives, every
    # sample's block a 16-byte multiple, and enough blocks to fill the SMs.
    prof = dispatch.PROFILES["h200"]
    for C, hw, eb, cb in [(1024, 14, 2, 2), (2048, 7, 2, 8), (1024, 14, 4, 1), (2048, 7, 4, 4)]:
        assert planes_plan.block_channels(C, hw * hw, eb) == cb
        shape = (32, C, hw, hw)
        stride = (C * hw * hw, hw * hw, hw, 1)
        assert planes_plan.applies(shape, stride, stride, scopes.parse("batch", 4, None, C), eb, prof)
        for op in ("forward", "backward"):
            plan = planes_plan.choose(shape, eb, prof, op)
            tile = plan.config["block_n"] * dispatch._pow2(cb * hw * hw)
            # (a 16-bit backward may take the forward's fused limit: planes_plan.choose, checked
            # spill-free at sm_90a by tests/test_sm90.py and `make check-sm90`)
            limit = prof.fused_limit(eb, "forward" if eb == 2 else op)
            assert tile <= max(prof.tile, limit) and C // cb >= prof.sm_count


def test_explain_matches_the_planes_plans_and_counts_one_launch_each():
    x = torch.randn(3, 16, 7, 7, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    rm, rv = torch.zeros(16), torch.ones(16)
    tritonorm.norm(x, "batch", weight=w, activation="relu", running_mean=rm, running_var=rv).sum().backward()
    (plan,) = [p for p in launch._PLANS.values()]
    assert plan.planes is not None
    for op, ran in (("forward", plan.plan), ("backward", next(iter(plan._backward.values())).planes.plan)):
        expected = tritonorm.explain(x, "batch", weight=w, activation="relu", running_mean=rm, running_var=rv,
                                     op=op)
        assert (ran.kernel, ran.config) == (expected.kernel, expected.config), op
        assert isinstance(expected.cost, cost.Cost) and expected.cost.launches == 1
