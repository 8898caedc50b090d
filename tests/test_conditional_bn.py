"""Conditional BatchNorm: scope "batch" (statistics per channel over N and space) with a
per-(sample, channel) weight/bias — (N, C, 1, ...), alone or beside a (C,) / (1, C, 1, ...) one —
read in place by plain BatchNorm's kernels (PARAM_NC == 3), their gradients the dx pass's
(channel, sample) segment partials (layout.sample_segments): no expansion of a parameter to x's
shape, no per-element gradients reduced by torch.

Every case runs under launch.POISON against the float64 reference
y = act(batch_norm(x) * w + b + residual) on fresh inputs (training: batch statistics, running
statistics blended as torch does; eval: the running statistics); y, dx, dweight, dbias,
dresidual and the running statistics are checked, and the launches recorded with their
PARAM_NC / PARAM_FULL flags.
"""

from __future__ import annotations

import pytest
import torch

import tritonorm
from helpers import (LOW, aten_ops_mode, assert_close, kernels_outside_dispatch_modes, record_param_launches,
                     small_tiles)
from tritonorm import activations, core, reference
from tritonorm.kernels import launch

CL, CL3 = torch.channels_last, torch.channels_last_3d


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)
    launch.clear()


def _param(kind, x, dtype, *, bias, strided=False):
    """A weight/bias of ``kind``: "nc" (N, C, 1, ...), "c" (C,), "1c" (1, C, 1, ...) or None;
    ``strided``: the second half of a (N, 2C, 1, ...) tensor (torch.chunk of a projected
    embedding, as class-conditional BatchNorm layers make them)."""
    if kind is None:
        return None
    N, C, rest = x.shape[0], x.shape[1], [1] * (x.dim() - 2)
    shape = {"nc": (N, C, *rest), "c": (C,), "1c": (1, C, *rest)}[kind]
    if strided:
        full = torch.randn(shape[0], 2 * C, *rest, dtype=torch.float64)
        t = full[:, C:] if bias else 1.0 + 0.5 * full[:, C:]
        return t.to(dtype)
    t = torch.randn(shape, dtype=torch.float64)
    return (t if bias else 1.0 + 0.5 * t).to(dtype)


def _ref(x, w, b, r, rm, rv, training, act):
    """The composition of the reference BatchNorm (running statistics updated by reference) and
    the broadcast affine, residual and activation."""
    def view(t):
        return t.view(1, -1, *([1] * (x.dim() - 2))) if t.dim() == 1 else t
    z = tritonorm.norm(x, "batch", running_mean=rm, running_var=rv, training=training, backend="reference")
    if w is not None:
        z = z * view(w).to(z.dtype)
    if b is not None:
        z = z + view(b).to(z.dtype)
    if r is not None:
        z = z + r
    return activations.apply(act, z)


def _run(shape, fmt, regime, wk="nc", bk="nc", *, dtype=torch.float32, act="silu", residual=False,
         training=True, want="xwbr", strided=False, seen=None, sliced=False):
    """Forward, the asked-for gradients and the running statistics against float64; returns the
    launches (forward, backward) when ``seen`` records them. ``sliced``: x every other row of a
    tensor twice as high (strides the kernels cannot read in place: copied to y's layout)."""
    big = (*shape[:2], 2 * shape[2], *shape[3:]) if sliced else shape
    x = (torch.randn(big, dtype=torch.float64) + 0.5).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    if sliced:
        x = x[:, :, ::2]
    w, b = _param(wk, x, dtype, bias=False), _param(bk, x, dtype, bias=True, strided=strided)
    r = torch.randn(shape, dtype=torch.float64).to(dtype) if residual else None
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    C = shape[1]
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    leaves = {"x": x, "w": w, "b": b, "r": r}
    want = [k for k in want if leaves[k] is not None]
    ours = {k: None if t is None else t.detach().requires_grad_(k in want) for k, t in leaves.items()}
    run_mean, run_var = rm.float(), rv.float()
    with small_tiles(regime) if regime else _null():
        if seen is not None:
            seen.clear()
        y = tritonorm.norm(ours["x"], "batch", weight=ours["w"], bias=ours["b"], residual=ours["r"], activation=act,
                           running_mean=run_mean, running_var=run_var, training=training, backend="triton")
        fwd = list(seen) if seen is not None else None
        if seen is not None:
            seen.clear()
        got = torch.autograd.grad(y, [ours[k] for k in want], dy)
        bwd = list(seen) if seen is not None else None
    assert y.dtype == dtype and (sliced or y.stride() == x.stride())
    r64 = {k: None if t is None else t.detach().double().requires_grad_(k in want) for k, t in leaves.items()}
    rm64, rv64 = rm.float().double(), rv.float().double()
    y64 = _ref(r64["x"], r64["w"], r64["b"], r64["r"], rm64, rv64, training, act)
    exp = torch.autograd.grad(y64, [r64[k] for k in want], dy.double())
    ye = ge = None
    if dtype in LOW:
        rl = {k: None if t is None else t.detach().requires_grad_(k in want) for k, t in leaves.items()}
        ye = _ref(rl["x"], rl["w"], rl["b"], rl["r"], rm.float().clone(), rv.float().clone(), training, act)
        ge = torch.autograd.grad(ye, [rl[k] for k in want], dy)
    # dx is a difference of terms of size rstd * |dy| * |w|: rounding scales with those.
    _, var = reference.moments(x.double(), tritonorm.scope.parse("batch", x.dim(), None, C))
    wmax = 1.0 if w is None else w.double().abs().max().item()
    terms = (var + 1e-5).rsqrt().max().item() * dy.double().abs().max().item() * wmax * 1.2
    assert_close(y, y64, dtype, ye, "y", term_scale=4.0)
    for i, (k, a, e) in enumerate(zip(want, got, exp)):
        assert a.shape == leaves[k].shape and a.dtype == leaves[k].dtype, k  # the parameter's own shape
        assert_close(a, e, dtype, None if ge is None else ge[i], "d" + k, term_scale=terms if k == "x" else 0.0)
    # Running statistics: blended in training (as torch: unbiased variance), untouched in eval.
    assert_close(run_mean, rm64, torch.float32, what="running_mean")
    assert_close(run_var, rv64, torch.float32, what="running_var")
    if not training:
        assert torch.equal(run_mean, rm.float()) and torch.equal(run_var, rv.float())
    return fwd, bwd


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# Launches that never read weight or bias: the split forward's moments, the finish of partials.
NO_PARAMS = ("_fwd_partial_kernel", "_finish_kernel")


def _in_place(launches) -> bool:
    """Every launch that reads the weight/bias read the per-sample ones in place (PARAM_NC == 3),
    none an expanded one (PARAM_FULL)."""
    return bool(launches) and all(not full and (nc == 3 or name in NO_PARAMS) for name, nc, full in launches)


# shape, memory format: NCHW and channels_last 2-D, 1-D (N, C, L), 3-D NCDHW and channels_last_3d.
CASES = [
    ((3, 4, 3, 5), None),
    ((2, 3, 4, 5), CL),
    ((3, 4, 7), None),
    ((2, 3, 2, 3, 2), CL3),
    ((2, 4, 2, 2, 3), None),
]
FWD = {"fused": ["_fwd_fused_kernel"], "looped": ["_fwd_looped_kernel"],
       "split": ["_fwd_partial_kernel", "_fwd_apply_kernel"]}


def _bwd_expected(regime, finish: bool):
    if regime == "fused":  # a (C,) parameter beside a per-sample one: its [2, N, C] partials added over N
        return ["_bwd_fused_kernel"] + (["_finish_kernel"] if finish else [])
    return ["_bwd_sums_kernel", "_bwd_apply_kernel"]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("regime", [None, "fused", "looped", "split"])
def test_training_in_place(case, regime, monkeypatch):
    # None: the dispatcher's own choice (the interpreter profile); the others forced, small tiles.
    seen = record_param_launches(monkeypatch)
    fwd, bwd = _run(*CASES[case], regime, residual=case % 2 == 0, strided=case % 2 == 1, seen=seen)
    assert _in_place(fwd) and _in_place(bwd), (fwd, bwd)
    if regime is not None:
        assert [n for n, *_ in fwd] == FWD[regime], fwd
        assert [n for n, *_ in bwd] == _bwd_expected(regime, False), bwd
    else:  # one launch each way at these sizes
        assert len(fwd) == 1 and len(bwd) == 1, (fwd, bwd)


# One sample, one position per sample, one channel, and x with strides the views do not take.
EDGES = [((1, 4, 3, 5), None, False, "fused"), ((5, 4, 1, 1), None, False, "split"),
         ((3, 1, 4, 5), CL, False, "fused"), ((3, 4, 3, 5), None, True, "split"), ((3, 4, 3, 5), CL, True, "fused")]


@pytest.mark.parametrize("edge", range(len(EDGES)))
def test_edge_shapes_and_strides(edge, monkeypatch):
    seen = record_param_launches(monkeypatch)
    shape, fmt, sliced, regime = EDGES[edge]
    fwd, bwd = _run(shape, fmt, regime, sliced=sliced, seen=seen)
    assert _in_place(fwd) and _in_place(bwd), (fwd, bwd)
    assert [n for n, *_ in bwd] == _bwd_expected(regime, False), bwd


@pytest.mark.parametrize("case", [0, 1, 3])
@pytest.mark.parametrize("regime", [None, "fused", "split"])
def test_eval_running_statistics(case, regime, monkeypatch):
    # Eval: the apply kernel normalizes with the running statistics; dx = g * rstd, and dweight/
    # dbias still the per-(sample, channel) segment sums.
    seen = record_param_launches(monkeypatch)
    fwd, bwd = _run(*CASES[case], regime, training=False, act="gelu", residual=case == 1, seen=seen)
    assert _in_place(fwd) and _in_place(bwd), (fwd, bwd)
    assert [n for n, *_ in fwd] == ["_fwd_apply_kernel"], fwd
    if regime is not None:
        assert [n for n, *_ in bwd] == _bwd_expected(regime, False), bwd


# (weight kind, bias kind, case, regime): a (C,) or (1, C, 1, ...) parameter beside a per-sample one,
# one of them absent.
MIXED = [("c", "nc", 0, "fused"), ("nc", "c", 1, "split"), ("1c", "nc", 2, "looped"), ("nc", "1c", 3, "fused"),
         ("nc", None, 4, "split"), (None, "nc", 1, "fused"), ("c", "nc", 3, "looped")]


@pytest.mark.parametrize("wk,bk,case,regime", MIXED)
def test_per_channel_beside_per_sample(wk, bk, case, regime, monkeypatch):
    seen = record_param_launches(monkeypatch)
    fwd, bwd = _run(*CASES[case], regime, wk, bk, seen=seen)
    assert _in_place(fwd) and _in_place(bwd), (fwd, bwd)
    assert [n for n, *_ in fwd] == FWD[regime], fwd
    assert [n for n, *_ in bwd] == _bwd_expected(regime, "c" in (wk, bk) or "1c" in (wk, bk)), bwd


# Which of x, weight, bias, residual are differentiated (the backward is planned for exactly those).
SUBSETS = [("w", 0, "fused"), ("b", 1, "split"), ("x", 3, "fused"), ("x", 2, "looped"), ("wb", 4, "looped"),
           ("xr", 0, "split"), ("wr", 1, "fused")]


@pytest.mark.parametrize("want,case,regime", SUBSETS)
def test_gradient_subsets(want, case, regime, monkeypatch):
    seen = record_param_launches(monkeypatch)
    _, bwd = _run(*CASES[case], regime, act="relu", residual=True, want=want, seen=seen)
    assert _in_place(bwd), bwd
    if "w" not in want and "b" not in want:  # dx alone: the plain dx kernels
        assert [n for n, *_ in bwd] == (["_bwd_fused_kernel"] if regime == "fused"
                                        else ["_bwd_sums_kernel", "_bwd_apply_kernel"]), bwd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case,regime,training", [(1, "fused", True), (0, "split", True), (3, "looped", False)])
def test_low_precision(dtype, case, regime, training):
    _run(*CASES[case], regime, dtype=dtype, act=None, residual=True, training=training, strided=True)


@pytest.mark.parametrize("regime", ["fused", "split"])
def test_no_x_sized_temporaries(regime, monkeypatch):
    # The only x-sized tensors made are y and dx: no expansion of a parameter, no per-element
    # gradients, no reduction by torch (the interpreter's own host copies are not counted).
    kernels_outside_dispatch_modes(monkeypatch)
    monkeypatch.setattr(launch, "POISON", False)
    x = torch.randn(3, 4, 3, 5).contiguous(memory_format=CL).requires_grad_()
    emb = torch.randn(3, 8, 1, 1)
    w, b = (1 + emb[:, :4]).requires_grad_(), emb[:, 4:].clone().requires_grad_()
    rm, rv = torch.zeros(4), torch.ones(4)
    kw = dict(weight=w, bias=b, running_mean=rm, running_var=rv, backend="triton")
    with small_tiles(regime):
        tritonorm.norm(x, "batch", **kw)  # plans built
        with aten_ops_mode() as fwd:
            y = tritonorm.norm(x, "batch", **kw)
        dy = torch.randn_like(y)
        with aten_ops_mode() as bwd:
            torch.autograd.grad(y, [x, w, b], dy)
    big = x.numel()
    assert [op for op, n in fwd.ops if n >= big] == ["empty_strided"], fwd.ops  # y
    assert [op for op, n in bwd.ops if n >= big] == ["empty_strided"], bwd.ops  # dx
    assert not [op for op, _ in fwd.ops + bwd.ops if op in ("copy_", "sum", "expand", "contiguous")]


def test_bad_weight_shape_is_a_clear_error():
    x = torch.randn(2, 4, 3, 5)
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="weight"):
        tritonorm.norm(x, "batch", weight=torch.ones(2, 4, 2, 1), bias=torch.zeros(2, 4, 1, 1), running_mean=rm,
                       running_var=rv, backend="triton")
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))  # nothing changed


@pytest.mark.parametrize("how", ["sample_outside", "sample_groups"])
def test_layouts_the_kernels_cannot_read_in_place_fall_back(how, monkeypatch):
    # x whose samples are not its outermost axis (a permuted view keeps its layout in y), and
    # Ghost BatchNorm's sample groups: the general broadcast path, still the right answer.
    seen = record_param_launches(monkeypatch)
    if how == "sample_outside":
        x64 = torch.randn(4, 3, 5, 2, dtype=torch.float64).permute(3, 0, 1, 2)  # C, H, W, N in memory
    else:
        x64 = torch.randn(4, 3, 5, 2, dtype=torch.float64)
    groups = 2 if how == "sample_groups" else 1
    N, C = x64.shape[:2]
    w64 = 1.0 + 0.5 * torch.randn(N, C, 1, 1, dtype=torch.float64)
    b64 = torch.randn(N, C, 1, 1, dtype=torch.float64)
    x, w, b = (t.float().requires_grad_() for t in (x64, w64, b64))
    y = tritonorm.norm(x, "batch", sample_groups=groups, weight=w, bias=b, backend="triton")
    assert list(core._CALLS.values())[-1].expand
    assert seen and all(nc != 3 for _, nc, _ in seen), seen
    dy = torch.randn(x.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, w, b], dy.float())
    r = [t.detach().requires_grad_() for t in (x64, w64, b64)]
    y64 = torch.cat([tritonorm.norm(xc, "batch", backend="reference") for xc in r[0].chunk(groups)]) * r[1] + r[2]
    exp = torch.autograd.grad(y64, r, dy)
    rstd = max((xc.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt().max().item() for xc in x64.chunk(groups))
    terms = rstd * dy.abs().max().item() * w64.abs().max().item() * 1.2
    assert_close(y, y64, torch.float32, what="y", term_scale=4.0)
    for name, a, e in zip(("dx", "dweight", "dbias"), got, exp):
        assert_close(a, e, torch.float32, what=name, term_scale=terms if name == "dx" else 0.0)


@pytest.mark.parametrize("regime", ["fused", "split"])
def test_explain_counts_the_launches_run(regime, monkeypatch):
    # explain() mirrors the launcher: the launches of the in-place path (training and eval, a (C,)
    # weight beside a per-sample bias or not), and a forward's bytes those of a plain BatchNorm
    # (channels_last: the same kernels) plus the per-sample parameters' own elements.
    seen = record_param_launches(monkeypatch)
    for training in (True, False):
        for wk in ("nc", "c"):
            x = torch.randn(3, 4, 3, 5).contiguous(memory_format=CL)
            w, b = _param(wk, x, torch.float32, bias=False), _param("nc", x, torch.float32, bias=True, strided=True)
            kw = dict(weight=w, bias=b, running_mean=torch.zeros(4), running_var=torch.ones(4), training=training,
                      activation="silu")
            with small_tiles(regime):
                fwd = tritonorm.explain(x, "batch", op="forward", **kw)
                bwd = tritonorm.explain(x, "batch", op="backward", **kw)
                seen.clear()
                y = tritonorm.norm(x.requires_grad_(), "batch", backend="triton",
                                   **dict(kw, weight=w.requires_grad_(), bias=b.requires_grad_()))
                assert fwd.cost.launches == len(seen) and _in_place(seen), (training, wk, seen)
                seen.clear()
                torch.autograd.grad(y, [x, w, b], torch.randn_like(y))
                assert bwd.cost.launches == len(seen) and _in_place(seen), (training, wk, seen)
                plain = tritonorm.explain(x.detach(), "batch", op="forward", **dict(kw, weight=torch.ones(4),
                                                                                     bias=torch.ones(4)))
            extra = (w.numel() + b.numel() - 8) * 4
            assert fwd.kernel == plain.kernel and fwd.cost.bytes == plain.cost.bytes + extra
