"""Sample groups (``sample_groups=S``, Ghost / virtual-batch normalization) and GhostBatchNorm.

The oracle is the loop every other implementation runs: split the batch into S chunks, normalize
each chunk with the float64 reference (plain scope, no groups of samples), concatenate.
"""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import make_inputs
from helpers import LOW, assert_close
from tritonorm import dispatch, reference, scope as scopes
from tritonorm.kernels import forward as fk
from tritonorm.kernels import launch, layout
from tritonorm.nn import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


TILES = {"fused": {}, "looped": {"block_m": 8, "block_p": 16}, "split": {"block_m": 8, "block_p": 16, "split": 2},
         dispatch.NATIVE: {}}


def _chunked(x, scope, groups, s, weight, bias, residual=None, activation=None, center=True,
             compute_dtype=None):
    """The oracle: the reference on each of S chunks of the batch, concatenated."""
    spec = scopes.parse(scope, x.dim(), groups, x.shape[1])
    res = [None] * s if residual is None else residual.chunk(s)
    return torch.cat([reference.norm(xc, spec, weight, bias, 1e-5, center, activation, rc,
                                     compute_dtype=compute_dtype) for xc, rc in zip(x.chunk(s), res)])


def _check(x, scope, s, *, groups=None, residual=False, activation=None, center=True, regime=None,
           wdtype=None):
    """Forward and backward (dx, dweight, dbias[, dresidual]) against the chunked oracle."""
    dtype = x.dtype
    _, w, b, r, dy = make_inputs(x.shape, dtype, residual=residual, wdtype=wdtype)
    leaves = [x, w, b, r]
    ref_in = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    ours_in = [None if t is None else t.detach().clone(memory_format=torch.preserve_format).requires_grad_()
               for t in leaves]
    y64 = _chunked(*ref_in[:1], scope, groups, s, *ref_in[1:3], ref_in[3], activation, center)
    ctx = dispatch.forced(regime, **TILES[regime]) if regime else _Null()
    with ctx:
        y = tritonorm.norm(ours_in[0], scope, num_groups=groups, sample_groups=s, weight=ours_in[1],
                           bias=ours_in[2], residual=ours_in[3], activation=activation, center=center,
                           backend="triton")
        assert y.stride() == torch.empty_like(x, memory_format=torch.preserve_format).stride()
        live = [t for t in ours_in if t is not None]
        g = torch.autograd.grad(y, live, dy)
    g64 = torch.autograd.grad(y64, [t for t in ref_in if t is not None], dy.double())
    eager_y = eager_g = None
    if dtype in LOW:
        low_in = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
        eager_y = _chunked(low_in[0], scope, groups, s, low_in[1], low_in[2], low_in[3], activation,
                           center, compute_dtype=dtype)
        eager_g = torch.autograd.grad(eager_y, [t for t in low_in if t is not None], dy)
    # Rounding scales with the terms y and dx are made of, as in tests/cases.py.
    spec = scopes.parse(scope, x.dim(), groups, x.shape[1], sample_groups=s)
    x64 = x.detach().double()
    _, var = reference.moments(x64, spec, center)
    w_max = w.double().abs().max().item()
    amax = (lambda t: 0.0 if t is None else t.double().abs().max().item())
    y_terms = amax(reference.norm(x64, spec, center=center)) * w_max + amax(b) + amax(r)
    terms = (var + 1e-5).rsqrt().max().item() * amax(dy) * w_max * 1.2
    assert_close(y, y64, dtype, eager_y, "y", term_scale=y_terms)
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), leaves) if t is not None]
    for i, name in enumerate(names):
        assert_close(g[i], g64[i], live[i].dtype, None if eager_g is None else eager_g[i], name,
                     term_scale=terms if name == "dx" else 0.0)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# (scope, shape, num_groups, S): every scope that reduces N, channel groups at the same time,
# 2-D to 5-D, odd sizes.
CASES = [
    ("batch", (6, 3, 5, 3), None, 3),
    ("batch", (8, 5), None, 4),
    ("batch", (4, 3, 3, 2, 3), None, 2),
    ("batch_group", (4, 6, 3, 2), 3, 2),
    ("NH", (6, 3, 4, 5), None, 3),
    ("NCL", (4, 6, 7), 3, 2),
    ("N", (6, 5, 3), None, 2),
]


@pytest.mark.parametrize("scope,shape,groups,s", CASES)
def test_forward_backward_match_chunked_reference(scope, shape, groups, s):
    x, *_ = make_inputs(shape, torch.float32)
    _check(x, scope, s, groups=groups)


@pytest.mark.parametrize("regime", ["looped", "split", dispatch.NATIVE])
@pytest.mark.parametrize("scope,shape,groups,s", [CASES[0], CASES[3]])
def test_every_regime(scope, shape, groups, s, regime):
    x, *_ = make_inputs(shape, torch.float32, offset=3.0)
    _check(x, scope, s, groups=groups, regime=regime, residual=True, activation="silu")


@pytest.mark.parametrize("regime", ["fused", "split"])
@pytest.mark.parametrize("scope,groups", [("batch", None), ("batch_group", 2), ("NW", None)])
def test_channels_last(scope, groups, regime):
    x, *_ = make_inputs((6, 4, 3, 5), torch.float32, memory_format=torch.channels_last)
    _check(x, scope, 3, groups=groups, regime=regime)


def test_channels_last_3d():
    x, *_ = make_inputs((4, 3, 2, 3, 2), torch.float32, memory_format=torch.channels_last_3d)
    _check(x, "batch", 2, residual=True, activation="relu")


def test_batch_axis_not_outermost():
    # N is not the largest stride: rows of the statistic view are channel-major, not S-major, so
    # dweight/dbias must gather each channel's S rows by the channel index, not by position.
    x = torch.randn(5, 8, 6).permute(1, 0, 2)
    assert x.stride(0) < x.stride(1)
    _check(x, "batch", 4)


def test_five_d_scope_whose_channel_view_needs_too_many_dims():
    # "NH" on NCDHW keeps D and W apart: with S the weight-gradient view has five dims, so the
    # backward falls back to the torch regime (explain says so) and must still be right.
    x, *_ = make_inputs((4, 3, 2, 3, 4), torch.float32)
    w = torch.ones(3)
    assert tritonorm.explain(x, "NH", sample_groups=2, weight=w, op="backward").kernel == dispatch.NATIVE
    _check(x, "NH", 2)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("scope,groups", [("batch", None), ("batch_group", 2)])
def test_low_precision(dtype, scope, groups):
    x, *_ = make_inputs((6, 4, 3, 3), dtype)
    _check(x, scope, 3, groups=groups, wdtype=torch.float32 if scope == "batch" else None)


def test_one_launch_for_the_whole_batch(monkeypatch):
    calls = []
    kernel = fk._fwd_fused_kernel

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr(fk, "_fwd_fused_kernel", Counting())
    x, w, b, *_ = make_inputs((8, 3, 4, 4), torch.float32)
    with dispatch.forced("fused"):
        tritonorm.norm(x, "batch", sample_groups=4, weight=w, bias=b, backend="triton")
    assert len(calls) == 1


@pytest.mark.parametrize("scope,shape,groups,s,stat_shape", [
    ("batch", (6, 3, 4, 2), None, 3, (3, 3)),
    ("batch_group", (4, 6, 2, 2), 3, 2, (2, 3)),
    ("NH", (4, 3, 2, 5), None, 2, (2, 3, 5)),
])
def test_statistics_have_the_sample_group_axis_first(scope, shape, groups, s, stat_shape):
    x, *_ = make_inputs(shape, torch.float32, offset=2.0)
    spec = scopes.parse(scope, x.dim(), groups, shape[1], sample_groups=s, batch=shape[0])
    assert spec.stat_shape(shape) == stat_shape
    plain = scopes.parse(scope, x.dim(), groups, shape[1])
    chunks = [reference.moments(c.double(), plain) for c in x.chunk(s)]
    m64, v64 = torch.stack([m for m, _ in chunks]), torch.stack([v for _, v in chunks])
    _, mean, var = tritonorm.norm_with_stats(x, scope, num_groups=groups, sample_groups=s, backend="triton")
    assert_close(mean, m64, torch.float32, what="mean")
    assert_close(var, v64, torch.float32, what="var")
    xs = x.clone().requires_grad_()
    mean, var = tritonorm.moments(xs, scope, num_groups=groups, sample_groups=s, backend="triton")
    assert_close(mean, m64, torch.float32, what="moments mean")
    x64 = x.double().requires_grad_()
    m_ref, v_ref = reference.moments(x64, spec)
    assert_close(m_ref, m64, torch.float64, what="reference mean")
    dm, dv = torch.randn_like(m64), torch.randn_like(v64)
    g64, = torch.autograd.grad((m_ref * dm).sum() + (v_ref * dv).sum(), x64)
    g, = torch.autograd.grad((mean * dm.float()).sum() + (var * dv.float()).sum(), xs)
    assert_close(g, g64, torch.float32, what="d moments / dx")


def _expected_running(x, scope, groups, s, rm, rv, momentum, center):
    """PyTorch's instance_norm rule, spelled out per chunk: the mean over the chunks of each
    chunk's mean and unbiased variance."""
    plain = scopes.parse(scope, x.dim(), groups, x.shape[1])
    m = plain.count((x.shape[0] // s, *x.shape[1:]))
    means, unbiased = [], []
    for c in x.double().chunk(s):
        mean, var = reference.moments(c, plain, center)
        means.append(mean)
        unbiased.append(var * (m / (m - 1)) if center else var)
    rv_new = (1 - momentum) * rv.double() + momentum * torch.stack(unbiased).mean(0)
    rm_new = None if rm is None else (1 - momentum) * rm.double() + momentum * torch.stack(means).mean(0)
    return rm_new, rv_new


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("scope,shape,groups,s,backend", [
    ("batch", (6, 3, 4, 2), None, 3, "triton"),
    ("batch_group", (4, 6, 3), 3, 2, "triton"),
    ("batch", (6, 3, 4, 2), None, 2, "reference"),
])
def test_running_statistics_one_update_per_call(scope, shape, groups, s, backend, center):
    x, w, b, *_ = make_inputs(shape, torch.float32)
    n_stats = shape[1] if groups is None else groups
    rm = torch.randn(n_stats) if center else None
    rv = torch.rand(n_stats) + 0.5
    rm64, rv64 = _expected_running(x, scope, groups, s, rm, rv, 0.3, center)
    tritonorm.norm(x, scope, num_groups=groups, sample_groups=s, weight=w, bias=b, center=center,
                   running_mean=rm, running_var=rv, momentum=0.3, backend=backend)
    if center:
        assert_close(rm, rm64, torch.float32, what="running_mean")
    assert_close(rv, rv64, torch.float32, what="running_var")


def test_eval_uses_running_statistics_for_the_whole_batch():
    x, w, b, _, dy = make_inputs((6, 3, 4, 2), torch.float32)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = rm.clone(), rv.clone()
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = tritonorm.norm(leaves[0], "batch", sample_groups=3, weight=leaves[1], bias=leaves[2], running_mean=rm,
                       running_var=rv, training=False, backend="triton")
    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    y64 = reference.norm(leaves64[0], scopes.parse("batch", 4), leaves64[1], leaves64[2],
                         running_mean=rm.double(), running_var=rv.double(), training=False)
    assert_close(y, y64, torch.float32)
    for name, a, e in zip(("dx", "dweight", "dbias"), torch.autograd.grad(y, leaves, dy),
                          torch.autograd.grad(y64, leaves64, dy.double())):
        assert_close(a, e, torch.float32, what=name)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_explain_and_tuning_key_show_the_sample_groups():
    x = torch.empty(256, 64, 56, 56, device="meta")
    plan = tritonorm.explain(x, "batch", sample_groups=8, device="h200")
    assert "S=8 sample groups" in plan.reason and "P=512 statistics" in plan.reason
    view = layout.stat_view(x.shape, scopes.parse("batch", 4, sample_groups=8), x.stride(), x.stride())
    problem = dispatch.problem_from_view("forward", view, 4, spec=scopes.parse("batch", 4, sample_groups=8))
    assert problem.scope.endswith("/s8")
    assert "sample groups" not in tritonorm.explain(x, "batch", device="h200").reason


@pytest.mark.parametrize("kw,exc,words", [
    (dict(scope="batch", sample_groups=4), ValueError, ["sample_groups=4", "divide", "6"]),
    (dict(scope="batch", sample_groups=0), ValueError, ["sample_groups", ">= 1"]),
    (dict(scope="batch", sample_groups=-2), ValueError, ["sample_groups", ">= 1"]),
    (dict(scope="batch", sample_groups=2.0), TypeError, ["sample_groups", "int"]),
    (dict(scope="batch", sample_groups=True), TypeError, ["sample_groups", "int"]),
    (dict(scope="instance", sample_groups=2), ValueError, ["sample_groups=2", "does not reduce N"]),
    (dict(scope="group", num_groups=2, sample_groups=3), ValueError, ["sample_groups=3", "reduce N"]),
    (dict(scope="HW", sample_groups=2), ValueError, ["sample_groups=2", "reduce N"]),
])
def test_bad_sample_groups_raise_naming_the_argument_and_change_nothing(kw, exc, words):
    x = torch.randn(6, 4, 3, 3)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    before = rm.clone(), rv.clone()
    running = dict(running_mean=rm, running_var=rv) if kw["scope"] == "batch" else {}
    for fn in (tritonorm.norm, tritonorm.norm_with_stats):
        with pytest.raises(exc) as info:
            fn(x, **kw, **running, backend="triton")
        assert all(wd in str(info.value) for wd in words), str(info.value)
    with pytest.raises(exc):
        tritonorm.moments(x, **kw)
    with pytest.raises(exc):
        tritonorm.explain(x, **kw)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_running_statistics_are_per_channel_not_per_group():
    x = torch.randn(6, 4, 3)
    with pytest.raises(ValueError, match="running_mean must have shape \\(4,\\)"):
        tritonorm.norm(x, "batch", sample_groups=3, running_mean=torch.zeros(12), running_var=torch.ones(12))


# ---- GhostBatchNorm modules ----------------------------------------------------------------


def _ghost_reference(x, vbs, weight, bias):
    spec = scopes.parse("batch", x.dim())
    return torch.cat([reference.norm(c, spec, weight, bias) for c in x.split(vbs)])


@pytest.mark.parametrize("cls,shape,vbs", [
    (GhostBatchNorm1d, (12, 5), 4),           # three full groups
    (GhostBatchNorm2d, (10, 3, 3, 3), 4),     # 4, 4 and a smaller last group of 2
    (GhostBatchNorm3d, (5, 2, 2, 3, 2), 8),   # fewer samples than one virtual batch
    (GhostBatchNorm1d, (9, 4, 6), 4),         # 4, 4, 1: one sample, six positions
])
def test_ghost_module_training_matches_split_loop(cls, shape, vbs):
    m = cls(shape[1], vbs, momentum=0.2)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
        m.running_var.uniform_(0.5, 1.5)
    x, _, _, _, dy = make_inputs(shape, torch.float32)
    x64 = x.double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (m.weight, m.bias))
    y64 = _ghost_reference(x64, vbs, w64, b64)
    # Running statistics: one update, the mean over the (unequal) groups of mean and unbiased var.
    chunks = x.double().split(vbs)
    means = torch.stack([c.transpose(0, 1).reshape(shape[1], -1).mean(1) for c in chunks]).mean(0)
    variances = torch.stack([c.transpose(0, 1).reshape(shape[1], -1).var(1) for c in chunks]).mean(0)
    rm64 = 0.8 * m.running_mean.double() + 0.2 * means
    rv64 = 0.8 * m.running_var.double() + 0.2 * variances
    xs = x.clone().requires_grad_()
    y = m(xs)
    assert_close(y, y64, torch.float32)
    g = torch.autograd.grad(y, (xs, m.weight, m.bias), dy)
    g64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    for name, a, e in zip(("dx", "dweight", "dbias"), g, g64):
        assert_close(a, e, torch.float32, what=name)
    assert_close(m.running_mean, rm64, torch.float32, what="running_mean")
    assert_close(m.running_var, rv64, torch.float32, what="running_var")
    assert int(m.num_batches_tracked) == 1


def test_ghost_module_channels_last_keeps_layout():
    m = GhostBatchNorm2d(4, 2)
    x = torch.randn(6, 4, 3, 2).contiguous(memory_format=torch.channels_last)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, _ghost_reference(x.double(), 2, None, None), torch.float32)


def test_ghost_module_eval_and_state_dict_round_trip_with_batchnorm():
    bn = torch.nn.BatchNorm2d(3)
    bn.train()
    for _ in range(3):
        bn(torch.randn(8, 3, 4, 4) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    ghost = GhostBatchNorm2d(3, 4)
    ghost.load_state_dict(bn.state_dict())
    assert set(ghost.state_dict()) == set(bn.state_dict())
    ghost.eval()
    bn.eval()
    x = torch.randn(6, 3, 4, 4)  # not a multiple of the virtual batch: eval does not care
    y64 = reference.norm(x.double(), scopes.parse("batch", 4), bn.weight.double(), bn.bias.double(),
                         running_mean=bn.running_mean.double(), running_var=bn.running_var.double(),
                         training=False)
    assert_close(ghost(x), y64, torch.float32)
    ghost.train()
    ghost(torch.randn(8, 3, 4, 4))
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict(ghost.state_dict())
    for k, v in ghost.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert int(back.num_batches_tracked) == 4


def test_ghost_module_without_running_stats_and_momentum_none():
    m = GhostBatchNorm1d(3, 2, track_running_stats=False)
    x = torch.randn(6, 3, 5)
    m.eval()  # no running statistics: batch statistics per virtual batch, as BatchNorm does
    assert_close(m(x), _ghost_reference(x.double(), 2, m.weight.double(), m.bias.double()), torch.float32)
    cum = GhostBatchNorm1d(3, 3, momentum=None)
    xs = [torch.randn(6, 3, 4) for _ in range(2)]
    for xi in xs:
        cum(xi)
    per_call = [torch.stack([c.transpose(0, 1).reshape(3, -1).double().mean(1) for c in xi.split(3)]).mean(0)
                for xi in xs]
    assert_close(cum.running_mean, (per_call[0] + per_call[1]) / 2, torch.float32, what="cumulative mean")


@pytest.mark.parametrize("args,exc,words", [
    ((3, 0), ValueError, ["virtual_batch_size", ">= 1"]),
    ((3, 2.5), TypeError, ["virtual_batch_size", "int"]),
    ((3, True), TypeError, ["virtual_batch_size", "int"]),
])
def test_ghost_module_bad_virtual_batch_size(args, exc, words):
    with pytest.raises(exc) as info:
        GhostBatchNorm1d(*args)
    assert all(wd in str(info.value) for wd in words)


def test_ghost_module_single_value_group_raises_and_changes_nothing():
    m = GhostBatchNorm1d(3, 4)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="virtual_batch_size=4"):
        m(torch.randn(9, 3))  # groups 4, 4 and 1: the last has one value per channel
    with pytest.raises(ValueError, match="3 channels"):
        m(torch.randn(8, 5))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert "virtual_batch_size=4" in repr(m)


def test_ghost_module_with_a_smaller_last_group_under_compile():
    # Two launches, a cat and the unequal-groups running update: no graph break, same results.
    import copy

    torch._dynamo.reset()
    m = GhostBatchNorm2d(3, 4, activation="relu")
    twin = copy.deepcopy(m)
    x = torch.randn(10, 3, 2, 3, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    y2 = twin(x2)
    assert_close(y, y2.double(), torch.float32, what="compiled output")
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    assert_close(x.grad, x2.grad.double(), torch.float32, what="compiled dx")
    assert_close(m.weight.grad, twin.weight.grad.double(), torch.float32, what="compiled dweight")
    assert_close(m.running_var, twin.running_var.double(), torch.float32, what="compiled running_var")
    torch._dynamo.reset()
