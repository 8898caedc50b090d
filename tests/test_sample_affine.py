"""Per-(sample, channel) weight/bias — (N, C, 1, ...), alone or beside a (C,) one — read in place
by the GroupNorm/InstanceNorm kernels (PARAM_NC), their gradients the backward's per-(sample,
channel) partials: AdaGroupNorm, ResnetBlock2D's scale_shift, AdaIN, FiLM.

Every case runs under launch.POISON against the float64 reference y = act(norm(x) * w + b) on
fresh inputs; launches are recorded, and the aten ops a call runs are checked for x-sized
temporaries (an expansion of a parameter, per-element gradients, a reduction).
"""

from __future__ import annotations

import pytest
import torch

import tritonorm
from helpers import (LOW, assert_close, aten_ops_mode, kernels_outside_dispatch_modes, record_launches,
                     row_kernels_only, small_tiles)
from tritonorm import activations, core
from tritonorm.kernels import launch

CL, CL3 = torch.channels_last, torch.channels_last_3d


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    row_kernels_only(monkeypatch)  # here the row/column kernels' PARAM_NC path, in every layout


def _force(regime):
    return small_tiles(regime)


def _param(kind, x, scale, dtype, strided=False):
    """A weight/bias of ``kind``: "nc" (N, C, 1, ...), "c" (C,), "1c" (1, C, 1, ...) or None;
    ``strided``: the second half of a (N, 2C, 1, ...) tensor, as torch.chunk of a projected
    embedding gives (diffusers' AdaGroupNorm, scale_shift)."""
    if kind is None:
        return None
    N, C, rest = x.shape[0], x.shape[1], [1] * (x.dim() - 2)
    shape = {"nc": (N, C, *rest), "c": (C,), "1c": (1, C, *rest)}[kind]
    if strided:
        full = torch.randn(shape[0], 2 * C, *rest, dtype=torch.float64) * scale + (1.0 if scale < 1 else 0.0)
        t = full.to(dtype)[:, C:]
        assert t.stride(0) == 2 * C
        return t
    t = torch.randn(shape, dtype=torch.float64) * scale + (1.0 if scale < 1 else 0.0)
    return t.to(dtype)


def _ref(x, scope, groups, w, b, act):
    def view(t):
        return t.view(1, -1, *([1] * (x.dim() - 2))) if t.dim() == 1 else t
    z = tritonorm.norm(x, scope, num_groups=groups, backend="reference")
    if w is not None:
        z = z * view(w).to(z.dtype)
    if b is not None:
        z = z + view(b).to(z.dtype)
    return activations.apply(act, z)


def _run(shape, scope, groups, fmt, regime, wk, bk, dtype=torch.float32, act="silu", want="xwb",
         strided=False, names=None):
    """Forward and the asked-for gradients against float64; returns the launches (forward, backward)."""
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w, b = _param(wk, x, 0.5, dtype), _param(bk, x, 1.0, dtype, strided)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    leaves = {"x": x, "w": w, "b": b}
    want = [k for k in want if leaves[k] is not None]
    ours = {k: None if t is None else t.detach().requires_grad_(k in want) for k, t in leaves.items()}
    with _force(regime):
        if names is not None:
            names.clear()
        y = tritonorm.norm(ours["x"], scope, num_groups=groups, weight=ours["w"], bias=ours["b"], activation=act,
                           backend="triton")
        fwd = list(names) if names is not None else None
        if names is not None:
            names.clear()
        got = torch.autograd.grad(y, [ours[k] for k in want], dy)
    assert y.dtype == dtype and y.stride() == x.stride()
    r64 = {k: None if t is None else t.detach().double().requires_grad_(k in want) for k, t in leaves.items()}
    y64 = _ref(r64["x"], scope, groups, r64["w"], r64["b"], act)
    exp = torch.autograd.grad(y64, [r64[k] for k in want], dy.double())
    ye = ge = None
    if dtype in LOW:
        rl = {k: None if t is None else t.detach().requires_grad_(k in want) for k, t in leaves.items()}
        ye = _ref(rl["x"], scope, groups, rl["w"], rl["b"], act)
        ge = torch.autograd.grad(ye, [rl[k] for k in want], dy)
    assert_close(y, y64, dtype, ye, "y", term_scale=4.0)
    for i, (k, a, e) in enumerate(zip(want, got, exp)):
        assert a.shape == leaves[k].shape and a.dtype == leaves[k].dtype, k
        assert_close(a, e, dtype, None if ge is None else ge[i], k, term_scale=8.0 if k == "x" else 0.0)
    return fwd, (list(names) if names is not None else None)


# shape, scope, groups, memory format: NCHW and channels_last GroupNorm (several channels a
# group), InstanceNorm (one), 1-D and 3-D spatial.
CASES = [
    ((2, 8, 4, 4), "group", 2, None),
    ((2, 8, 3, 5), "group", 4, CL),
    ((3, 6, 7), "group", 3, None),
    ((2, 3, 4, 5), "instance", None, None),
    ((2, 3, 4, 5), "instance", None, CL),
    ((2, 8, 2, 3, 4), "group", 4, CL3),
]
REGIMES = ("fused", "looped", "split")
FWD_LAUNCHES = {"fused": ["_fwd_fused_kernel"], "looped": ["_fwd_looped_kernel"],
                "split": ["_fwd_partial_kernel", "_fwd_apply_kernel"]}


def _bwd_expected(regime, finish: bool):
    if regime == "fused":  # a (C,) parameter beside a per-sample one: its partials added over N
        return ["_bwd_fused_kernel"] + (["_finish_kernel"] if finish else [])
    return ["_bwd_sums_kernel", "_bwd_apply_kernel"]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("regime", REGIMES)
def test_per_sample_weight_and_bias_in_plain_launches(case, regime, monkeypatch):
    names = record_launches(monkeypatch)
    fwd, bwd = _run(*CASES[case], regime, "nc", "nc", names=names, strided=case % 2 == 0)
    assert fwd == FWD_LAUNCHES[regime], fwd
    assert bwd == _bwd_expected(regime, False), bwd


# (weight kind, bias kind, case, regime): a (C,) or (1, C, 1, 1) parameter beside a per-sample one,
# one of them absent.
MIXED = [("c", "nc", 0, "fused"), ("nc", "c", 1, "split"), ("c", "nc", 3, "looped"), ("nc", "1c", 4, "fused"),
         ("1c", "nc", 2, "split"), ("nc", None, 1, "fused"), (None, "nc", 3, "split"), ("nc", None, 5, "looped")]


@pytest.mark.parametrize("wk,bk,case,regime", MIXED)
def test_mixed_and_single_parameters(wk, bk, case, regime, monkeypatch):
    names = record_launches(monkeypatch)
    fwd, bwd = _run(*CASES[case], regime, wk, bk, names=names)
    assert fwd == FWD_LAUNCHES[regime], fwd
    assert bwd == _bwd_expected(regime, "c" in (wk, bk) or "1c" in (wk, bk)), bwd


# Which of x, weight, bias are differentiated (the backward is planned for exactly those).
SUBSETS = [("w", 0, "fused"), ("b", 1, "split"), ("x", 3, "fused"), ("x", 0, "looped"), ("wb", 4, "looped"),
           ("xb", 1, "fused"), ("xw", 2, "split"), ("wb", 3, "split")]


@pytest.mark.parametrize("want,case,regime", SUBSETS)
def test_gradient_subsets(want, case, regime, monkeypatch):
    names = record_launches(monkeypatch)
    _, bwd = _run(*CASES[case], regime, "nc", "nc", act="gelu", want=want, names=names)
    if "w" not in want and "b" not in want:  # dx alone: the plain dx kernels
        assert bwd == (["_bwd_fused_kernel"] if regime == "fused" else ["_bwd_sums_kernel", "_bwd_apply_kernel"])
    else:
        assert bwd == _bwd_expected(regime, False), bwd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case,regime", [(1, "fused"), (0, "split"), (4, "looped")])
def test_low_precision(dtype, case, regime):
    _run(*CASES[case], regime, "nc", "nc", dtype=dtype, act=None, strided=True)


@pytest.mark.parametrize("want", ["xwb", "wb"])
@pytest.mark.parametrize("regime", ["fused", "split"])
def test_no_x_sized_temporaries(want, regime, monkeypatch):
    # The only x-sized tensors made are y and (when asked for) dx: no expansion of a parameter, no
    # per-element gradients, no reduction; the kernels' own host copies (the interpreter's) are
    # not counted.
    kernels_outside_dispatch_modes(monkeypatch)
    monkeypatch.setattr(launch, "POISON", False)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL).requires_grad_("x" in want)
    emb = torch.randn(2, 16, 1, 1)
    w, b = (1 + emb[:, :8]).requires_grad_(), emb[:, 8:].clone().requires_grad_()
    inputs = [t for t in (x, w, b) if t.requires_grad]
    with _force(regime):
        tritonorm.norm(x, "group", num_groups=2, weight=w, bias=b, backend="triton")  # plans built
        with aten_ops_mode() as fwd:
            y = tritonorm.norm(x, "group", num_groups=2, weight=w, bias=b, backend="triton")
        dy = torch.randn_like(y)
        with aten_ops_mode() as bwd:
            torch.autograd.grad(y, inputs, dy)
    big = x.numel()
    assert [op for op, n in fwd.ops if n >= big] == ["empty_strided"], fwd.ops  # y
    assert [op for op, n in bwd.ops if n >= big] == (["empty_strided"] if "x" in want else []), bwd.ops  # dx
    assert not [op for op, _ in fwd.ops + bwd.ops if op in ("copy_", "sum", "expand", "contiguous")]


def test_cost_model_counts_the_launches_run_and_n_c_parameters(monkeypatch):
    names = record_launches(monkeypatch)
    for regime in REGIMES:
        for wk, bk in (("nc", "nc"), ("c", "nc")):
            x = torch.randn(2, 8, 4, 4)
            w, b = _param(wk, x, 0.5, torch.float32), _param(bk, x, 1.0, torch.float32, strided=True)
            with _force(regime):
                kw = dict(num_groups=2, weight=w, bias=b, activation="silu")
                fwd = tritonorm.explain(x, "group", op="forward", **kw)
                bwd = tritonorm.explain(x, "group", op="backward", **kw)
                names.clear()
                y = tritonorm.norm(x.requires_grad_(), "group", backend="triton",
                                   **dict(kw, weight=w.requires_grad_(), bias=b.requires_grad_()))
                assert fwd.cost.launches == len(names), (regime, names)
                names.clear()
                torch.autograd.grad(y, [x, w, b], torch.randn_like(y))
                assert bwd.cost.launches == len(names), (regime, names)
            # Bytes: a plain GroupNorm's, the parameters counted by their own elements.
            plain = dict(kw, weight=torch.ones(8), bias=torch.ones(8))
            with _force(regime):
                pf = tritonorm.explain(x, "group", op="forward", **plain)
            extra = (w.numel() + b.numel() - 16) * 4
            assert fwd.cost.bytes == pf.cost.bytes + extra and fwd.cost.ideal == pf.cost.ideal + extra


def test_sd_ada_group_norm_costs_like_a_plain_group_norm():
    # SD AdaGroupNorm / scale_shift, bf16 on the h200 profile: the launches of a plain GroupNorm and
    # its bytes plus the N*C parameters (the x-sized expansions, per-element gradients and
    # reductions of the general broadcast path are gone).
    for shape in [(2, 320, 64, 64), (2, 1280, 16, 16)]:
        N, C = shape[:2]
        x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        emb = torch.empty(N, 2 * C, 1, 1, dtype=torch.bfloat16, device="meta")
        w, b = emb[:, :C], emb[:, C:]
        pw = torch.empty(C, dtype=torch.bfloat16, device="meta")
        for op in ("forward", "backward"):
            nc = tritonorm.explain(x, "group", num_groups=32, weight=w, bias=b, activation="silu", device="h200",
                                   op=op)
            plain = tritonorm.explain(x, "group", num_groups=32, weight=pw, bias=pw, activation="silu",
                                      device="h200", op=op)
            assert nc.kernel == plain.kernel and nc.cost.launches == plain.cost.launches <= 2
            # Each of the two parameters has N*C elements (2 bytes) instead of C: read by each
            # sweep (at most two), its gradient written once.
            assert 0 < nc.cost.bytes - plain.cost.bytes <= 2 * 3 * (N - 1) * C * 2


def test_other_broadcast_shapes_keep_the_expansion():
    # A (N, 1, 1, 1) or (1, C, H, W) parameter is not per (sample, channel): the general path.
    x = torch.randn(2, 8, 4, 4)
    for w in (torch.rand(2, 1, 1, 1) + 0.5, torch.rand(1, 8, 4, 4) + 0.5):
        y = tritonorm.norm(x, "group", num_groups=2, weight=w, bias=torch.randn(2, 8, 1, 1), backend="triton")
        call = list(core._CALLS.values())[-1]
        assert call.expand and y.shape == x.shape
