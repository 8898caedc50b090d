"""torch.compile(fullgraph=True) with broadcast (adaptive) weight/bias: (N, C, 1, 1), adaLN's
(N, 1, D), (1, C, H, W), a (C,) one beside a per-sample one. The compiled graph must call
tritonorm's registered ops (counted in the graphs and at run time), those must launch the same
kernels as the eager call (in place or expanded), and y and every gradient must match the float64
reference y = act(norm(x) * w + b + residual), on fresh inputs with poisoned outputs."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import tritonorm
import tritonorm.functional as TF
from helpers import LOW, assert_close, record_param_launches
from tritonorm import activations, broadcast_ops, dispatch
from tritonorm.kernels import fastlaunch, launch

CL = torch.channels_last


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)
    launch.clear()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _recording_backend(targets: list):
    """aot_eager that also lists the ops of the forward and backward graphs it compiles."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, _inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def _count_op_bodies(monkeypatch) -> dict:
    """Counts of the registered ops' bodies run with broadcast parameters."""
    counts = {"forward": 0, "backward": 0}
    for name in counts:
        real = getattr(broadcast_ops, name)

        def wrapped(*args, _real=real, _name=name):
            counts[_name] += 1
            return _real(*args)
        monkeypatch.setattr(broadcast_ops, name, wrapped)
    return counts


def _compiled_vs_reference(fn, ref, inputs, dtype, monkeypatch, force=None, via_op=True):
    """Run ``fn`` compiled (fullgraph) on leaves of ``inputs``, then its gradients for a random
    dy; compare with ``ref`` in float64 (and at ``dtype`` for the low-precision rule); check the
    ops ran and launched what eager ``fn`` launches. ``inputs``: (name, tensor, differentiable)."""
    launches = record_param_launches(monkeypatch)
    counts = _count_op_bodies(monkeypatch)
    targets: list = []
    leaves = [t.detach().clone().requires_grad_(d) for _, t, d in inputs]
    diff = [i for i, (_, _, d) in enumerate(inputs) if d]
    compiled = torch.compile(fn, fullgraph=True, backend=_recording_backend(targets))
    # (every launch through JITFunction.run, where it is recorded: eager reuses the plans the
    # op made, whose launchers would otherwise launch directly on a GPU)
    with dispatch.forced(force) if force else contextlib.nullcontext(), fastlaunch.enabled(False):
        y = compiled(*leaves)
        dy = torch.randn(y.shape, dtype=torch.float64).to(y.dtype)
        got = torch.autograd.grad(y, [leaves[i] for i in diff], dy)
        seen = list(launches)
        launches.clear()
        eager = [t.detach().clone().requires_grad_(d) for _, t, d in inputs]
        torch.autograd.grad(fn(*eager), [eager[i] for i in diff], dy)
    if via_op:
        assert "tritonorm.norm_fwd.default" in targets and "tritonorm.norm_bwd.default" in targets, targets
        assert counts == {"forward": 1, "backward": 1}, counts
        assert seen == launches, f"compiled launched {seen}, eager {launches}"
    else:
        assert not any(t.startswith("tritonorm.") for t in targets), targets
    assert y.dtype == dtype and y.shape == inputs[0][1].shape
    r64 = [t.detach().double().requires_grad_(d) for _, t, d in inputs]
    y64 = ref(*r64)
    g64 = torch.autograd.grad(y64, [r64[i] for i in diff], dy.double())
    ye = ge = None
    if dtype in LOW:
        rl = [t.detach().clone().requires_grad_(d) for _, t, d in inputs]
        ye = ref(*rl)
        ge = torch.autograd.grad(ye, [rl[i] for i in diff], dy)
    assert_close(y, y64, dtype, ye, "y", term_scale=4.0)
    for k, i in enumerate(diff):
        name, t, _ = inputs[i]
        assert got[k].shape == t.shape and got[k].dtype == t.dtype, name
        assert_close(got[k], g64[k], dtype, None if ge is None else ge[k], "d" + name,
                     term_scale=8.0 if name == "x" else 0.0)
    return seen


def _chan(t, x):
    return None if t is None else (t.view(1, -1, *([1] * (x.dim() - 2))) if tuple(t.shape) == (x.shape[1],) else t)


def _compose(z, x, w, b, r, act):
    """The definition: act(z * w + b + r) in z's dtype, z the plain norm."""
    w, b = _chan(w, x), _chan(b, x)
    z = z * w.to(z.dtype) if w is not None else z
    z = z + b.to(z.dtype) if b is not None else z
    z = z + r.to(z.dtype) if r is not None else z
    return activations.apply(act, z)


def _inputs(shape, ws, bs, residual, dtype, fmt):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    x = x.contiguous(memory_format=fmt) if fmt is not None else x
    out = [("x", x, True), ("weight", (torch.rand(ws, dtype=torch.float64) + 0.5).to(dtype), True),
           ("bias", torch.randn(bs, dtype=torch.float64).to(dtype), True)]
    if residual:
        out.append(("residual", torch.randn(shape, dtype=torch.float64).to(dtype), True))
    return out


# id: scope, groups, shape, weight, bias, residual, activation, memory format, dtype, and whether the
# parameters are expanded to x's shape (PARAM_FULL launches) or read in place (none)
CASES = {
    "nc-nchw-fp32": ("group", 4, (2, 8, 4, 4), (2, 8, 1, 1), (2, 8, 1, 1), True, "silu", None, torch.float32, False),
    "nc-cl-bf16": ("group", 4, (2, 8, 4, 4), (2, 8, 1, 1), (2, 8, 1, 1), False, "silu", CL, torch.bfloat16, False),
    "chw-cl-fp32": ("group", 2, (2, 8, 3, 3), (1, 8, 3, 3), (1, 8, 3, 3), True, "gelu", CL, torch.float32, True),
    "c+nc-nchw-bf16": ("instance", None, (2, 6, 4, 4), (6,), (2, 6, 1, 1), False, "relu", None, torch.bfloat16, False),
    "n1d-fp32": ("L", None, (2, 6, 16), (2, 1, 16), (2, 1, 16), True, None, None, torch.float32, False),
}


def _norm_case(cid):
    scope, groups, shape, ws, bs, res, act, fmt, dtype, expanded = CASES[cid]

    def fn(x, w, b, r=None):
        return tritonorm.norm(x, scope, num_groups=groups, weight=w, bias=b, residual=r, activation=act)

    def ref(x, w, b, r=None):
        z = tritonorm.norm(x, scope, num_groups=groups, backend="reference")
        return _compose(z, x, w, b, r, act)
    return fn, ref, _inputs(shape, ws, bs, res, dtype, fmt), dtype, expanded


@pytest.mark.parametrize("cid", list(CASES))
def test_norm_compiled_runs_the_eager_kernels(cid, monkeypatch):
    fn, ref, inputs, dtype, expanded = _norm_case(cid)
    seen = _compiled_vs_reference(fn, ref, inputs, dtype, monkeypatch)
    assert seen and any(full for _, _, full in seen) == expanded, seen


def test_split_regime_expands_as_eager(monkeypatch):
    fn, ref, inputs, dtype, _ = _norm_case("chw-cl-fp32")
    seen = _compiled_vs_reference(fn, ref, inputs, dtype, monkeypatch, force="split")
    assert any(full for _, _, full in seen), seen


@pytest.mark.parametrize("cid", ["nc-nchw-fp32", "chw-cl-fp32", "c+nc-nchw-bf16"])
def test_torch_regime_composes_inside_the_op(cid, monkeypatch):
    # The plan does not take broadcast parameters (fusable_full False): the plain norm's torch
    # regime, then the affine, residual and activation, forward and backward, in the op's body.
    fn, ref, inputs, dtype, _ = _norm_case(cid)
    assert _compiled_vs_reference(fn, ref, inputs, dtype, monkeypatch, force="torch") == []


def test_reference_backend_composes_in_the_graph(monkeypatch):
    scope, groups, shape, ws, bs, res, act, fmt, dtype, _ = CASES["chw-cl-fp32"]

    def fn(x, w, b, r):
        return tritonorm.norm(x, scope, num_groups=groups, weight=w, bias=b, residual=r, activation=act,
                              backend="reference")
    _compiled_vs_reference(fn, fn, _inputs(shape, ws, bs, res, dtype, fmt), dtype, monkeypatch, via_op=False)


@pytest.mark.parametrize("force", [None, "torch"])
def test_conditional_batch_norm_eval(force, monkeypatch):
    # Running statistics (eval) with a per-sample weight: BatchNorm's kernels read it in place
    # (the torch regime: the composite).
    rm, rv = torch.randn(6) * 0.1, torch.rand(6) + 0.5

    def fn(x, w, b):
        return tritonorm.norm(x, "batch", weight=w, bias=b, running_mean=rm, running_var=rv, training=False)

    def ref(x, w, b):
        z = tritonorm.norm(x, "batch", running_mean=rm.to(x.dtype), running_var=rv.to(x.dtype), training=False,
                           backend="reference")
        return _compose(z, x, w, b, None, None)
    seen = _compiled_vs_reference(fn, ref, _inputs((3, 6, 2, 3), (3, 6, 1, 1), (6,), False, torch.float32, None),
                                  torch.float32, monkeypatch, force=force)
    assert seen[0][1] == 3 if force is None else seen == [], seen


def test_conditional_batch_norm_training_blends_running_statistics(monkeypatch):
    # Training: the op normalizes with the batch statistics, the running ones are blended outside
    # it with torch ops (as for (C,) parameters under compile), as PyTorch's rule gives in float64.
    rm, rv = torch.randn(6) * 0.1, torch.rand(6) + 0.5
    rm64, rv64 = rm.double(), rv.double()

    def fn(x, w, b):
        return tritonorm.norm(x, "batch", weight=w, bias=b, running_mean=rm, running_var=rv, momentum=0.3)

    def ref(x, w, b):
        z = tritonorm.norm(x, "batch", backend="reference")
        return _compose(z, x, w, b, None, None)
    inputs = _inputs((3, 6, 2, 3), (3, 6, 1, 1), (3, 6, 1, 1), False, torch.float32, CL)
    _compiled_vs_reference(fn, ref, inputs, torch.float32, monkeypatch)
    # The compiled call and its eager twin each blended the same batch once: the reference twice.
    for _ in range(2):
        tritonorm.norm(inputs[0][1].double(), "batch", running_mean=rm64, running_var=rv64, momentum=0.3,
                       backend="reference")
    assert_close(rm, rm64, torch.float32, what="running_mean")
    assert_close(rv, rv64, torch.float32, what="running_var")


@pytest.mark.parametrize("center,dtype", [(True, torch.bfloat16), (False, torch.float32)], ids=["ln-bf16", "rms-fp32"])
def test_row_functionals_with_per_sample_parameters(center, dtype, monkeypatch):
    # adaLN through layer_norm / rms_norm: (N, 1, D) weight and bias of a (N, T, D) input.
    def fn(x, w, b):
        if center:
            return TF.layer_norm(x, (16,), weight=w, bias=b)
        return TF.rms_norm(x, (16,), weight=w, eps=1e-6) + b

    def ref(x, w, b):
        if center:
            return F.layer_norm(x, (16,), eps=1e-5) * w + b
        return F.rms_norm(x, (16,), eps=1e-6) * w + b
    seen = _compiled_vs_reference(fn, ref, _inputs((2, 5, 16), (2, 1, 16), (2, 1, 16), False, dtype, None), dtype,
                                  monkeypatch)
    assert seen[0][1] == 2, seen


def test_add_norm_with_per_sample_parameters():
    # add_norm under compile composes h with torch ops, then norm: its broadcast weight/bias go
    # through the registered op.
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    w, b = torch.rand(2, 1, 16) + 0.5, torch.randn(2, 1, 16)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]

    def fn(x, r, w, b):
        y, h = tritonorm.add_norm(x, r, "L", weight=w, bias=b, activation="silu")
        return y * 2 + h
    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    r64 = [t.double().requires_grad_() for t in (x, r, w, b)]
    h64 = r64[0] + r64[1]
    y64 = F.silu(F.layer_norm(h64, (16,)) * r64[2] + r64[3]) * 2 + h64
    assert_close(y, y64, torch.float32, what="y", term_scale=4.0)
    for name, a, e in zip(("dx", "dresidual", "dweight", "dbias"), got, torch.autograd.grad(y64, r64, dy.double())):
        assert a.shape == e.shape, name
        assert_close(a, e, torch.float32, what=name, term_scale=8.0)


def test_weight_not_broadcastable_names_weight():
    x, w = torch.randn(2, 8, 3, 3), torch.ones(2, 8, 3, 2)

    def fn(x, w):
        return tritonorm.norm(x, "group", num_groups=2, weight=w)
    with pytest.raises(ValueError, match="weight must have shape .* broadcastable"):
        torch.compile(fn, backend="aot_eager")(x, w)  # a graph break runs eager, which raises
    torch._dynamo.reset()
    # fullgraph: Dynamo reports the exception raised in the traced code (its message names weight).
    with pytest.raises(Exception, match="weight must have shape .* broadcastable"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w)


ADAPTIVE = ["AdaGroupNorm", "AdaLayerNorm", "AdaLayerNormZero", "AdaLayerNormContinuous"]


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_modules_compile_fullgraph(name):
    dn = pytest.importorskip("diffusers.models.normalization")
    from tritonorm.nn import adaptive

    make = {"AdaGroupNorm": lambda: dn.AdaGroupNorm(8, 6, 2, act_fn="silu"),
            "AdaLayerNorm": lambda: dn.AdaLayerNorm(8, output_dim=12, chunk_dim=1),
            "AdaLayerNormZero": lambda: dn.AdaLayerNormZero(8),
            "AdaLayerNormContinuous": lambda: dn.AdaLayerNormContinuous(8, 5, norm_type="rms_norm")}[name]
    orig = make()
    with torch.no_grad():
        for p in orig.parameters():
            p.normal_(0.0, 0.3)
    ours = make()
    ours.load_state_dict(orig.state_dict())
    ours.__class__ = adaptive.subclass_for(type(orig))
    ref = orig.double()
    args = adaptive._probe_args(ours)
    ins = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ins64 = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
             for a in args]
    targets: list = []
    out = torch.compile(ours, fullgraph=True, backend=_recording_backend(targets))(*ins)
    out64 = ref(*ins64)
    out, out64 = (out if isinstance(out, tuple) else (out,)), (out64 if isinstance(out64, tuple) else (out64,))
    assert "tritonorm.norm_fwd.default" in targets, targets
    for a, e in zip(out, out64):
        assert_close(a, e, torch.float32, what="output", term_scale=4.0)
    dys = [torch.randn_like(o) for o in out]
    leaves = [a for a in ins if isinstance(a, torch.Tensor) and a.requires_grad] + list(ours.parameters())
    leaves64 = [a for a in ins64 if isinstance(a, torch.Tensor) and a.requires_grad] + list(ref.parameters())
    g = torch.autograd.grad(out, leaves, dys, allow_unused=True)
    g64 = torch.autograd.grad(out64, leaves64, [d.double() for d in dys], allow_unused=True)
    assert "tritonorm.norm_bwd.default" in targets, targets
    for a, e in zip(g, g64):
        assert (a is None) == (e is None)
        if a is not None:
            assert_close(a, e, torch.float32, what="grad", term_scale=4.0)


def test_inductor(monkeypatch):
    # One inductor run (C++ compile on CPU: slow): the op's fake strides and the real ones agree.
    counts = _count_op_bodies(monkeypatch)
    fn, ref, inputs, dtype, _ = _norm_case("chw-cl-fp32")
    leaves = [t.detach().clone().requires_grad_() for _, t, _ in inputs]
    y = torch.compile(lambda *a: fn(*a) * 2, fullgraph=True, backend="inductor")(*leaves)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    r64 = [t.detach().double().requires_grad_() for _, t, _ in inputs]
    y64 = ref(*r64) * 2
    assert counts == {"forward": 1, "backward": 1}, counts
    assert_close(y, y64, dtype, what="y", term_scale=8.0)
    for (name, t, _), a, e in zip(inputs, got, torch.autograd.grad(y64, r64, dy.double())):
        assert a.shape == t.shape, name
        assert_close(a, e, dtype, what="d" + name, term_scale=16.0 if name == "x" else 0.0)
