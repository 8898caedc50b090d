"""Running statistics: PyTorch's update rule in training, used instead of batch stats in eval."""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import make_inputs
from helpers import assert_close
from tritonorm import dispatch, reference, scope as scopes
from tritonorm.kernels import launch


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


CASES = [("batch", (4, 3, 3, 3), None, 3), ("batch_group", (3, 8, 2, 2), 4, 4), ("NCHW", (2, 6, 2, 3), 3, 3),
         ("batch", (5, 4), None, 4), ("NCL", (3, 4, 5), 2, 2)]


@pytest.mark.parametrize("regime", ["fused", "split"])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("scope,shape,groups,n_stats", CASES)
def test_training_updates_running_stats(scope, shape, groups, n_stats, center, regime):
    x, w, b, _, _ = make_inputs(shape, torch.float32)
    rm = torch.randn(n_stats) if center else None
    rv = torch.rand(n_stats) + 0.5
    rm64 = None if rm is None else rm.double().clone()
    rv64 = rv.double().clone()
    spec = scopes.parse(scope, x.dim(), groups, shape[1])
    y64 = reference.norm(x.double(), spec, w.double(), b.double(), center=center, running_mean=rm64,
                         running_var=rv64, momentum=0.3, training=True)
    with dispatch.forced(regime, block_m=8, split=2):
        y = tritonorm.norm(x, scope, num_groups=groups, weight=w, bias=b, center=center, running_mean=rm,
                           running_var=rv, momentum=0.3, training=True, backend="triton")
    assert_close(y, y64, torch.float32)
    if center:
        assert_close(rm, rm64, torch.float32, what="running_mean")
    assert_close(rv, rv64, torch.float32, what="running_var")


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("scope,shape,groups,n_stats", CASES)
def test_eval_uses_running_stats_and_differentiates_through_them(scope, shape, groups, n_stats, center):
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=True)
    rm = torch.randn(n_stats) if center else None
    rv = torch.rand(n_stats) + 0.5
    before = (None if rm is None else rm.clone(), rv.clone())
    spec = scopes.parse(scope, x.dim(), groups, shape[1])
    leaves64 = [t.double().requires_grad_() for t in (x, w, b, r)]
    y64 = reference.norm(leaves64[0], spec, leaves64[1], leaves64[2], center=center, activation="gelu",
                         residual=leaves64[3], running_mean=None if rm is None else rm.double(),
                         running_var=rv.double(), training=False)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    y = tritonorm.norm(leaves[0], scope, num_groups=groups, weight=leaves[1], bias=leaves[2],
                       residual=leaves[3], activation="gelu", center=center, running_mean=rm,
                       running_var=rv, training=False, backend="triton")
    assert_close(y, y64, torch.float32)
    g = torch.autograd.grad(y, leaves, dy)
    g64 = torch.autograd.grad(y64, leaves64, dy.double())
    for name, a, e in zip(("dx", "dweight", "dbias", "dresidual"), g, g64):
        assert_close(a, e, torch.float32, what=name)
    assert before[0] is None or torch.equal(before[0], rm)
    assert torch.equal(before[1], rv), "eval must not touch running statistics"


def test_momentum_zero_and_one():
    x, _, _, _, _ = make_inputs((4, 3, 2, 2), torch.float32)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    tritonorm.norm(x, "batch", running_mean=rm, running_var=rv, momentum=0.0, backend="triton")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    tritonorm.norm(x, "batch", running_mean=rm, running_var=rv, momentum=1.0, backend="triton")
    xd = x.double()
    assert_close(rm, xd.mean((0, 2, 3)), torch.float32, what="running_mean")
    assert_close(rv, xd.var((0, 2, 3), unbiased=True), torch.float32, what="running_var")


def test_training_without_running_stats_and_eval_without_them_use_batch_stats():
    x, w, b, _, _ = make_inputs((4, 3, 2, 2), torch.float32)
    y_train = tritonorm.norm(x, "batch", weight=w, bias=b, training=True, backend="triton")
    y_eval = tritonorm.norm(x, "batch", weight=w, bias=b, training=False, backend="triton")
    y64 = reference.norm(x.double(), scopes.parse("batch", 4), w.double(), b.double())
    assert_close(y_train, y64, torch.float32)
    assert_close(y_eval, y64, torch.float32)


def test_batch_statistics_are_returned_exactly():
    x, _, _, _, _ = make_inputs((3, 8, 4, 4), torch.float32, offset=3.0)
    for scope, groups in [("group", 4), ("batch", None), ("positional", None)]:
        spec = scopes.parse(scope, 4, groups, 8)
        _, mean, var = tritonorm.norm_with_stats(x, scope, num_groups=groups, backend="triton")
        m64, v64 = reference.moments(x.double(), spec)
        assert mean.shape == spec.stat_shape(x.shape) == m64.shape
        assert_close(mean, m64, torch.float32, what="mean")
        assert_close(var, v64, torch.float32, what="var")


@pytest.mark.parametrize("regime", ["fused", "looped", "split"])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("scope,groups", [("instance", None), ("batch", None), ("group", 2), ("NW", None)])
def test_moments_statistics_only_and_their_gradients(scope, groups, center, regime):
    x, _, _, _, _ = make_inputs((3, 4, 5, 3), torch.float32, offset=2.0)
    spec = scopes.parse(scope, 4, groups, 4)
    x64 = x.double().requires_grad_()
    m64, v64 = reference.moments(x64, spec, center)
    xs = x.clone().requires_grad_()
    with dispatch.forced(regime, block_m=4, block_p=2, split=2):
        mean, var = tritonorm.moments(xs, scope, num_groups=groups, center=center, backend="triton")
    assert mean.shape == var.shape == spec.stat_shape(x.shape)
    assert_close(mean, m64, torch.float32, what="mean")
    assert_close(var, v64, torch.float32, what="var")
    dm, dv = torch.randn_like(m64), torch.randn_like(v64)
    g64, = torch.autograd.grad((m64 * dm).sum() + (v64 * dv).sum(), x64)
    g, = torch.autograd.grad((mean * dm.float()).sum() + (var * dv.float()).sum(), xs)
    assert_close(g, g64, torch.float32, what="dx")


def test_moments_writes_no_output(monkeypatch):
    # The statistics-only path must not allocate or write a y: count the outputs allocated.
    made = []
    monkeypatch.setattr(launch._Common, "out", lambda self, x: made.append(1) or torch.empty_like(x))
    tritonorm.moments(torch.randn(2, 4, 3, 3), "instance", backend="triton")
    assert not made
