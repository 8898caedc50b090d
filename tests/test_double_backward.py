"""Double backward through the Triton path: a gradient penalty ||d(dy . y)/dx||^2 backpropagated
to x, weight, bias (and residual) matches the same computed entirely in float64 on the
reference path (plain autograd through PyTorch ops)."""

from __future__ import annotations

import copy

import pytest
import torch

import tritonorm
from helpers import assert_close
from tritonorm.kernels import launch


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _penalty_grads(x, w, b, r, dy, backend, **kw):
    """Gradients of sum((d(dy . y)/dx)^2) w.r.t. x and every other given leaf; first-order dx too."""
    leaves = [t for t in (x, w, b, r) if t is not None]
    y = tritonorm.norm(x, weight=w, bias=b, residual=r, backend=backend, **kw)
    (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    penalty = gx.square().sum()
    return [gx.detach(), *torch.autograd.grad(penalty, leaves, allow_unused=True)]


CASES = [
    dict(scope="instance", activation="silu"),
    dict(scope="layer", activation="gelu"),
    dict(scope="group", num_groups=2, activation="tanh"),
    dict(scope="batch", activation="sigmoid"),
    dict(scope="group", num_groups=3, activation=None, residual=True),
    dict(scope="group", num_groups=2, activation="gelu_tanh", residual=True),
    dict(scope="instance", activation=None, center=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradient_penalty_matches_float64(case):
    kw = dict(case)
    res = kw.pop("residual", False)
    shape = (3, 6, 4, 5)
    x, w, b, dy = torch.randn(shape), torch.randn(6), torch.randn(6), torch.randn(shape)
    r = torch.randn(shape) if res else None

    def leaves(cast):
        return [None if t is None else cast(t).detach().requires_grad_() for t in (x, w, b, r)]

    ours = _penalty_grads(*leaves(lambda t: t), dy, "triton", **kw)
    ref = _penalty_grads(*leaves(lambda t: t.double()), dy.double(), "reference", **kw)
    names = ["dx", "d penalty/dx", "d penalty/dweight", "d penalty/dbias", "d penalty/dresidual"]
    for name, a, e in zip(names, ours, ref):
        assert (a is None) == (e is None), name
        if a is not None:
            assert a.dtype == torch.float32
            assert_close(a, e, torch.float32, what=name)


def test_running_statistics_are_constants_in_eval():
    """Eval-mode BatchNorm normalizes with running statistics: the penalty's gradient reaches
    weight only through the affine, as in float64 PyTorch; running statistics do not move."""
    shape = (4, 5, 3, 3)
    x, w, b, dy = torch.randn(shape), torch.randn(5), torch.randn(5), torch.randn(shape)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    kw = dict(scope="batch", activation="silu", training=False)
    ours = _penalty_grads(*[t.clone().requires_grad_() for t in (x, w, b)], None, dy, "triton",
                          running_mean=rm, running_var=rv, **kw)
    ref = _penalty_grads(*[t.double().requires_grad_() for t in (x, w, b)], None, dy.double(),
                         "reference", running_mean=rm.double(), running_var=rv.double(), **kw)
    for a, e in zip(ours, ref):
        assert_close(a, e, torch.float32)
    assert torch.equal(rm, rm.clone()) and torch.equal(rv, rv.clone())


def test_patched_module_r1_penalty():
    """R1-style penalty through a patched torch model with GroupNorm+SiLU fused."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4),
                                torch.nn.SiLU(), torch.nn.Conv2d(4, 1, 1)).double()
    twin = tritonorm.patch(copy.deepcopy(model).float())
    assert tritonorm.report(twin).fused
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)

    def r1(m, inp):
        inp = inp.detach().requires_grad_()
        (g,) = torch.autograd.grad(m(inp).sum(), inp, create_graph=True)
        g.square().sum().backward()
        return [p.grad for p in m.parameters()]

    grads, grads64 = r1(twin, x.float()), r1(model, x)
    assert sum(g is not None for g in grads64) >= 4  # the last conv's bias gets none, in both
    for a, e in zip(grads, grads64):
        assert (a is None) == (e is None)
        if a is not None:
            assert_close(a, e, torch.float32)
