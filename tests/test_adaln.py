"""adaLN's per-(sample, column) weight/bias — (N, 1, D), alone or beside a (1, 1, D) / (D,) one —
read in place by the row kernels (PARAM_NC == 2): DiT's LN(x) * (1 + scale) + shift, RMSNorm
likewise, through ``tritonorm.norm(x, "L")`` and the row functionals.

Every case runs under launch.POISON against the float64 reference y = act(norm(x) * w + b) on
fresh inputs; launches are recorded with their constexprs, so a case that should read the
parameters in place is checked not to run the x-sized expansion (PARAM_FULL) or a torch op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tritonorm
import tritonorm.functional as TF
from helpers import LOW, assert_close, aten_ops_mode, kernels_outside_dispatch_modes, record_param_launches
from tritonorm import activations, core, dispatch
from tritonorm.kernels import launch

FWD = ["_fwd_fused_kernel"]
BWD = ["_bwd_fused_kernel", "_finish_samples_kernel"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)
    launch.clear()


def _param(kind, x, scale, dtype, strided=False):
    """"nd" (N, 1, ..., D), "d" (1, ..., 1, D), "D" (D,) or None; ``strided``: the second half of a
    (N, 1, 2D) projection, as torch.chunk gives DiT's scale and shift."""
    if kind is None:
        return None
    N, D, ones = x.shape[0], x.shape[-1], [1] * (x.dim() - 2)
    shape = {"nd": (N, *ones, D), "d": (1, *ones, D), "D": (D,)}[kind]
    bump = 1.0 if scale < 1 else 0.0
    if strided:
        full = torch.randn(*shape[:-1], 2 * D, dtype=torch.float64) * scale + bump
        return full.to(dtype)[..., D:]
    return (torch.randn(shape, dtype=torch.float64) * scale + bump).to(dtype)


def _ref(x, w, b, act, center, eps):
    """The float64 (or eager low-precision) definition: the plain norm over the last axis, then
    the broadcast affine and the activation."""
    if center:
        z = F.layer_norm(x, x.shape[-1:], eps=eps)
    else:
        z = F.rms_norm(x, x.shape[-1:], eps=eps)
    if w is not None:
        z = z * w
    if b is not None:
        z = z + b
    return activations.apply(act, z)


def _run(shape, wk, bk, *, dtype=torch.float32, center=True, act=None, want="xwb", entry="norm", strided=False,
         calls=None, force=None):
    """Forward and the asked-for gradients against float64; returns the recorded launches
    (forward, backward)."""
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    w, b = _param(wk, x, 0.5, dtype), _param(bk, x, 1.0, dtype, strided)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    eps = 1e-5
    leaves = {"x": x, "w": w, "b": b}
    want = [k for k in want if leaves[k] is not None]
    ours = {k: None if t is None else t.detach().requires_grad_(k in want) for k, t in leaves.items()}
    with force if force is not None else dispatch.forced("fused"):
        if calls is not None:
            calls.clear()
        if entry == "norm":
            y = tritonorm.norm(ours["x"], "L" if x.dim() == 3 else "W", weight=ours["w"], bias=ours["b"], eps=eps,
                               center=center, activation=act, backend="triton")
        elif center:
            y = TF.layer_norm(ours["x"], x.shape[-1:], weight=ours["w"], bias=ours["b"], eps=eps, activation=act)
        else:
            assert ours["b"] is None
            y = TF.rms_norm(ours["x"], x.shape[-1:], weight=ours["w"], eps=eps, activation=act)
        fwd = list(calls) if calls is not None else None
        if calls is not None:
            calls.clear()
        got = torch.autograd.grad(y, [ours[k] for k in want], dy)
        bwd = list(calls) if calls is not None else None
    assert y.dtype == dtype and y.shape == x.shape
    r64 = {k: None if t is None else t.detach().double().requires_grad_(k in want) for k, t in leaves.items()}
    y64 = _ref(r64["x"], r64["w"], r64["b"], act, center, eps)
    exp = torch.autograd.grad(y64, [r64[k] for k in want], dy.double())
    ye = ge = None
    if dtype in LOW:
        rl = {k: None if t is None else t.detach().requires_grad_(k in want) for k, t in leaves.items()}
        ye = _ref(rl["x"], rl["w"], rl["b"], act, center, eps)
        ge = torch.autograd.grad(ye, [rl[k] for k in want], dy)
    assert_close(y, y64, dtype, ye, "y", term_scale=4.0)
    for i, (k, a, e) in enumerate(zip(want, got, exp)):
        assert a.shape == leaves[k].shape and a.dtype == leaves[k].dtype, k
        assert_close(a, e, dtype, None if ge is None else ge[i], "d" + k, term_scale=8.0 if k == "x" else 0.0)
    return fwd, bwd


def _in_place(fwd, bwd, wants_wb=True):
    """The launches of the in-place path: no PARAM_FULL anywhere, PARAM_NC == 2 on the row kernels."""
    assert [n for n, _, _ in fwd] == FWD, fwd
    assert all(nc == 2 and not full for n, nc, full in fwd), fwd
    assert [n for n, _, _ in bwd] == (BWD if wants_wb else ["_bwd_fused_kernel"]), bwd
    assert all(not full for _, _, full in bwd) and bwd[0][1] == 2, bwd


# shape, block_p: T a multiple of the row block (8 = 2 x 4), not (7 with 4; 37 with 2, where the
# interpreter profile gives each sample J = 2 programs walking blocks j, j + 2, ...), T = 1.
SHAPES = [((2, 8, 24), 4), ((3, 7, 16), 4), ((2, 37, 20), 2), ((4, 1, 16), 2)]


@pytest.mark.parametrize("center", [True, False], ids=["ln", "rms"])
@pytest.mark.parametrize("si", range(len(SHAPES)))
def test_per_sample_weight_and_bias(si, center, monkeypatch, planes_profile):
    # planes_profile: the device's own profile with 4 SMs, so the programs a sample (sized from
    # the SM count) are the ones counted below on a GPU too (132 SMs gave J = 3 at T = 37).
    calls = record_param_launches(monkeypatch)
    shape, bp = SHAPES[si]
    fwd, bwd = _run(shape, "nd", "nd", center=center, act="silu", strided=si % 2 == 0, calls=calls,
                    force=dispatch.forced("fused", block_p=bp))
    _in_place(fwd, bwd)
    plan = list(core._CALLS.values())[-1].plan
    assert plan.nc[:2] == ("nd", "nd") and plan.row_bplan is not None
    with dispatch.forced("fused", block_p=bp):  # the backward plan just run (cached)
        bplan = plan.backward((True, True, True, False))
    # Programs a sample: J = 2 where T = 37 (a sample's 19 blocks walked j, j + 2, ...), else 1.
    assert bplan.rows_nc and bplan.progs == shape[0] * (2 if si == 2 else 1)


# (weight kind, bias kind): one per sample beside a per-column one, alone, the other absent.
MIXED = [("nd", "d"), ("d", "nd"), ("nd", None), (None, "nd"), ("nd", "D"), ("D", "nd")]


@pytest.mark.parametrize("wk,bk", MIXED)
def test_mixed_and_single_parameters(wk, bk, monkeypatch):
    calls = record_param_launches(monkeypatch)
    entry = "functional" if "D" in (wk, bk) else "norm"  # a (D,) one: the functional's normalized shape
    fwd, bwd = _run((3, 7, 16), wk, bk, act="gelu", entry=entry, calls=calls,
                    force=dispatch.forced("fused", block_p=4))
    _in_place(fwd, bwd)


def test_per_row_parameters_alone_are_plain_ones(monkeypatch):
    # (1, 1, D) weight and bias through the functional: the normalized shape's, a plain LayerNorm.
    calls = record_param_launches(monkeypatch)
    fwd, bwd = _run((2, 7, 16), "d", "d", entry="functional", calls=calls)
    assert fwd == [("_fwd_fused_kernel", False, False)], fwd
    # (a plain row backward: the dx kernel, and a finish only when several programs share the rows)
    assert bwd[0] == ("_bwd_fused_kernel", False, False) and all(not f and not n for _, f, n in bwd), bwd


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("center", [True, False], ids=["ln", "rms"])
def test_low_precision(dtype, center, monkeypatch):
    calls = record_param_launches(monkeypatch)
    fwd, bwd = _run((2, 9, 32), "nd", "nd" if center else None, dtype=dtype, center=center, entry="functional",
                    strided=True, calls=calls, force=dispatch.forced("fused", block_p=4))
    _in_place(fwd, bwd)


@pytest.mark.parametrize("want", ["w", "b", "x", "wb", "xb"])
def test_gradient_subsets(want, monkeypatch):
    calls = record_param_launches(monkeypatch)
    fwd, bwd = _run((2, 6, 16), "nd", "nd", act="silu", want=want, calls=calls)
    _in_place(fwd, bwd, wants_wb="w" in want or "b" in want)


def test_four_d_scope_over_the_last_axis(monkeypatch):
    # x (N, C, H, W) normalized over W with a (N, 1, 1, W) weight: T = C * H rows a sample.
    calls = record_param_launches(monkeypatch)
    fwd, bwd = _run((2, 3, 5, 16), "nd", "d", calls=calls, force=dispatch.forced("fused", block_p=4))
    _in_place(fwd, bwd)


@pytest.mark.parametrize("regime", ["looped", "split"])
def test_two_pass_forward_reads_them_in_place(regime, monkeypatch):
    # A looped/split forward with the (heuristic's) fused backward: both in place.
    calls = record_param_launches(monkeypatch)
    fwd, bwd = _run((2, 6, 40), "nd", "nd", act="silu", calls=calls,
                    force=dispatch.forced(regime, op="forward", block_p=2, block_m=16, split=2))
    assert len(fwd) == (2 if regime == "split" else 1) and not any(full for _, _, full in fwd), fwd
    assert fwd[-1][1] == 2, fwd  # the kernel that applies the affine (split: the apply kernel)
    assert [n for n, _, _ in bwd] == BWD and not any(full for _, _, full in bwd), bwd


TWO_PASS_BWD = ["_bwd_col_sums_kernel", "_bwd_apply_kernel"]


@pytest.mark.parametrize("regime", ["looped", "split"])
@pytest.mark.parametrize("shape,wk,bk,center", [
    ((2, 6, 40), "nd", "d", True),     # T a multiple of the row block (2)
    ((3, 7, 48), "nd", "nd", True),    # not: a sample's last block is masked at its end
    ((2, 7, 40), "d", "nd", True),     # the per-column one summed over every sample's partials
    ((4, 1, 40), "nd", None, False),   # T = 1, RMSNorm
    ((2, 9, 40), "nd", None, False),
])
def test_two_pass_backward_reads_them_in_place(regime, shape, wk, bk, center, monkeypatch):
    # The looped/split backward's first stage (_bwd_col_sums_kernel) walks one sample's row blocks
    # per program on an (R, column tiles, N) grid: per-sample column sums, added per sample by the
    # apply kernel's programs. Forward and backward read the parameters in place; no expansion.
    calls = record_param_launches(monkeypatch)
    fwd, bwd = _run(shape, wk, bk, act="silu", center=center, calls=calls,
                    force=dispatch.forced(regime, block_p=2, block_m=16, split=2))
    assert not any(full for _, _, full in fwd + bwd) and fwd[-1][1] == 2, (fwd, bwd)
    assert [n for n, _, _ in bwd] == TWO_PASS_BWD and bwd[0][1] == 2 and bwd[1][1] == 2, bwd
    assert not list(core._CALLS.values())[-1].expand


@pytest.mark.parametrize("want", ["x", "w", "xb"])
def test_two_pass_backward_gradient_subsets(want, monkeypatch):
    calls = record_param_launches(monkeypatch)
    fwd, bwd = _run((2, 7, 40), "nd", "nd", want=want, calls=calls,
                    force=dispatch.forced("split", block_p=2, block_m=16, split=2))
    names = [n for n, _, _ in bwd]
    # dx alone: the plain two-stage backward (its sums kernel reads them per sample too).
    assert names == (["_bwd_sums_kernel", "_bwd_apply_kernel"] if want == "x" else TWO_PASS_BWD), bwd
    assert all(nc == 2 and not full for n, nc, full in bwd), bwd


def test_two_pass_backward_low_precision(monkeypatch):
    calls = record_param_launches(monkeypatch)
    _run((2, 9, 40), "nd", "nd", dtype=torch.bfloat16, strided=True, calls=calls,
         force=dispatch.forced("looped", block_p=2, block_m=16))
    assert [n for n, _, _ in calls] == TWO_PASS_BWD, calls


def test_two_pass_cost_model_counts_the_launches_run(monkeypatch):
    calls = record_param_launches(monkeypatch)
    x = torch.randn(2, 9, 40)
    w, b = _param("nd", x, 0.5, torch.float32), _param("d", x, 1.0, torch.float32)
    with dispatch.forced("split", block_p=2, block_m=16, split=2):
        bwd = tritonorm.explain(x, "L", op="backward", weight=w, bias=b)
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = tritonorm.norm(xs, "L", weight=ws, bias=bs, backend="triton")
        calls.clear()
        torch.autograd.grad(y, [xs, ws, bs], torch.randn_like(y))
    assert bwd.cost.launches == len(calls) == 2, calls


def test_rows_out_of_sample_order_keep_the_expansion(monkeypatch):
    # x (N, T, D) as the transpose of a (T, N, D) tensor: the statistic rows are not (sample,
    # position) in order, so the kernels read an expansion; still right.
    calls = record_param_launches(monkeypatch)
    x = torch.randn(9, 2, 16).transpose(0, 1)
    w, b = torch.rand(2, 1, 16) + 0.5, torch.randn(2, 1, 16)
    with dispatch.forced("fused"):
        y = tritonorm.norm(x, "L", weight=w, bias=b, backend="triton")
    assert list(core._CALLS.values())[-1].expand and all(full for _, _, full in calls)
    assert_close(y, _ref(x.double(), w.double(), b.double(), None, True, 1e-5), torch.float32)


@pytest.mark.parametrize("want", ["xwb", "wb"])
def test_no_x_sized_temporaries(want, monkeypatch):
    # DiT's modulation through the functional: the only x-sized tensors made are y and (when
    # asked for) dx — no expansion of a parameter, no per-element gradients, no reduction.
    kernels_outside_dispatch_modes(monkeypatch)
    monkeypatch.setattr(launch, "POISON", False)
    x = torch.randn(2, 12, 16).requires_grad_("x" in want)
    emb = torch.randn(2, 1, 32)
    scale, shift = emb[..., :16].clone().requires_grad_(), emb[..., 16:].clone().requires_grad_()
    inputs = [t for t in (x, scale, shift) if t.requires_grad]
    with dispatch.forced("fused"):
        TF.layer_norm(x, (16,), weight=1 + scale, bias=shift)  # plans built
        with aten_ops_mode() as fwd:
            y = TF.layer_norm(x, (16,), weight=1 + scale, bias=shift)
        dy = torch.randn_like(y)
        with aten_ops_mode() as bwd:
            torch.autograd.grad(y, inputs, dy)
    big = x.numel()
    views = ("view", "_unsafe_view", "reshape", "alias", "detach")  # no memory of their own
    made = [[op for op, n in ops.ops if n >= big and op not in views] for ops in (fwd, bwd)]
    assert made[0] == ["empty_strided"], fwd.ops  # y
    assert made[1] == (["empty_strided"] if "x" in want else []), bwd.ops  # dx
    assert not [op for op, _ in fwd.ops + bwd.ops if op in ("copy_", "expand", "contiguous")]


def test_diffusers_modules_read_the_modulation_in_place(monkeypatch):
    dn = pytest.importorskip("diffusers.models.normalization")
    from tritonorm.nn import adaptive

    calls = record_param_launches(monkeypatch)
    for make in (lambda: dn.AdaLayerNormZero(16), lambda: dn.AdaLayerNormContinuous(16, 8),
                 lambda: dn.AdaLayerNormContinuous(16, 8, norm_type="rms_norm"),
                 lambda: dn.AdaLayerNorm(16, output_dim=32, chunk_dim=1)):
        m = make()
        m.__class__ = adaptive.subclass_for(type(m))
        args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in adaptive._probe_args(m)]
        with dispatch.forced("fused"):
            calls.clear()
            out = m(*args)
            out = out[0] if isinstance(out, tuple) else out
            assert [n for n, nc, full in calls] == FWD and calls[0][1] == 2 and not calls[0][2], (type(m), calls)
            calls.clear()
            torch.autograd.grad(out, [args[0], *m.linear.parameters()], torch.randn_like(out))
            assert [n for n, _, _ in calls] == BWD and calls[0][1] == 2 and not any(f for _, _, f in calls), calls


def test_cost_model_counts_the_launches_run(monkeypatch):
    calls = record_param_launches(monkeypatch)
    x = torch.randn(2, 9, 24)
    for wk, bk in (("nd", "nd"), ("nd", "d"), ("d", "nd")):
        w, b = _param(wk, x, 0.5, torch.float32), _param(bk, x, 1.0, torch.float32, strided=True)
        with dispatch.forced("fused"):
            fwd = tritonorm.explain(x, "L", op="forward", weight=w, bias=b, activation="silu")
            bwd = tritonorm.explain(x, "L", op="backward", weight=w, bias=b, activation="silu")
            calls.clear()
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            y = tritonorm.norm(xs, "L", weight=ws, bias=bs, activation="silu", backend="triton")
            assert fwd.cost.launches == len(calls) == 1, calls
            calls.clear()
            torch.autograd.grad(y, [xs, ws, bs], torch.randn_like(y))
            assert bwd.cost.launches == len(calls) == 2, calls
            # Bytes forward: a plain row norm's with the parameters' own elements.
            plain = tritonorm.explain(x, "L", op="forward", weight=None, bias=None, activation="silu")
        extra = (w.numel() + b.numel()) * 4
        assert fwd.cost.bytes == plain.cost.bytes + extra and fwd.cost.ideal == plain.cost.ideal + extra


def test_dit_cost_is_a_plain_layer_norm_plus_the_parameters():
    # DiT-XL adaLN, 8 x 1024 tokens x 1152, bf16, h200 profile (model figures): forward one launch
    # and x + y + the N x D parameters; backward two launches, no x-sized expansion.
    x = torch.empty(8, 1024, 1152, dtype=torch.bfloat16, device="meta")
    emb = torch.empty(8, 1, 2 * 1152, dtype=torch.bfloat16, device="meta")
    w, b = emb[..., :1152], emb[..., 1152:]
    n = x.numel() * 2
    fwd = tritonorm.explain(x, "L", weight=w, bias=b, device="h200", op="forward")
    bwd = tritonorm.explain(x, "L", weight=w, bias=b, device="h200", op="backward")
    assert fwd.cost.launches == 1 and bwd.cost.launches == 2
    assert fwd.cost.bytes < 2 * n + n // 20 and bwd.cost.bytes < 3 * n + n // 5


@pytest.mark.parametrize("entry", ["norm", "functional"])
@pytest.mark.parametrize("ws,words", [((2, 2, 16), ["weight"]), ((3, 1, 16), ["weight"]), ((2, 1, 8), ["weight"])])
def test_bad_shapes_name_the_argument(entry, ws, words):
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError) as info:
        if entry == "norm":
            tritonorm.norm(x, "L", weight=torch.ones(ws), backend="triton")
        else:
            TF.layer_norm(x, (16,), weight=torch.ones(ws))
    assert all(w in str(info.value) for w in words), str(info.value)
