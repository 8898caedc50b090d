"""torch's own sample inputs (OpInfo / ModuleInfo from torch.testing._internal) for the five
normalization functionals and the norm modules, run through tritonorm.

Every sample either matches torch (output, layout, input gradients, running statistics; torch
run in float64 as the oracle, tritonorm in fp32 on the Triton path and in float64 on the
reference path) or is one of the deliberate rejections listed in docs/modules.md ("Inputs
tritonorm rejects on purpose"), raised as the documented error before anything changes.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

pytest.importorskip("expecttest")  # torch.testing._internal imports it

import tritonorm.functional as TF  # noqa: E402
import tritonorm.nn as tnn  # noqa: E402
from helpers import FP32_RTOL, max_err, scale  # noqa: E402
from tritonorm.kernels import launch  # noqa: E402

FUNCTIONALS = {
    "nn.functional.batch_norm": TF.batch_norm,
    "nn.functional.layer_norm": TF.layer_norm,
    "nn.functional.group_norm": TF.group_norm,
    "nn.functional.instance_norm": TF.instance_norm,
    "nn.functional.rms_norm": TF.rms_norm,
}
MODULES = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "LayerNorm", "RMSNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


@pytest.fixture(scope="module")
def op_db():
    from torch.testing._internal.common_methods_invocations import op_db
    return {op.name: op for op in op_db if op.name in FUNCTIONALS and not op.variant_test_name}


@pytest.fixture(scope="module")
def module_db():
    from torch.testing._internal.common_modules import module_db
    return {m.module_cls.__name__: m for m in module_db if m.module_cls.__name__ in MODULES}


# --- deliberate rejections (docs/modules.md) -----------------------------------------------

def _rejection(name: str, x, args: tuple, kwargs: dict):
    """The documented error tritonorm raises for this functional call, or None if it runs.

    ``args`` follow the functional's signature after ``input``."""
    a = _named_args(name, args, kwargs)
    eps = a.get("eps")
    if eps is not None and eps <= 0:
        return ValueError, "eps must be > 0"
    if name == "nn.functional.batch_norm" and x.dim() < 2:
        return ValueError, r"x must have shape \(N, C, \*spatial\)"
    updates = (a.get("training", False) if name == "nn.functional.batch_norm"
               else a.get("use_input_stats", True)) and a.get("running_mean") is not None
    momentum = a.get("momentum", 0.1)
    if updates and not 0 <= momentum <= 1:
        return ValueError, "momentum must be"
    return None


def _named_args(name: str, args: tuple, kwargs: dict) -> dict:
    params = {"nn.functional.batch_norm": ("running_mean", "running_var", "weight", "bias",
                                           "training", "momentum", "eps"),
              "nn.functional.instance_norm": ("running_mean", "running_var", "weight", "bias",
                                              "use_input_stats", "momentum", "eps"),
              "nn.functional.group_norm": ("num_groups", "weight", "bias", "eps"),
              "nn.functional.layer_norm": ("normalized_shape", "weight", "bias", "eps"),
              "nn.functional.rms_norm": ("normalized_shape", "weight", "eps")}[name]
    return dict(zip(params, args)) | kwargs


# --- comparison ------------------------------------------------------------------------------

def _copy(a, dtype=None):
    if isinstance(a, torch.Tensor):
        t = a.detach().to(dtype if dtype is not None and a.is_floating_point() else a.dtype).clone()
        return t.requires_grad_(a.requires_grad)
    if isinstance(a, (list, tuple)):
        return type(a)(_copy(b, dtype) for b in a)
    if isinstance(a, dict):
        return {k: _copy(v, dtype) for k, v in a.items()}
    return a


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for a in args if isinstance(args, (list, tuple)) else args.values():
        if isinstance(a, torch.Tensor):
            out.append(a)
    return out


def _same_layout(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Strides agree on every axis of size > 1 (an empty tensor has no layout to keep)."""
    if ours.numel() == 0:
        return
    s1 = [s for s, n in zip(ours.stride(), ours.shape) if n > 1]
    s2 = [s for s, n in zip(theirs.stride(), theirs.shape) if n > 1]
    assert s1 == s2, f"strides {ours.stride()} != torch's {theirs.stride()} for shape {tuple(ours.shape)}"


def _close(ours: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, what: str,
           terms: float = 0.0) -> None:
    """Parity rule: within the fp32 rule of helpers.py at the scale of the result or of the
    ``terms`` it is a difference of (dx of two-value statistics cancels far below its terms), or
    no more than twice the error of torch itself at the same precision plus one rounding unit."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == eager.dtype, f"{what}: dtype {ours.dtype} != torch's {eager.dtype}"
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref64)), f"{what}: non-finite values differ"
    fin = torch.isfinite(ref64)
    err, s = max_err(ours[fin], ref64[fin]), max(scale(ref64[fin]), terms)
    tol = max(FP32_RTOL * s, 2 * max_err(eager[fin], ref64[fin]) + torch.finfo(ours.dtype).eps * s)
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e} (scale {s:.3e}, {ours.dtype})"


def _dx_terms(kind: str, x: torch.Tensor, dy: torch.Tensor, weight, eps: float, *, groups=1,
              last_dims=1, running_var=None, center=True) -> tuple[float, float]:
    """(dx's, dweight's) term scales: max |dy| * max |weight| * max rstd is the size of the terms
    dx = rstd * w * (dy - ...) is made of (tests/cases.py uses the same bound)."""
    x = x.detach().double()
    if running_var is not None:
        var = running_var.detach().double()
    else:
        if kind == "batch":
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        elif kind == "instance":
            flat = x.reshape(x.shape[0] * x.shape[1], -1)
        elif kind == "group":
            flat = x.reshape(x.shape[0] * groups, -1)
        else:  # layer / rms over the trailing last_dims axes
            flat = x.reshape(-1, max(1, math.prod(x.shape[x.dim() - last_dims:])))
        var = flat.var(1, unbiased=False) if center else flat.square().mean(1)
    if var.numel() == 0:
        return 0.0, 0.0
    w = 1.0 if weight is None else weight.detach().double().abs().max().item()
    rstd_dy = (var + eps).rsqrt().max().item() * dy.abs().max().item() * 1.2
    # dx's terms; dweight = sum(dy * xhat) cancels down to terms of rounding x - mean.
    return rstd_dy * w, rstd_dy * x.abs().max().item()


def _grads(y, args, dy):
    ins = [t for t in args if t.requires_grad]
    if not ins or not y.numel():
        return []
    return list(torch.autograd.grad(y, ins, dy.to(y.dtype), allow_unused=True))


def _check(run_ours, run_torch, args: tuple, kwargs: dict, dtype: torch.dtype, terms) -> None:
    """Run torch in float64 and in ``dtype`` and ours in ``dtype`` on copies; compare output,
    layout, gradients of every input that requires grad, and every tensor argument afterwards
    (running statistics). ``terms(dy)``: the term scale of the input's gradient."""
    a64, k64 = _copy(args, torch.float64), _copy(kwargs, torch.float64)
    ae, ke = _copy(args, dtype), _copy(kwargs, dtype)
    a, k = _copy(args, dtype), _copy(kwargs, dtype)
    y64, ye = run_torch(*a64, **k64), run_torch(*ae, **ke)
    y = run_ours(*a, **k)
    _close(y, y64, ye, "output")
    _same_layout(y, ye)
    dy = torch.randn(y.shape, dtype=torch.float64)
    x_grad = a[0].requires_grad
    grads = zip(*(_grads(out, _tensors(p) + _tensors(q), dy)
                  for out, p, q in ((y, a, k), (y64, a64, k64), (ye, ae, ke))))
    for i, (ours, ref, eager) in enumerate(grads):
        assert (ours is None) == (ref is None)
        if ours is not None:
            _close(ours, ref, eager, "grad", terms(dy)[0 if i == 0 and x_grad else 1])
    after = (_tensors(p) + _tensors(q) for p, q in ((a, k), (a64, k64), (ae, ke)))
    for ours, ref, eager in zip(*after):
        _close(ours.detach(), ref.detach(), eager.detach(), "argument after the call")


def _functional_terms(name: str, x, a: dict):
    eps = a.get("eps", 1e-5)
    if name == "nn.functional.batch_norm":
        rv = None if a.get("training", False) else a.get("running_var")
        return lambda dy: _dx_terms("batch", x, dy, a.get("weight"), eps, running_var=rv)
    if name == "nn.functional.instance_norm":
        rv = None if a.get("use_input_stats", True) else a.get("running_var")
        return lambda dy: _dx_terms("instance" if rv is None else "batch", x, dy, a.get("weight"),
                                    eps, running_var=rv)
    if name == "nn.functional.group_norm":
        return lambda dy: _dx_terms("group", x, dy, a.get("weight"), eps, groups=a["num_groups"])
    shape = a["normalized_shape"]
    k = 1 if isinstance(shape, int) else len(shape)
    rms = name == "nn.functional.rms_norm"
    eps = a.get("eps") or torch.finfo(torch.float32).eps if rms else eps
    return lambda dy: _dx_terms("layer", x, dy, a.get("weight"), eps, last_dims=k, center=not rms)


def _rejected(call, rejection, state: list[torch.Tensor]) -> None:
    kind, pattern = rejection
    before = [t.clone() for t in state]
    with pytest.raises(kind, match=pattern):
        call()
    for t, b in zip(state, before):
        assert torch.equal(t, b), "a rejected call changed its arguments"


# --- functionals -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", sorted(FUNCTIONALS))
def test_functional_samples(op_db, name, dtype):
    op, ours = op_db[name], FUNCTIONALS[name]
    counts = {"passed": 0, "rejected": 0}
    # fp32 runs the Triton kernels (interpreted); float64 takes the reference path.
    for sample in op.sample_inputs("cpu", torch.float32, requires_grad=True):
        args, kwargs = (sample.input, *sample.args), dict(sample.kwargs)
        rejection = _rejection(name, sample.input, tuple(sample.args), kwargs)
        if rejection is not None:
            a = _copy(args, dtype)
            _rejected(lambda: ours(*a, **kwargs), rejection, _tensors(a))
            counts["rejected"] += 1
            continue
        terms = _functional_terms(name, sample.input, _named_args(name, tuple(sample.args), kwargs))
        _check(ours, op.op, args, kwargs, dtype, terms)
        counts["passed"] += 1
    assert counts["passed"] > 0, counts


# --- modules ---------------------------------------------------------------------------------

def _module_pair(cls_name: str, ctor_args, ctor_kwargs, dtype):
    """Ours in ``dtype`` (fp32: Triton kernels; float64: the reference path), torch's in float64
    and in ``dtype``, all with the same random state."""
    torch_cls, our_cls = getattr(torch.nn, cls_name), getattr(tnn, cls_name)
    theirs = torch_cls(*ctor_args, **ctor_kwargs).to(torch.float64)
    # Random affine parameters and running statistics, not the ones/zeros they start with.
    with torch.no_grad():
        for key, t in theirs.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if key.endswith("running_var") else torch.randn_like(t))
    ours = our_cls(*ctor_args, **ctor_kwargs).to(dtype)
    eager = torch_cls(*ctor_args, **ctor_kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    eager.load_state_dict(theirs.state_dict())
    return ours, theirs, eager


def _module_terms(m: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[float, float]:
    eps = m.eps
    if isinstance(m, torch.nn.modules.batchnorm._NormBase):
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm):
            if x.dim() == m._get_no_batch_dim():
                x, dy = x.unsqueeze(0), dy.unsqueeze(0)
            use_batch = m.training or not m.track_running_stats
            kind = "instance"
        else:
            use_batch = m.training or m.running_var is None
            kind = "batch"
        rv = None if use_batch else m.running_var
        return _dx_terms(kind if rv is None else "batch", x, dy, m.weight, eps, running_var=rv)
    if isinstance(m, torch.nn.GroupNorm):
        return _dx_terms("group", x, dy, m.weight, eps, groups=m.num_groups)
    rms = isinstance(m, torch.nn.RMSNorm)
    if rms and eps is None:
        eps = torch.finfo(torch.float32).eps
    return _dx_terms("layer", x, dy, m.weight, eps, last_dims=len(m.normalized_shape), center=not rms)


# Only batch and instance norms behave differently in eval; the others run in train mode only.
@pytest.mark.parametrize("cls_name,training",
                         [(c, t) for c in MODULES for t in (True, False) if t or "Batch" in c or "Instance" in c])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_module_samples(module_db, cls_name, training, dtype):
    info = module_db[cls_name]
    samples = info.module_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=True,
                                      training=training)
    passed = 0
    for sample in samples:
        ca, ck = sample.constructor_input.args, sample.constructor_input.kwargs
        fa, fk = sample.forward_input.args, sample.forward_input.kwargs
        ours, theirs, eager = _module_pair(cls_name, ca, ck, dtype)
        for m in (ours, theirs, eager):
            m.train(training)
        outs, ins = [], []
        for m, a in ((ours, _copy(fa, dtype)), (theirs, _copy(fa, torch.float64)),
                     (eager, _copy(fa, dtype))):
            outs.append(m(*a, **fk))
            ins.append([t for t in _tensors(a) if t.requires_grad] + list(m.parameters()))
        _close(*outs, "output")
        _same_layout(outs[0], outs[2])
        dy = torch.randn(outs[0].shape, dtype=torch.float64)
        x_grad = bool(fa) and isinstance(fa[0], torch.Tensor) and fa[0].requires_grad
        for i, g in enumerate(zip(*(_grads(y, i, dy) for y, i in zip(outs, ins)))):
            _close(*g, "grad", _module_terms(theirs, fa[0], dy)[0 if i == 0 and x_grad else 1])
        sds = [m.state_dict() for m in (ours, theirs, eager)]
        assert list(sds[0]) == list(sds[1])
        for key in sds[0]:
            if sds[0][key].is_floating_point():
                _close(*(sd[key] for sd in sds), key)
            else:
                assert torch.equal(sds[0][key], sds[1][key]), key
        passed += 1
    assert passed > 0


def test_every_rejection_is_documented():
    """Each kind of rejection the samples hit is listed in docs/modules.md."""
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "modules.md").read_text()
    section = doc.split("## Inputs tritonorm rejects on purpose", 1)
    assert len(section) == 2, "docs/modules.md lacks its list of deliberate rejections"
    for phrase in ("eps <= 0", "momentum outside [0, 1]", "1-D input to batch_norm"):
        assert re.search(re.escape(phrase), section[1]), phrase
