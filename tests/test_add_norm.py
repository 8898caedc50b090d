"""tritonorm.add_norm (pre-norm residual) against the float64 reference of its definition:
h = round(x + residual) in residual_dtype, y = norm(h); dx = dresidual = dnorm/dh + dh."""

from __future__ import annotations

import pytest
import torch

import tritonorm
import tritonorm.functional as TF
from helpers import LOW, assert_close, record_launches
from tritonorm import dispatch, reference, scope as scopes
from tritonorm.kernels import launch


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


class _Launches:
    def __init__(self, monkeypatch):
        self.names = record_launches(monkeypatch)


def _inputs(shape, dtype, fmt=None, rd=None):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    r = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(rd or dtype)
    if fmt is not None:
        x, r = x.contiguous(memory_format=fmt), r.contiguous(memory_format=fmt)
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, dtype=torch.float64).to(dtype)
    return x, r, w, b, torch.randn(shape).to(dtype), torch.randn(shape).to(rd or dtype)


def _check(scope, shape, dtype, *, groups=None, fmt=None, regime=None, rd=None, act=None, center=True,
           affine=True, monkeypatch=None):
    x, r, w, b, dy, dh = _inputs(shape, dtype, fmt, rd)
    if not affine:
        w = b = None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    launches = _Launches(monkeypatch) if monkeypatch is not None else None
    force = dispatch.forced(regime, block_m=16, split=2) if regime else _Null()
    with force:
        y, h = tritonorm.add_norm(leaves[0], leaves[1], scope, num_groups=groups, weight=leaves[2],
                                  bias=leaves[3], activation=act, center=center, backend="triton",
                                  residual_dtype=rd)
        n_fwd = len(launches.names) if launches else None
        if launches:
            launches.names.clear()
        live = [t for t in leaves if t is not None]
        grads = torch.autograd.grad([y, h], live, [dy, dh])
        n_bwd = len(launches.names) if launches else None
    hd = rd or dtype
    assert y.dtype == dtype and h.dtype == hd
    assert y.stride() == x.stride() and h.stride() == x.stride()
    # h is the sum rounded once to its dtype (within one unit in the last place; the interpreter
    # truncates where GPUs round to nearest), and y is the norm of h exactly as stored.
    exact = x.double() + r.double()
    ulp = torch.finfo(hd).eps * exact.abs().clamp_min(torch.finfo(hd).tiny)
    assert ((h.double() - exact).abs() <= ulp).all(), (h.double() - exact).abs().max()
    h_ref = h.detach()
    spec = scopes.parse(scope, x.dim(), groups, x.shape[1])
    h64 = h_ref.double().requires_grad_()
    p64 = [None if t is None else t.double().requires_grad_() for t in (w, b)]
    y64 = reference.norm(h64, spec, p64[0], p64[1], 1e-5, center, act)
    g64 = torch.autograd.grad(y64, [h64] + [t for t in p64 if t is not None], dy.double())
    eager_y = eager_g = None
    if dtype in LOW:
        hl = h_ref.to(dtype).requires_grad_()
        pl = [None if t is None else t.clone().requires_grad_() for t in (w, b)]
        eager_y = reference.norm(hl, spec, pl[0], pl[1], 1e-5, center, act, compute_dtype=dtype)
        eager_g = torch.autograd.grad(eager_y, [hl] + [t for t in pl if t is not None], dy)
    ys = h_ref.double().abs().max().item() * (1.0 if w is None else w.double().abs().max().item()) + 3.0
    assert_close(y, y64, dtype, eager_y, "y", term_scale=ys)
    _, var = reference.moments(h_ref.double(), spec, center)
    dx_terms = (var + 1e-5).rsqrt().max().item() * dy.double().abs().max().item() * 2.0
    dx64 = g64[0] + dh.double()
    dx_eager = None if eager_g is None else eager_g[0] + dh.to(dtype)
    assert grads[0].dtype == dtype and grads[1].dtype == r.dtype
    assert_close(grads[0], dx64, dtype, dx_eager, "dx", term_scale=dx_terms)
    assert_close(grads[1], dx64, r.dtype, None if r.dtype not in LOW else dx_eager, "dresidual",
                 term_scale=dx_terms)
    for name, a, e, el in zip(("dweight", "dbias"), grads[2:], g64[1:], (eager_g or [None] * 3)[1:]):
        assert_close(a, e, dtype, el, name)
    return n_fwd, n_bwd


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("regime", ["fused", "looped", "split"])
@pytest.mark.parametrize("scope,shape,groups,fmt", [
    ("C", (4, 24), None, None),
    ("group", (2, 8, 3, 3), 2, torch.channels_last),
    ("batch", (3, 4, 3, 3), None, None),
    ("instance", (2, 3, 4, 4), None, torch.channels_last),
])
def test_add_norm_fp32_every_regime(scope, shape, groups, fmt, regime, monkeypatch):
    n_fwd, n_bwd = _check(scope, shape, torch.float32, groups=groups, fmt=fmt, regime=regime, act="silu",
                          monkeypatch=monkeypatch)
    assert n_fwd == {"fused": 1, "looped": 1, "split": 2}[regime]
    if scope == "C" and regime == "fused":
        assert n_bwd <= 2  # dx (+ dh) in one kernel, then the dweight/dbias partials summed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_rms_rows_low_precision(dtype, monkeypatch):
    n_fwd, n_bwd = _check("C", (8, 64), dtype, center=False, monkeypatch=monkeypatch)
    assert n_fwd == 1 and n_bwd <= 2


def test_fp32_residual_stream_with_bf16_activations():
    _check("C", (5, 48), torch.bfloat16, rd=torch.float32, center=False)


def test_group_scope_low_precision_channels_last():
    _check("group", (2, 6, 3, 3), torch.float16, groups=3, fmt=torch.channels_last, act="relu")


@pytest.mark.parametrize("rd", [None, torch.float32])
def test_only_y_used_downstream(rd):
    x = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 24, dtype=rd or torch.bfloat16, requires_grad=True)
    y, h = tritonorm.add_norm(x, r, "C", backend="triton", residual_dtype=rd)
    dy = torch.randn_like(y)
    gx, gr = torch.autograd.grad(y, [x, r], dy)
    h64 = h.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(torch.nn.functional.layer_norm(h64, (24,), eps=1e-5), [h64], dy.double())
    hl = h.detach().to(torch.bfloat16).requires_grad_()
    (ge,) = torch.autograd.grad(reference.norm(hl, scopes.parse("C", 2, None, 24), compute_dtype=torch.bfloat16),
                                [hl], dy)
    assert gr.dtype == r.dtype
    assert_close(gx, g64, torch.bfloat16, ge, "dx")
    assert_close(gr, g64, gr.dtype, ge, "dresidual")


def test_no_affine_and_only_h_used_downstream():
    _check("C", (4, 24), torch.float32, affine=False)
    x, r = torch.randn(4, 24, requires_grad=True), torch.randn(4, 24, requires_grad=True)
    y, h = tritonorm.add_norm(x, r, "C", backend="triton")
    gx, gr = torch.autograd.grad(h.sum() * 3, [x, r])
    assert torch.equal(gx, torch.full_like(x, 3.0)) and torch.equal(gr, gx)


def test_saves_h_and_statistics_only():
    x, r = torch.randn(6, 32, requires_grad=True), torch.randn(6, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, h = tritonorm.add_norm(x, r, "C", weight=w, center=False, backend="triton")
    # h, the weight and lean statistics: rstd alone (RMS) per row (tests/test_lean.py)
    assert sorted(t.numel() for t in saved) == sorted([6 * 32, 32, 1 * 6])


def test_functionals_match_torch():
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    w, b = torch.randn(16), torch.randn(16)
    y, h = TF.add_layer_norm(x, r, (16,), w, b, eps=1e-5)
    h64 = x.double() + r.double()
    assert_close(h, h64, torch.float32)
    assert_close(y, torch.nn.functional.layer_norm(h64, (16,), w.double(), b.double(), 1e-5), torch.float32)
    y, h = TF.add_rms_norm(x, r, (5, 16), w.repeat(5, 1), eps=1e-6)
    assert_close(y, torch.nn.functional.rms_norm(h64, (5, 16), w.repeat(5, 1).double(), 1e-6), torch.float32)


@pytest.mark.parametrize("cls", ["RMSNorm", "LayerNorm"])
def test_modules_take_a_residual(cls):
    m = getattr(tritonorm.nn, cls)(16)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    y, h = m(x, r)
    assert_close(h, x.double() + r.double(), torch.float32)
    assert_close(y, m(h.clone()).double(), torch.float32)
    assert torch.is_tensor(m(x))


def _second_order(fn, x, r, w, b, dy, dh):
    """Second derivatives of a gradient penalty through add_norm's first-order gradients, w.r.t.
    x, residual, weight, bias and the incoming gradients dy, dh."""
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b, dy, dh)]
    y, h = fn(*leaves[:4])
    gx, gr, gw, gb = torch.autograd.grad([y, h], leaves[:4], leaves[4:], create_graph=True)
    penalty = gx.square().sum() + (gr * gr.detach().cos()).sum() + gw.pow(3).sum() + (gb * gw).sum()
    second = torch.autograd.grad(penalty, leaves, allow_unused=True)  # without an activation b is unused
    return [gx, gr, gw, gb, *(torch.zeros_like(t) if g is None else g for g, t in zip(second, leaves))]


@pytest.mark.parametrize("scope,shape,groups,center,act", [
    ("C", (3, 16), None, True, "silu"),
    ("C", (4, 12), None, False, None),
    ("group", (2, 6, 3, 3), 3, True, "gelu"),
])
def test_create_graph_second_derivatives_match_float64(scope, shape, groups, center, act):
    # Every input's second derivative (x and the residual reach the first-order gradients through
    # h), the Triton path at fp32 against the same composition at float64.
    x, r, dy, dh = (torch.randn(shape) for _ in range(4))
    c = shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    spec = scopes.parse(scope, len(shape), groups, c)

    def ours(x, r, w, b):
        return tritonorm.add_norm(x, r, scope, num_groups=groups, weight=w, bias=b, center=center,
                                  activation=act, backend="triton")

    def ref(x, r, w, b):
        h = x + r
        return reference.norm(h, spec, w, b, 1e-5, center, act), h

    got = _second_order(ours, x, r, w, b, dy, dh)
    want = _second_order(ref, *(t.double() for t in (x, r, w, b, dy, dh)))
    names = ["dx", "dres", "dw", "db", "d2x", "d2res", "d2w", "d2b", "d2dy", "d2dh"]
    for name, g, g64 in zip(names, got, want):
        assert_close(g, g64, torch.float32, what=name)


def test_gradgradcheck_of_the_float64_composition():
    # float64 runs add_norm's composite (h by torch ops, then norm): its second derivatives are
    # autograd's own, checked numerically here; the fp32 Triton path is compared with it above.
    x, r = (torch.randn(2, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    fn = lambda x, r, w: tritonorm.add_norm(x, r, "C", weight=w, activation="tanh")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, r, w))


@pytest.mark.parametrize("bad,match", [
    (dict(residual=torch.randn(4, 10)), "residual must have x's shape"),
    (dict(residual=torch.randn(4, 12, dtype=torch.float64)), "residual must have x's dtype"),
    (dict(residual_dtype=torch.int32), "residual_dtype"),
    (dict(residual_dtype="float32"), "residual_dtype"),
    (dict(residual=[1.0]), "residual must be a torch.Tensor"),
    (dict(residual=torch.randn(4, 12, device="meta")), "residual is on meta"),
    (dict(weight=torch.randn(5)), "weight"),
])
def test_bad_input_names_the_argument_and_changes_nothing(bad, match):
    x = torch.randn(4, 12)
    kw = dict(residual=torch.randn(4, 12), residual_dtype=None)
    kw.update(bad)
    rm, rv = torch.zeros(12), torch.ones(12)
    before = (x.clone(), rm.clone(), rv.clone())
    with pytest.raises((TypeError, ValueError), match=match):
        tritonorm.add_norm(x, kw.pop("residual"), "batch", running_mean=rm, running_var=rv, backend="triton",
                           **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, rm, rv)))


def test_running_statistics_are_blended_like_norm():
    x, r = torch.randn(6, 4, 3), torch.randn(6, 4, 3)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y, h = tritonorm.add_norm(x, r, "batch", running_mean=rm, running_var=rv, momentum=0.3, backend="triton")
    y2 = tritonorm.norm(h.clone(), "batch", running_mean=rm2, running_var=rv2, momentum=0.3, backend="reference")
    assert_close(y, y2.double(), torch.float32)
    assert_close(rm, rm2.double(), torch.float32) and assert_close(rv, rv2.double(), torch.float32)
