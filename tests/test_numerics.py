"""Numerics at the edges (issue 15): NaN and inf exactly where the float64 reference has them,
no precision cliffs in the fused activations, the guaranteed magnitude range (docs/api.md,
"NaN, inf and the magnitude range"), and running statistics that cannot be updated in place.

Every comparison is against the float64 reference with NaN/inf positions compared exactly
(tests/nonfinite.py); outputs are poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import tritonorm
import tritonorm.functional as TF
from tritonorm import activations, dispatch, reference, scope as scopes
from tritonorm.kernels import common, launch

from nonfinite import assert_matches, same_bits

REGIMES = ("fused", "looped", "split")
TILES = {"fused": {}, "looped": {"block_m": 4, "block_p": 2}, "split": {"block_m": 4, "block_p": 2, "split": 3}}
INF, NAN = float("inf"), float("nan")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _run(x, scope, regime, *, num_groups=None, weight=None, bias=None, residual=None, activation=None,
         center=True, eps=1e-5, dy=None, running=None, training=True):
    """tritonorm and the float64 reference on the same inputs:
    (y, y64, grads, grads64, reference running stats, term scales)."""
    spec = scopes.parse(scope, x.dim(), num_groups, x.shape[1])
    leaves = [x, weight, bias, residual]
    ours = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    ref = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    rm, rv = running if running is not None else (None, None)
    terms = _terms(x, scope, num_groups, weight, bias, residual, center, eps, dy)
    rm64 = None if rm is None else rm.double().clone()
    rv64 = None if rv is None else rv.double().clone()
    with dispatch.forced(regime, **TILES[regime]):
        y = tritonorm.norm(ours[0], scope, num_groups=num_groups, weight=ours[1], bias=ours[2],
                           residual=ours[3], activation=activation, center=center, eps=eps,
                           running_mean=rm, running_var=rv, training=training, backend="triton")
        y64 = reference.norm(ref[0], spec, ref[1], ref[2], eps, center, activation, ref[3], rm64, rv64,
                             training=training)
        if dy is None:
            return y, y64, None, None, (rm64, rv64), terms
        live = [i for i, t in enumerate(ours) if t is not None]
        g = torch.autograd.grad(y, [ours[i] for i in live], dy)
    g64 = torch.autograd.grad(y64, [ref[i] for i in live], dy.double())
    names = ("dx", "dweight", "dbias", "dresidual")
    return (y, y64, {names[i]: a for i, a in zip(live, g)}, {names[i]: a for i, a in zip(live, g64)},
            (rm64, rv64), terms)


def _fmax(t) -> float:
    """Largest finite |value| (0 for None or nothing finite)."""
    if t is None:
        return 0.0
    t = t.detach().double().abs()
    t = t[torch.isfinite(t)]
    return t.max().item() if t.numel() else 0.0


def _terms(x, scope, num_groups, weight, bias, residual, center, eps, dy):
    """Magnitudes of the terms y and dx are sums of (see helpers.assert_close's term_scale)."""
    spec = scopes.parse(scope, x.dim(), num_groups, x.shape[1])
    x64 = x.detach().double()
    _, var = reference.moments(x64, spec, center)
    w = 1.0 if weight is None else _fmax(weight)
    y_terms = _fmax(reference.norm(x64, spec, eps=eps, center=center)) * w + _fmax(bias) + _fmax(residual)
    dx_terms = _fmax((var + eps).rsqrt()) * _fmax(dy) * w * 1.2
    return y_terms, dx_terms


def _check_all(y, y64, g, g64, terms, dtype=torch.float32):
    assert_matches(y, y64, dtype, what="y", term_scale=terms[0])
    for name in g or {}:
        assert_matches(g[name], g64[name], dtype, what=name, term_scale=terms[1] if name == "dx" else 0.0)


# --- the fused activations themselves, on special and tiny pre-activations ---------------------

@triton.jit
def _act_kernel(Z, Y, G, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < N
    z = tl.load(Z + i, mask=m, other=0.0)
    tl.store(Y + i, common.activation(z, ACT), mask=m)
    tl.store(G + i, common.activation_grad(z, ACT), mask=m)


# NaN, +-inf, signed zeros, tiny values (where 1 - 2/(e^{2z}+1) lost every digit), the tanh
# polynomial's switch at 0.625, and saturation.
SPECIAL = [NAN, INF, -INF, 0.0, -0.0, 1e-38, 1e-30, -1e-30, 1e-20, -3e-12, 1e-5, -1e-5, 0.3, -0.6,
           0.6249, 0.6251, -0.7, 1.0, -1.0, 3.0, -3.0, 10.0, -10.0, 20.0, -20.0, 50.0, -50.0, 100.0,
           -100.0, 1e4, -1e4, 1e12, -1e12]


@pytest.mark.parametrize("name", activations.NAMES)
def test_activation_and_gradient_match_torch_at_special_values(name):
    z = torch.tensor(SPECIAL, dtype=torch.float32)
    y, g = torch.full_like(z, NAN), torch.full_like(z, NAN)
    _act_kernel[(1,)](z, y, g, z.numel(), ACT=activations.code(name), BLOCK=64)
    z64 = z.double().requires_grad_()
    y64 = activations.apply(name, z64)
    (g64,) = torch.autograd.grad(y64.sum(), z64)
    # Closed-form PyTorch twin (native regime, hand-written backwards) agrees with autograd too.
    closed = activations.grad(name, z.double())
    for what, ours, ref in (("act", y, y64.detach()), ("act'", g, g64), ("activations.grad", closed, g64)):
        for test in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(test(ours), test(ref.to(ours.dtype))), f"{name} {what}: {test.__name__} at {SPECIAL}"
        fin = torch.isfinite(ref)
        # Relative to each value (the cliff was a relative one: tanh(1e-20) = 0), plus a little
        # absolute slack at |z| >= 1 where tails such as gelu(-10) ~ 1e-23 round to 0 in fp32.
        slack = 1e-7 * torch.where(z.double().abs() >= 1, z.double().abs(), 0.0)
        err = (ours.double() - ref)[fin].abs()
        tol = (2e-6 * ref.abs() + slack + 1e-44)[fin]
        assert (err <= tol).all(), f"{name} {what}: {list(zip(z[fin][err > tol].tolist(), ours[fin][err > tol].tolist()))}"


@pytest.mark.parametrize("activation", activations.NAMES)
def test_tiny_normalized_values_keep_their_digits(activation):
    # eps = 3e38 scales xhat to ~1e-20: every activation is in its small-z regime, forward and
    # backward, and the outputs' scale is that small too (the cliff gave tanh = 0 here).
    x = torch.randn(3, 8)
    w, dy = torch.rand(8) + 0.5, torch.randn(3, 8)
    y, y64, g, g64, _, terms = _run(x, "C", "fused", weight=w, activation=activation, center=False, eps=3e38, dy=dy)
    _check_all(y, y64, g, g64, terms)
    assert (y.abs() > 0).all() or activation == "relu"


# --- NaN and inf in x ----------------------------------------------------------------------------

# Every activation in the fused regime, the tiled regimes with relu (the NaN-dropping max was
# the bug); each case runs forward and backward, so the grid stays small.
ACT_REGIMES = [(a, "fused") for a in (None, *activations.NAMES)] + [("relu", "looped"), ("relu", "split")]


@pytest.mark.parametrize("activation,regime", ACT_REGIMES)
def test_nan_in_x_stays_nan_through_every_activation(activation, regime):
    # A NaN poisons its own statistic (every element of it NaN, as in torch) and nothing else;
    # a fused relu must not turn it into 0 (loss scaling relies on NaN reaching the loss).
    x = torch.randn(2, 8, 3)
    x[0, 1, 2] = NAN
    w, b, r, dy = torch.rand(8) + 0.5, torch.randn(8), torch.randn(2, 8, 3), torch.randn(2, 8, 3)
    y, y64, g, g64, _, terms = _run(x, "group", regime, num_groups=2, weight=w, bias=b, residual=r,
                             activation=activation, dy=dy)
    assert y[0, :4].isnan().all() and not y[0, 4:].isnan().any() and not y[1].isnan().any()
    _check_all(y, y64, g, g64, terms)


@pytest.mark.parametrize("activation,regime", [(None, "fused"), ("relu", "fused"), ("leaky_relu", "fused"),
                                               ("silu", "fused"), ("gelu_tanh", "fused"), ("tanh", "split")])
def test_nonfinite_preactivation_from_residual(activation, regime):
    # NaN/inf that enter after the statistics (here the residual) reach the activation as they
    # are: act(NaN), act(+-inf) and their gradients must be torch's.
    x, r, dy = torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    r[0, 0, 1], r[0, 2, 3], r[1, 3, 0] = NAN, INF, -INF
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    y, y64, g, g64, _, terms = _run(x, "layer", regime, weight=w, bias=b, residual=r, activation=activation, dy=dy)
    _check_all(y, y64, g, g64, terms)


@pytest.mark.parametrize("where,sign,regime", [("first", 1.0, "fused"), ("middle", -1.0, "fused"),
                                               ("first", -1.0, "looped"), ("middle", 1.0, "split")])
def test_center_false_with_inf_is_zero_except_at_the_inf(where, sign, regime):
    # x / sqrt(mean(x^2)) with an inf in the row: x/inf = 0 for the finite elements, inf/inf =
    # NaN at the inf itself, as in torch.rms_norm (not NaN for the whole row).
    x, dy = torch.randn(3, 9), torch.randn(3, 9)
    x[1, 0 if where == "first" else 5] = sign * INF
    w = torch.rand(9) + 0.5
    y, y64, g, g64, _, terms = _run(x, "C", regime, weight=w, center=False, dy=dy)
    _check_all(y, y64, g, g64, terms)
    assert y[1].isnan().sum() == 1
    assert_matches(TF.rms_norm(x, [9], w, eps=1e-5), torch.rms_norm(x.double(), [9], w.double(), eps=1e-5),
                   torch.float32, what="functional rms_norm")


@pytest.mark.parametrize("where,regime", [((0, 0, 0), "fused"), ((0, 0, 0), "looped"), ((0, 0, 0), "split"),
                                          ((3, 0, 9), "split")])
def test_inf_in_x_gives_inf_running_mean(where, regime):
    # The exact (and torch's) batch mean of a channel holding +inf is +inf, its variance NaN.
    # The first element of a statistic is the moments' pivot: an inf pivot must not turn the
    # mean into NaN; a partial with an inf mean must merge with finite ones into inf.
    x = torch.randn(4, 3, 10)
    x[where] = INF
    x[2, 1, 3] = -INF
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    y, y64, _, _, (rm64, rv64), terms = _run(x, "batch", regime, running=(rm, rv))
    assert_matches(y, y64, torch.float32, what="y", term_scale=terms[0])
    assert_matches(rm, rm64, torch.float32, what="running_mean")
    assert_matches(rv, rv64, torch.float32, what="running_var")
    assert rm[0] == INF and rm[1] == -INF and rv[:2].isnan().all() and rm[2:].isfinite().all()


def test_moments_with_inf():
    x = torch.randn(2, 6, 4)
    x[0, 1, 0], x[1, 4, 2] = INF, -INF
    spec = scopes.parse("group", 3, 3, 6)
    for center in (True, False):
        mean, var = tritonorm.moments(x, "group", num_groups=3, center=center, backend="triton")
        m64, v64 = reference.moments(x.double(), spec, center)
        assert_matches(mean, m64, torch.float32, what=f"mean center={center}")
        assert_matches(var, v64, torch.float32, what=f"var center={center}")


# --- the magnitude range -------------------------------------------------------------------------

@pytest.mark.parametrize("scope,center,regime", [("batch", True, "split"), ("group", True, "fused"),
                                                 ("layer", False, "looped")])
@pytest.mark.parametrize("mag,offset,eps", [
    (1e-37, 0.0, 1e-5),     # normal fp32 values whose squares underflow: eps dominates them
    (1e-20, 0.0, 1.2e-38),  # squares in the subnormal range, comparable to eps
    (1e-15, 0.0, 1e-40),    # a subnormal eps, far below the variance
    (1e16, 0.0, 1e-5),      # the largest deviations whose squares (times M) still fit in fp32
    (1e10, 1e15, 1e-5),     # a huge mean with a moderate spread: the pivot keeps the digits
])
def test_guaranteed_magnitude_range(mag, offset, eps, scope, center, regime):
    x = (torch.randn(3, 4, 5, dtype=torch.float64) * mag + offset).float()
    w, b, dy = torch.rand(4) + 0.5, torch.randn(4), torch.randn(3, 4, 5)
    y, y64, g, g64, _, terms = _run(x, scope, regime, num_groups=2 if scope == "group" else None, weight=w,
                             bias=b, center=center, eps=eps, dy=dy)
    _check_all(y, y64, g, g64, terms)


@pytest.mark.parametrize("regime", REGIMES)
def test_beyond_the_range_squares_overflow_like_torch_group_norm(regime):
    # Deviations whose squares overflow fp32 (|x - x0| ~ 1e30): the variance is inf, rstd 0,
    # xhat 0 and y = bias, where torch's own GroupNorm in fp32 gives the same (documented).
    x = (torch.randn(2, 4, 6, dtype=torch.float64) * 1e30).float()
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    with dispatch.forced(regime, **TILES[regime]):
        y = tritonorm.norm(x, "group", num_groups=2, weight=w, bias=b, backend="triton")
        ms = TF.rms_norm(x, [6], eps=1e-5)
    assert torch.equal(y, b[None, :, None].expand_as(y))
    assert torch.equal(y, torch.nn.functional.group_norm(x, 2, w, b))
    assert torch.equal(ms, torch.zeros_like(ms))  # x / inf, not NaN


# --- running statistics that cannot be updated in place ------------------------------------------

def _expanded(n, value):
    return torch.full((1,), value).expand(n)


@pytest.mark.parametrize("which", ["running_mean", "running_var", "both_share"])
@pytest.mark.parametrize("api", ["norm", "batch_norm", "instance_norm", "module"])
def test_overlapping_running_stats_rejected_before_anything_changes(api, which):
    x = torch.randn(4, 3, 5)
    if which == "both_share":
        buf = torch.randn(4)
        rm, rv = buf[:3], buf[1:]
    else:
        rm = _expanded(3, 0.5) if which == "running_mean" else torch.randn(3)
        rv = _expanded(3, 2.0) if which == "running_var" else torch.rand(3) + 0.5
    before = [t.clone() for t in (x, rm, rv)]
    with pytest.raises(ValueError) as info:
        if api == "norm":
            tritonorm.norm(x, "batch", running_mean=rm, running_var=rv, training=True)
        elif api == "batch_norm":
            TF.batch_norm(x, rm, rv, training=True)
        elif api == "instance_norm":
            TF.instance_norm(x, rm, rv, use_input_stats=True)
        else:
            m = tritonorm.nn.BatchNorm1d(3)
            m.running_mean, m.running_var = rm, rv
            m(x)
    msg = str(info.value)
    names = ["running_mean", "running_var"] if which == "both_share" else [which]
    assert all(n in msg for n in names), msg
    for t, t0 in zip((x, rm, rv), before):
        assert same_bits(t, t0)


def test_expanded_running_stats_are_fine_in_eval():
    # Eval only reads them: accepted, and the result is the reference's.
    x = torch.randn(4, 3, 5)
    rm, rv = _expanded(3, 0.25), _expanded(3, 2.0)
    y = tritonorm.norm(x, "batch", running_mean=rm, running_var=rv, training=False, backend="triton")
    spec = scopes.parse("batch", 3, None, 3)
    y64 = reference.norm(x.double(), spec, running_mean=rm.double(), running_var=rv.double(), training=False)
    assert_matches(y, y64, torch.float32)


def test_interleaved_running_stats_of_one_buffer_are_accepted():
    # Two views of one buffer that share no element are updated correctly.
    x = torch.randn(4, 3, 5)
    buf = torch.rand(6) + 0.5
    rm, rv = buf[0::2], buf[1::2]
    rm64, rv64 = rm.double().clone(), rv.double().clone()
    tritonorm.norm(x, "batch", running_mean=rm, running_var=rv, training=True, backend="triton")
    reference.norm(x.double(), scopes.parse("batch", 3, None, 3), running_mean=rm64, running_var=rv64)
    assert_matches(rm, rm64, torch.float32, what="running_mean")
    assert_matches(rv, rv64, torch.float32, what="running_var")


@pytest.mark.parametrize("regime", ["fused", "looped", "split"])
@pytest.mark.parametrize("act", ["gelu_tanh", "silu", None])
def test_masked_lanes_stay_out_of_the_backward_sums(regime, act):
    # Statistics of one value each (scope "W" with W = 1) and eps 1e-30: rstd = 1e15. In a tile
    # wider than the statistic the masked lanes load x = 0, so x - mean is -mean there, and times
    # rstd (~1e20 at an offset of 6.6e4) gelu_tanh's derivative overflowed to NaN, which dy = 0 did
    # not cancel in the looped/split sums (found by fuzz seed 1569483810): dx was NaN, not 0.
    from helpers import assert_close

    x = (torch.randn(2, 6, 1, 1, dtype=torch.float64) * 66 + 6.6e4).float()
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    dy = torch.randn(2, 6, 1, 1)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with dispatch.forced(regime, block_m=4, block_p=2, split=2):
        y = tritonorm.norm(leaves[0], "W", weight=leaves[1], bias=leaves[2], eps=1e-30, activation=act,
                           training=False, backend="triton")
        got = torch.autograd.grad(y, leaves, dy)
    spec = scopes.parse("W", 4, None, 6)
    r64 = [t.double().requires_grad_() for t in (x, w, b)]
    y64 = reference.norm(r64[0], spec, r64[1], r64[2], 1e-30, True, act, None, None, None, 0.1, False)
    exp = torch.autograd.grad(y64, r64, dy.double())
    assert_close(y, y64, torch.float32, what="y")
    for i, (g, e) in enumerate(zip(got, exp)):
        assert torch.isfinite(g).all(), f"grad {i} not finite: {g.flatten().tolist()}"
        assert_close(g, e, torch.float32, what=f"grad {i}")
