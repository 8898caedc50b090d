"""Broadcast (adaptive) affine: weight and bias of x's rank, broadcastable to x (AdaIN, FiLM,
conditional BN, adaLN), against the float64 reference y = act(norm(x) * w + b)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tritonorm
import tritonorm.functional as TF
from helpers import LOW, assert_close
from tritonorm import activations, dispatch
from tritonorm.kernels import forward as fk
from tritonorm.kernels import launch


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _chan(t, x):
    return t.view(1, -1, *([1] * (x.dim() - 2))) if tuple(t.shape) == (x.shape[1],) else t


def _ref(x, scope, groups, w, b, act, compute=torch.float64):
    y = tritonorm.norm(x.to(compute), scope, num_groups=groups, backend="reference")
    return activations.apply(act, y * _chan(w, x).to(compute) + _chan(b, x).to(compute))


def _check(scope, shape, groups, ws, bs, dtype=torch.float32, fmt=None, regime=None, act="silu"):
    x = torch.randn(shape).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w = (torch.rand(ws) + 0.5).to(dtype)
    b = torch.randn(bs).to(dtype)
    dy = torch.randn(shape).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    force = dispatch.forced(regime, block_m=16, split=2) if regime else _Null()
    with force:
        y = tritonorm.norm(leaves[0], scope, num_groups=groups, weight=leaves[1], bias=leaves[2],
                           activation=act, backend="triton")
        grads = torch.autograd.grad(y, leaves, dy)
    assert y.dtype == dtype and y.stride() == x.stride()
    r64 = [t.double().requires_grad_() for t in (x, w, b)]
    y64 = _ref(*r64[:1], scope, groups, *r64[1:], act)
    g64 = torch.autograd.grad(y64, r64, dy.double())
    ye = ge = None
    if dtype in LOW:
        rl = [t.clone().requires_grad_() for t in (x, w, b)]
        ye = _ref(rl[0], scope, groups, rl[1], rl[2], act, compute=dtype)
        ge = torch.autograd.grad(ye, rl, dy)
    assert_close(y, y64, dtype, ye, "y", term_scale=4.0)
    for name, a, e, el, leaf in zip(("dx", "dweight", "dbias"), grads, g64, ge or [None] * 3, leaves):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype
        assert_close(a, e, dtype, el, name, term_scale=8.0 if name == "dx" else 0.0)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


CASES = [  # scope, shape, groups, weight shape, bias shape, memory format
    ("C", (6, 32), None, (6, 32), (6, 32), None),                          # (N, C) for 2-D x
    ("group", (2, 8, 4, 4), 2, (2, 8, 1, 1), (2, 8, 1, 1), torch.channels_last),  # AdaGroupNorm
    ("layer", (2, 5, 8), None, (2, 1, 8), (8,), None),                     # per-sample, per-position
    ("batch", (4, 6, 3, 3), None, (1, 6, 1, 1), (4, 6, 1, 1), None),       # conditional BN
    ("instance", (2, 3, 4, 4), None, (2, 3, 1, 1), (2, 3, 1, 1), None),    # AdaIN
    ("group", (2, 8, 4, 4), 2, (1, 8, 4, 4), (2, 1, 1, 1), None),          # not per (sample, channel)
]
# GroupNorm/InstanceNorm with (N, C, 1, 1) parameters read them in place (tests/test_sample_affine.py
# covers that path); the other shapes here are expanded to x's shape.


@pytest.mark.parametrize("scope,shape,groups,ws,bs,fmt", CASES)
def test_broadcast_affine_fused(scope, shape, groups, ws, bs, fmt):
    _check(scope, shape, groups, ws, bs, fmt=fmt, regime="fused")


@pytest.mark.parametrize("regime", ["looped", "split"])
@pytest.mark.parametrize("scope,shape,groups,ws,bs,fmt", [CASES[1], CASES[3], CASES[5]])
def test_broadcast_affine_two_pass_regimes(scope, shape, groups, ws, bs, fmt, regime):
    _check(scope, shape, groups, ws, bs, fmt=fmt, regime=regime)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_broadcast_affine_low_precision(dtype):
    _check("group", (2, 8, 4, 4), 4, (2, 8, 1, 1), (2, 8, 1, 1), dtype=dtype)


def test_forward_is_one_launch(monkeypatch):
    names = []
    cls = type(fk._fwd_fused_kernel)
    original = cls.run
    monkeypatch.setattr(cls, "run", lambda k, *a, **kw: names.append(k.fn.__name__) or original(k, *a, **kw))
    x = torch.randn(2, 8, 4, 4)
    with dispatch.forced("fused"):
        tritonorm.norm(x, "group", num_groups=2, weight=torch.rand(2, 8, 1, 1), bias=torch.randn(2, 8, 1, 1),
                       backend="triton")
    assert names == ["_fwd_fused_kernel"]


def test_adaln_through_the_functional():
    # DiT's modulation: LN(x) * (1 + scale) + shift with per-sample scale and shift.
    x, scale, shift = torch.randn(2, 6, 16), torch.randn(2, 1, 16) * 0.1, torch.randn(2, 1, 16)
    dy = torch.randn(2, 6, 16)
    ins = [t.clone().requires_grad_() for t in (x, scale, shift)]
    y = TF.layer_norm(ins[0], (16,), weight=1 + ins[1], bias=ins[2])
    g = torch.autograd.grad(y, ins, dy)
    r = [t.double().requires_grad_() for t in (x, scale, shift)]
    y64 = F.layer_norm(r[0], (16,), eps=1e-5) * (1 + r[1]) + r[2]
    g64 = torch.autograd.grad(y64, r, dy.double())
    assert_close(y, y64, torch.float32)
    for a, e in zip(g, g64):
        assert a.shape == e.shape
        assert_close(a, e, torch.float32, what="grad", term_scale=4.0)


def test_reference_backend_and_float64_run_the_same_definition():
    x, w, b = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.rand(2, 4, 1, 1, dtype=torch.float64), \
        torch.randn(1, 4, 3, 3, dtype=torch.float64)
    y = tritonorm.norm(x, "instance", weight=w, bias=b, activation="relu")
    assert_close(y, _ref(x, "instance", None, w, b, "relu"), torch.float32)


@pytest.mark.parametrize("kw,exc,words", [
    (dict(weight=torch.ones(2, 8, 3, 2)), ValueError, ["weight", "broadcastable"]),
    (dict(bias=torch.ones(3, 8, 1, 1)), ValueError, ["bias", "broadcastable"]),
    (dict(weight=torch.ones(2, 8, 1, 1, dtype=torch.int32)), TypeError, ["weight", "floating"]),
    (dict(weight=torch.ones(2, 8, 1, 1, device="meta")), ValueError, ["weight", "meta"]),
])
def test_bad_broadcast_parameters_name_the_argument_and_change_nothing(kw, exc, words):
    x = torch.randn(2, 8, 3, 3)
    rm, rv = torch.zeros(8), torch.ones(8)
    with pytest.raises(exc) as info:
        tritonorm.norm(x, "batch", running_mean=rm, running_var=rv, backend="triton", **kw)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert torch.equal(rm, torch.zeros(8)) and torch.equal(rv, torch.ones(8))


def test_create_graph_second_derivatives():
    x, w, b = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 1, 1) + 0.5, torch.randn(2, 4, 1, 1)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    y = tritonorm.norm(ours[0], "instance", weight=ours[1], bias=ours[2], activation="silu", backend="triton")
    y64 = _ref(ref[0], "instance", None, ref[1], ref[2], "silu")
    (gx,) = torch.autograd.grad((y * y).sum(), [ours[0]], create_graph=True)
    (gx64,) = torch.autograd.grad((y64 * y64).sum(), [ref[0]], create_graph=True)
    gw = torch.autograd.grad(gx.square().sum(), [ours[1]])[0]
    gw64 = torch.autograd.grad(gx64.square().sum(), [ref[1]])[0]
    assert_close(gx, gx64, torch.float32, what="dx")
    assert_close(gw, gw64, torch.float32, what="d2/dw")
