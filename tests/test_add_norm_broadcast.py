"""tritonorm.add_norm (and add_layer_norm / add_rms_norm) with a broadcast (adaptive) weight and
bias: h = x + residual written and y = norm(h) with the modulation, one launch forward as a
plain add_norm, the backward a plain add_norm backward (dh added), gradients to x, residual,
weight and bias.

Per-(sample, channel) parameters (GroupNorm, conditional BatchNorm) and adaLN's (N, 1, D) are
read in place (PARAM_NC); other broadcast shapes expanded (PARAM_FULL). Every case runs under
launch.POISON against the float64 reference of the definition on fresh inputs, with the
launches recorded with their flags.
"""

from __future__ import annotations

import pytest
import torch

import tritonorm
import tritonorm.functional as TF
from helpers import (LOW, assert_close, aten_ops_mode, kernels_outside_dispatch_modes, row_kernels_only,
                     small_tiles)
from tritonorm import dispatch, prenorm, reference, scope as scopes
from tritonorm.kernels import forward as fk
from tritonorm.kernels import launch

CL = torch.channels_last
FWD = {"fused": ["_fwd_fused_kernel"], "looped": ["_fwd_looped_kernel"],
       "split": ["_fwd_partial_kernel", "_fwd_apply_kernel"]}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    row_kernels_only(monkeypatch)


def _record(monkeypatch) -> list:
    """(kernel, PARAM_NC, PARAM_FULL, PRE_ADD, ADD_DH, DX_TWICE) of every Triton launch."""
    seen: list = []
    cls = type(fk._fwd_fused_kernel)
    original = cls.run

    def run(kernel, *args, **kw):
        seen.append((kernel.fn.__name__, int(kw.get("PARAM_NC", 0)), bool(kw.get("PARAM_FULL", False)),
                     bool(kw.get("PRE_ADD", False)), bool(kw.get("ADD_DH", False)),
                     bool(kw.get("DX_TWICE", False))))
        return original(kernel, *args, **kw)
    monkeypatch.setattr(cls, "run", run)
    return seen


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _param(shape, dtype, scale, strided=False):
    """A parameter of ``shape`` (None: absent); ``strided``: the second half of a projection along
    dim 1 (for (N, C, 1, 1)) or the last dim (for (N, 1, D)), as torch.chunk gives."""
    if shape is None:
        return None
    bump = 1.0 if scale < 1 else 0.0
    if not strided:
        return (torch.randn(shape, dtype=torch.float64) * scale + bump).to(dtype)
    dim = 1 if shape[-1] == 1 else len(shape) - 1
    full = list(shape)
    full[dim] *= 2
    t = (torch.randn(full, dtype=torch.float64) * scale + bump).to(dtype)
    return t.narrow(dim, shape[dim], shape[dim])


def _run(scope, shape, ws, bs, *, groups=None, dtype=torch.float32, rd=None, fmt=None, force=None, act="silu",
         entry="add_norm", want="xrwb", use_h=True, strided=False, calls=None, training=True, running=None):
    """add_norm's y, h and the asked-for gradients (with an incoming dh when ``use_h``) against
    float64; returns the launches recorded (forward, backward)."""
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    r = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(rd or dtype)
    if fmt is not None:
        x, r = x.contiguous(memory_format=fmt), r.contiguous(memory_format=fmt)
    w, b = _param(ws, dtype, 0.5), _param(bs, dtype, 1.0, strided)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    dh = torch.randn(shape, dtype=torch.float64).to(rd or dtype) if use_h else None
    leaves = {"x": x, "r": r, "w": w, "b": b}
    want = [k for k in want if leaves[k] is not None]
    ours = {k: None if t is None else t.detach().requires_grad_(k in want) for k, t in leaves.items()}
    rm, rv = (None, None) if running is None else (t.clone() for t in running)
    with force if force is not None else dispatch.forced("fused"):
        if calls is not None:
            calls.clear()
        if entry == "add_norm":
            y, h = tritonorm.add_norm(ours["x"], ours["r"], scope, num_groups=groups, weight=ours["w"],
                                      bias=ours["b"], activation=act, backend="triton", residual_dtype=rd,
                                      running_mean=rm, running_var=rv, training=training)
        elif entry == "add_layer_norm":
            y, h = TF.add_layer_norm(ours["x"], ours["r"], shape[-1:], weight=ours["w"], bias=ours["b"],
                                     activation=act, residual_dtype=rd)
        else:
            y, h = TF.add_rms_norm(ours["x"], ours["r"], shape[-1:], weight=ours["w"], eps=1e-5, activation=act,
                                   residual_dtype=rd)
        fwd = list(calls) if calls is not None else None
        if calls is not None:
            calls.clear()
        outs, grads_in = ([y, h], [dy, dh]) if use_h else ([y], [dy])
        got = torch.autograd.grad(outs, [ours[k] for k in want], grads_in)
        bwd = list(calls) if calls is not None else None
    hd = rd or dtype
    assert y.dtype == dtype and h.dtype == hd and y.shape == x.shape and h.shape == x.shape
    assert y.stride() == x.stride() and h.stride() == x.stride()
    # h: the fp32 sum rounded once to its dtype (one unit in the last place: the interpreter
    # truncates where GPUs round to nearest); y: the norm of h as stored.
    exact = x.double() + r.double()
    ulp = torch.finfo(hd).eps * exact.abs().clamp_min(torch.finfo(hd).tiny)
    assert ((h.detach().double() - exact).abs() <= ulp).all(), (h.detach().double() - exact).abs().max()
    center = entry != "add_rms_norm"
    spec = scopes.parse("L" if entry != "add_norm" else scope, x.dim(), groups, shape[1])
    given = (running[0].double(), running[1].double()) if running is not None and not training else (None, None)

    def ref(hh, wt, bt, compute):
        return reference.norm(hh, spec, wt, bt, 1e-5, center, act, None, *given, 0.0,
                              training=given[1] is None, compute_dtype=compute)

    h_ref = h.detach()
    p64 = {k: None if t is None else t.double().requires_grad_(k in want) for k, t in (("w", w), ("b", b))}
    h64 = h_ref.double().requires_grad_()
    y64 = ref(h64, p64["w"], p64["b"], torch.float64)
    inner = [h64] + [p64[k] for k in "wb" if k in want]
    g64 = list(torch.autograd.grad(y64, inner, dy.double()))
    ye = ge = None
    if dtype in LOW:
        pl = {k: None if t is None else t.clone().requires_grad_(k in want) for k, t in (("w", w), ("b", b))}
        hl = h_ref.to(dtype).requires_grad_()
        ye = ref(hl, pl["w"], pl["b"], dtype)
        ge = list(torch.autograd.grad(ye, [hl] + [pl[k] for k in "wb" if k in want], dy))
    ys = h_ref.double().abs().max().item() * (1.0 if w is None else w.double().abs().max().item()) + 4.0
    assert_close(y, y64, dtype, ye, "y", term_scale=ys)
    _, var = reference.moments(h_ref.double(), spec, center)
    dx_terms = (var + 1e-5).rsqrt().max().item() * dy.double().abs().max().item() * 8.0
    dh64 = g64.pop(0) + (dh.double() if use_h else 0.0)
    dhe = None if ge is None else ge.pop(0) + (dh.to(dtype) if use_h else 0.0)
    exp = {"x": dh64, "r": dh64, **{k: g64.pop(0) for k in "wb" if k in want}}
    eager = {"x": dhe, "r": dhe if r.dtype == dtype else None, **({} if ge is None else
                                                                   {k: ge.pop(0) for k in "wb" if k in want})}
    for k, a in zip(want, got):
        assert a.shape == leaves[k].shape and a.dtype == leaves[k].dtype, k
        assert_close(a, exp[k], leaves[k].dtype, eager.get(k), "d" + k,
                     term_scale=dx_terms if k in "xr" else 0.0)
    if running is not None:  # training: blended from h's statistics as torch does; eval: untouched
        erm, erv = (t.double() for t in running)
        if training:
            reference.norm(h_ref.double(), spec, eps=1e-5, center=center, running_mean=erm, running_var=erv,
                           momentum=0.1, training=True)
        assert_close(rm, erm, torch.float32, what="running_mean")
        assert_close(rv, erv, torch.float32, what="running_var")
    return fwd, bwd


def _assert_add_norm_launches(fwd, bwd, regime, nc, fwd_names=None, bwd_names=None, twice=False):
    """Forward: a plain add_norm's launches (every kernel adding x + residual), the one that applies
    the affine reading the parameters as ``nc`` says (a PARAM_NC value, or "full"); backward: no
    torch regime, the kernel storing dx adding dh (and storing it twice for another residual dtype)."""
    assert [c[0] for c in fwd] == (fwd_names or FWD[regime]), fwd
    assert all(c[3] for c in fwd), fwd  # PRE_ADD
    affine = fwd[-1]
    assert (affine[2] if nc == "full" else (affine[1] == nc and not affine[2])), fwd
    if bwd_names is not None:
        assert [c[0] for c in bwd] == bwd_names, bwd
    dx = [c for c in bwd if c[0] in ("_bwd_fused_kernel", "_bwd_apply_kernel")]
    assert len(dx) == 1 and dx[0][4] and dx[0][5] == twice, bwd
    assert (dx[0][2] if nc == "full" else dx[0][1] == nc), bwd
    if nc != "full":  # in place: no expansion anywhere
        assert not any(c[2] for c in fwd + bwd), (fwd, bwd)


REGIMES = ("fused", "looped", "split")
# GroupNorm with AdaGroupNorm's (N, C, 1, 1) scale and shift, in place (PARAM_NC 1).
SEG_BWD = {"fused": ["_bwd_fused_kernel"], "looped": ["_bwd_sums_kernel", "_bwd_apply_kernel"],
           "split": ["_bwd_sums_kernel", "_bwd_apply_kernel"]}


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("regime", REGIMES)
def test_group_scope_per_sample_parameters_in_place(regime, fmt, monkeypatch):
    calls = _record(monkeypatch)
    fwd, bwd = _run("group", (2, 8, 3, 3), (2, 8, 1, 1), (2, 8, 1, 1), groups=2, fmt=fmt, strided=True,
                    force=small_tiles(regime), calls=calls)
    _assert_add_norm_launches(fwd, bwd, regime, 1, bwd_names=SEG_BWD[regime])
    call = list(prenorm._CALLS.values())[-1]
    assert call.plan is not None and call.plan.nc is not None and not call.expand


@pytest.mark.parametrize("regime", ["fused", "split"])
def test_group_scope_per_sample_beside_per_channel(regime, monkeypatch):
    # (N, C, 1, 1) weight beside a (C,) bias: the bias's partials added over N (fused: a finish).
    calls = _record(monkeypatch)
    fwd, bwd = _run("group", (2, 6, 4, 3), (2, 6, 1, 1), (6,), groups=3, fmt=CL, force=small_tiles(regime),
                    calls=calls)
    _assert_add_norm_launches(fwd, bwd, regime, 1,
                              bwd_names=SEG_BWD[regime] + (["_finish_kernel"] if regime == "fused" else []))


@pytest.mark.parametrize("dtype,rd", [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                      (torch.float16, torch.float32)])
def test_group_scope_low_precision_and_fp32_residual_stream(dtype, rd, monkeypatch):
    calls = _record(monkeypatch)
    fwd, bwd = _run("group", (2, 8, 3, 3), (2, 8, 1, 1), (2, 8, 1, 1), groups=4, dtype=dtype, rd=rd, fmt=CL,
                    calls=calls)
    _assert_add_norm_launches(fwd, bwd, "fused", 1, bwd_names=SEG_BWD["fused"], twice=rd is not None)


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("regime", REGIMES)
def test_group_scope_other_broadcast_shapes_expanded(regime, fmt, monkeypatch):
    # (1, C, H, W) weight, (N, 1, 1, 1) bias: expanded to x's shape, read at y's offsets; the
    # per-element gradients summed back to the parameters' shapes.
    calls = _record(monkeypatch)
    fwd, bwd = _run("group", (2, 8, 3, 3), (1, 8, 3, 3), (2, 1, 1, 1), groups=2, fmt=fmt,
                    force=small_tiles(regime), calls=calls)
    _assert_add_norm_launches(fwd, bwd, regime, "full")
    assert all(c[2] for c in bwd if c[0] != "_finish_kernel"), bwd
    assert list(prenorm._CALLS.values())[-1].expand


@pytest.mark.parametrize("regime", REGIMES)
def test_conditional_batch_norm_training(regime, monkeypatch):
    # Conditional BatchNorm (PARAM_NC 3), running statistics blended by the kernels.
    calls = _record(monkeypatch)
    running = (torch.randn(4), torch.rand(4) + 0.5)
    fwd, bwd = _run("batch", (3, 4, 3, 3), (3, 4, 1, 1), (3, 4, 1, 1), force=small_tiles(regime), calls=calls,
                    running=running, act=None)
    _assert_add_norm_launches(fwd, bwd, regime, 3)


def test_conditional_batch_norm_eval(monkeypatch):
    calls = _record(monkeypatch)
    running = (torch.randn(4), torch.rand(4) + 0.5)
    fwd, bwd = _run("batch", (3, 4, 3, 3), (3, 4, 1, 1), (1, 4, 1, 1), calls=calls, running=running,
                    training=False, fmt=CL)
    _assert_add_norm_launches(fwd, bwd, "fused", 3, fwd_names=["_fwd_apply_kernel"])


ADALN_BWD = ["_bwd_fused_kernel", "_finish_samples_kernel"]


@pytest.mark.parametrize("entry", ["add_layer_norm", "add_rms_norm", "add_norm"])
@pytest.mark.parametrize("dtype,rd", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-fp32res"])
def test_adaln_per_sample_rows_in_place(entry, dtype, rd, monkeypatch):
    # DiT's LN(h) * (1 + scale) + shift with (N, 1, D) scale and shift (a torch.chunk half), one
    # forward launch and the plain row backward's two.
    calls = _record(monkeypatch)
    bs = None if entry == "add_rms_norm" else (3, 1, 16)
    fwd, bwd = _run("L", (3, 7, 16), (3, 1, 16), bs, dtype=dtype, rd=rd, entry=entry, strided=True, calls=calls,
                    force=dispatch.forced("fused", block_p=4))
    _assert_add_norm_launches(fwd, bwd, "fused", 2, bwd_names=ADALN_BWD, twice=rd is not None)


@pytest.mark.parametrize("regime", ["looped", "split"])
def test_adaln_two_pass_forward_in_place(regime, monkeypatch):
    # A looped/split forward with the fused backward: the parameters read in place both ways.
    calls = _record(monkeypatch)
    fwd, bwd = _run("L", (2, 6, 40), (2, 1, 40), (1, 1, 40), entry="add_layer_norm", calls=calls,
                    force=dispatch.forced(regime, op="forward", block_p=2, block_m=16, split=2))
    _assert_add_norm_launches(fwd, bwd, regime, 2, bwd_names=ADALN_BWD)


ADALN_TWO_PASS_BWD = ["_bwd_col_sums_kernel", "_bwd_apply_kernel"]


@pytest.mark.parametrize("regime,entry", [("looped", "add_layer_norm"), ("split", "add_rms_norm")])
def test_adaln_two_pass_backward_in_place(regime, entry, monkeypatch):
    # The looped/split backward's first stage keeps per-sample column sums: in place both ways.
    calls = _record(monkeypatch)
    fwd, bwd = _run("L", (2, 6, 40), (2, 1, 40), (2, 1, 40) if entry == "add_layer_norm" else None, entry=entry,
                    calls=calls, force=dispatch.forced(regime, block_p=2, block_m=16, split=2))
    _assert_add_norm_launches(fwd, bwd, regime, 2, bwd_names=ADALN_TWO_PASS_BWD)
    assert bwd[0][1] == 2, bwd  # the first stage reads them per sample too


def test_per_position_rows_expanded_in_the_kernels(monkeypatch):
    # A (1, T, D) per-position weight: the functional's (rows, D) parameter, read at y's offsets.
    calls = _record(monkeypatch)
    fwd, bwd = _run("L", (2, 5, 16), (1, 5, 16), (2, 1, 16), entry="add_layer_norm", calls=calls)
    _assert_add_norm_launches(fwd, bwd, "fused", "full")


@pytest.mark.parametrize("want,use_h", [("w", False), ("b", True), ("xw", False), ("rb", True)])
def test_gradient_subsets(want, use_h, monkeypatch):
    calls = _record(monkeypatch)
    _run("group", (2, 8, 3, 3), (2, 8, 1, 1), (2, 8, 1, 1), groups=2, want=want, use_h=use_h, calls=calls)
    _run("L", (2, 6, 16), (2, 1, 16), (2, 1, 16), entry="add_layer_norm", want=want, use_h=use_h, calls=calls)
    assert not any(c[2] for c in calls), calls


@pytest.mark.parametrize("case", ["group", "adaln", "full"])
def test_no_grad_forward_and_no_torch_add(case, monkeypatch):
    # Without autograd and with it: y and h from the kernels alone, no torch add; the only
    # x-sized tensors made are y and h (and, expanded, one copy per broadcast parameter).
    kernels_outside_dispatch_modes(monkeypatch)
    monkeypatch.setattr(launch, "POISON", False)
    shape, ws, bs, scope, groups = {"group": ((2, 8, 3, 3), (2, 8, 1, 1), (2, 8, 1, 1), "group", 2),
                                    "adaln": ((2, 12, 16), (2, 1, 16), (2, 1, 16), "L", None),
                                    "full": ((2, 8, 3, 3), (1, 8, 3, 3), (8,), "group", 4)}[case]
    x, r = torch.randn(shape), torch.randn(shape)
    w, b = torch.rand(ws) + 0.5, torch.randn(bs)
    for grad in (False, True):
        args = [t.clone().requires_grad_(grad) for t in (x, r, w, b)]
        with dispatch.forced("fused"):
            tritonorm.add_norm(*args[:2], scope, num_groups=groups, weight=args[2], bias=args[3])  # plans built
            with aten_ops_mode() as ops:
                y, h = tritonorm.add_norm(*args[:2], scope, num_groups=groups, weight=args[2], bias=args[3])
        views = ("view", "_unsafe_view", "reshape", "alias", "detach", "expand")
        made = [op for op, n in ops.ops if n >= x.numel() and op not in views]
        expected = ["empty_strided", "empty_strided"]  # y, h
        if case == "full":  # the (1, C, H, W) weight, and the (C,) bias beside it, expanded to y's layout
            expected += ["empty_strided", "copy_"] * 2
        assert sorted(made) == sorted(expected), ops.ops
        assert not [op for op, _ in ops.ops if op in ("add", "add_")], ops.ops
        spec = scopes.parse(scope, x.dim(), groups, shape[1])
        y64 = reference.norm(x.double() + r.double(), spec, w.double(), b.double(), 1e-5)
        assert_close(y, y64, torch.float32, term_scale=8.0)
        assert_close(h, x.double() + r.double(), torch.float32)


def test_torch_regime_takes_the_composite(monkeypatch):
    # The torch regime has no pre_add or broadcast-parameter kernels: h by torch ops, then norm
    # (its own torch composite), never a wrong answer.
    calls = _record(monkeypatch)
    fwd, bwd = _run("group", (2, 8, 3, 3), (2, 8, 1, 1), (8,), groups=2, force=dispatch.forced("torch"),
                    calls=calls)
    assert list(prenorm._CALLS.values())[-1].plan is None and not fwd and not bwd


def test_backward_only_torch_regime_takes_the_kernels(monkeypatch):
    # A torch backward entry (tuned or forced) cannot take broadcast parameters: the heuristic's.
    calls = _record(monkeypatch)
    fwd, bwd = _run("group", (2, 8, 3, 3), (1, 8, 3, 3), (2, 8, 1, 1), groups=2, calls=calls,
                    force=dispatch.forced("torch", op="backward"))
    assert fwd and all(c[2] for c in fwd) and bwd and all(c[2] for c in bwd), (fwd, bwd)


@pytest.mark.parametrize("regime", [None, "split"])
@pytest.mark.parametrize("ws,bs,scope", [((2, 8, 1, 1), (8,), "group"), ((1, 8, 3, 3), (2, 8, 1, 1), "group"),
                                         ((2, 1, 16), (2, 1, 16), "L")])
def test_explain_counts_the_launches_run(ws, bs, scope, regime, monkeypatch):
    # explain(add_residual=...) predicts the Triton launches run, plus (expanded parameters) the
    # torch copies forward and the copies and reductions backward, one each per parameter.
    calls = _record(monkeypatch)
    shape = (2, 8, 3, 3) if scope == "group" else (2, 5, 16)
    x, r, dy = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    w, b = torch.rand(ws) + 0.5, torch.randn(bs)
    groups = 2 if scope == "group" else None
    with dispatch.forced(regime, block_m=16, split=2) if regime else _Null():
        kw = dict(num_groups=groups, weight=w, bias=b, add_residual=r)
        fwd = tritonorm.explain(x, scope, op="forward", **kw)
        bwd = tritonorm.explain(x, scope, op="backward", **kw)
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
        calls.clear()
        y, h = tritonorm.add_norm(*leaves[:2], scope, num_groups=groups, weight=leaves[2], bias=leaves[3])
        n_fwd = len(calls)
        calls.clear()
        torch.autograd.grad([y, h], leaves, [dy, dy])
    expanded = list(prenorm._CALLS.values())[-1].expand
    assert expanded == (ws == (1, 8, 3, 3))
    extra = 2 if expanded else 0
    assert fwd.cost.launches == n_fwd + extra, (fwd.cost, n_fwd)
    assert bwd.cost.launches == len(calls) + 2 * extra, (bwd.cost, calls)


@pytest.mark.parametrize("scope,shape,ws,bs,groups", [("group", (2, 6, 3, 3), (2, 6, 1, 1), (1, 6, 3, 3), 3),
                                                        ("L", (2, 5, 12), (2, 1, 12), (2, 1, 12), None)])
def test_create_graph_second_derivatives_match_float64(scope, shape, ws, bs, groups):
    # A gradient penalty through the first-order gradients (recomputed differentiably at the saved
    # h): second derivatives of x, residual, weight, bias and the incoming dy, dh against float64.
    x, r, dy, dh = (torch.randn(shape) for _ in range(4))
    w, b = torch.rand(ws) + 0.5, torch.randn(bs)
    spec = scopes.parse(scope, len(shape), groups, shape[1])

    def grads(fn, *inputs):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, h = fn(*leaves[:4])
        first = torch.autograd.grad([y, h], leaves[:4], leaves[4:], create_graph=True)
        penalty = first[0].square().sum() + (first[1] * first[1].detach().cos()).sum() + first[2].pow(3).sum() \
            + (first[3] * first[2]).sum()
        return [*first, *torch.autograd.grad(penalty, leaves)]

    def ours(x, r, w, b):
        return tritonorm.add_norm(x, r, scope, num_groups=groups, weight=w, bias=b, activation="silu",
                                  backend="triton")

    def ref(x, r, w, b):
        h = x + r
        return reference.norm(h, spec, w, b, 1e-5, True, "silu"), h

    got = grads(ours, x, r, w, b, dy, dh)
    assert list(prenorm._CALLS.values())[-1].plan is not None
    want = grads(ref, *(t.double() for t in (x, r, w, b, dy, dh)))
    names = ["dx", "dres", "dw", "db", "d2x", "d2res", "d2w", "d2b", "d2dy", "d2dh"]
    for name, g, g64 in zip(names, got, want):
        assert_close(g, g64, torch.float32, what=name)


def _bad(x, r, w, b, rm, rv, entry):
    if entry == "add_norm":
        return tritonorm.add_norm(x, r, "batch", weight=w, bias=b, running_mean=rm, running_var=rv, backend="triton")
    return TF.add_layer_norm(x, r, x.shape[-1:], weight=w, bias=b)


@pytest.mark.parametrize("entry,bad,error,word", [
    ("add_norm", dict(w=(2, 3, 1, 1)), ValueError, "weight"),      # not broadcastable to x
    ("add_norm", dict(b=(2, 4, 2, 1)), ValueError, "bias"),
    ("add_norm", dict(b=(5,)), ValueError, "bias"),                 # beside a broadcast weight: not (C,)
    ("add_norm", dict(b="int"), TypeError, "bias"),
    ("add_norm", dict(r=(2, 4, 3, 2)), ValueError, "residual"),     # residual of another shape
    ("add_norm", dict(r="meta"), ValueError, "residual"),           # residual on another device
    ("add_layer_norm", dict(w=(3, 1, 3)), ValueError, "weight"),
    ("add_layer_norm", dict(r=(2, 4, 3, 2)), ValueError, "residual"),
])
def test_bad_input_names_the_argument_and_changes_nothing(entry, bad, error, word):
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    w, b = torch.rand(2, 4, 1, 1) + 0.5, torch.randn(2, 4, 1, 1)
    if entry != "add_norm":
        w, b = torch.rand(2, 1, 1, 3) + 0.5, torch.randn(1, 1, 1, 3)
    if "w" in bad:
        w = torch.rand(bad["w"])
    if bad.get("b") == "int":
        b = torch.ones(4, dtype=torch.int32)
    elif "b" in bad:
        b = torch.randn(bad["b"])
    if bad.get("r") == "meta":
        r = torch.randn(2, 4, 3, 3, device="meta")
    elif "r" in bad:
        r = torch.randn(bad["r"])
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    before = [t.clone() for t in (x, w, b, rm, rv)] + ([r.clone()] if r.device.type != "meta" else [])
    with pytest.raises(error) as info:
        _bad(x, r, w, b, rm, rv, entry)
    assert word in str(info.value), str(info.value)
    after = [x, w, b, rm, rv] + ([r] if r.device.type != "meta" else [])
    assert all(torch.equal(a, c) for a, c in zip(before, after))
