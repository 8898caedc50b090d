"""Running one tritonorm.norm case against the float64 reference, forward and backward."""

from __future__ import annotations

import torch

import tritonorm
from tritonorm import dispatch, reference, scope as scopes
from tritonorm.kernels.layout import alloc_out

from helpers import LOW, assert_close


def make_inputs(shape, dtype, *, affine=True, residual=False, offset=0.0, std=1.0,
                memory_format=None, wdtype=None):
    """Fresh random x, weight, bias, residual and upstream gradient (dy)."""
    x = (torch.randn(shape, dtype=torch.float64) * std + offset).to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    c = shape[1]
    wdtype = wdtype or dtype
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(wdtype) if affine else None
    b = torch.randn(c, dtype=torch.float64).to(wdtype) if affine else None
    r = torch.randn(shape, dtype=torch.float64).to(dtype) if residual else None
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    return x, w, b, r, dy


def _grads(y, leaves, dy):
    live = [t for t in leaves if t is not None]
    gs = torch.autograd.grad(y, live, dy)
    it = iter(gs)
    return [None if t is None else next(it) for t in leaves]


def check_case(x, scope="group", *, num_groups=None, weight=None, bias=None, residual=None,
               dy=None, activation=None, center=True, eps=1e-5, regime=None, config=None,
               backward=True):
    """Run tritonorm (Triton backend) and compare y and every gradient with the float64 reference.

    Low-precision inputs are judged by the rule in helpers.py against an eager computation of
    the reference in the same dtype.
    """
    dtype = x.dtype
    spec = scopes.parse(scope, x.dim(), num_groups, x.shape[1])
    leaves = [x, weight, bias, residual]

    def prep(cast):
        return [None if t is None else cast(t).detach().requires_grad_(backward) for t in leaves]

    ref_in = prep(lambda t: t.double())
    y64 = reference.norm(ref_in[0], spec, ref_in[1], ref_in[2], eps, center, activation, ref_in[3])
    # detach() keeps each tensor's own strides (views of parameters included) for the kernels.
    ours_in = prep(lambda t: t)
    # Rounding errors scale with the terms a result is made of, not with the result when those
    # terms cancel or an activation clips them: y = act(w*xhat + b + r), dx = rstd * (g - ...).
    x64 = x.detach().double()
    _, var = reference.moments(x64, spec, center)
    w_max = 1.0 if weight is None else weight.double().abs().max().item()
    amax = (lambda t: 0.0 if t is None else t.double().abs().max().item())
    y_terms = amax(reference.norm(x64, spec, eps=eps, center=center)) * w_max + amax(bias) + amax(residual)
    dx_terms = (var + eps).rsqrt().max().item() * dy.double().abs().max().item() * w_max * 1.2
    ctx = dispatch.forced(regime, **(config or {})) if regime else _null()
    with ctx:
        y = tritonorm.norm(ours_in[0], scope, num_groups=num_groups, weight=ours_in[1],
                           bias=ours_in[2], residual=ours_in[3], activation=activation,
                           center=center, eps=eps, backend="triton")
        assert y.dtype == dtype
        assert y.stride() == alloc_out(x).stride(), "y must keep x's memory format"
        eager_y = eager_g = None
        if dtype in LOW:
            low_in = prep(lambda t: t.detach().clone())
            eager_y = reference.norm(low_in[0], spec, low_in[1], low_in[2], eps, center, activation,
                                     low_in[3], compute_dtype=dtype)
        assert_close(y, y64, dtype, eager_y, "y", term_scale=y_terms)
        if not backward:
            return
        g = _grads(y, ours_in, dy)
    g64 = _grads(y64, ref_in, dy.double())
    if dtype in LOW:
        eager_g = _grads(eager_y, low_in, dy)
    for name, a, r, e, leaf in zip(("dx", "dweight", "dbias", "dresidual"), g, g64,
                                   eager_g or [None] * 4, ours_in):
        if leaf is None:
            continue
        assert a is not None, f"{name} missing"
        assert a.dtype == leaf.dtype, f"{name} dtype {a.dtype} != {leaf.dtype}"
        assert_close(a, r, leaf.dtype, e, name, term_scale=dx_terms if name == "dx" else 0.0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
