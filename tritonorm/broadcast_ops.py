"""Broadcast (adaptive) weight/bias inside the registered ops (the torch.compile path).

``tritonorm::norm_fwd`` and ``norm_bwd`` (ops.py) come here when weight or bias is not ``(C,)``
but broadcastable to x: (N, C, 1, 1) AdaGroupNorm/AdaIN/FiLM, adaLN's (N, 1, D), (1, C, H, W),
(N, C) for a 2-D x. They plan exactly as an eager call does (``core._Call``): the launch plan with
``param_full`` and ``core._param_nc``, so compiled and eager run the same kernels — the
parameters read in place per (sample, channel) or per (sample, column) where the plan allows,
else expanded to x's shape and their per-element gradients summed back to the parameter's shape.

Where the plan cannot take them (``fusable_full`` False: the torch regime of a tuned table, x
needing a contiguous copy) the op runs what eager's ``core._broadcast_composite`` runs: the plain
norm's plan, then the affine, residual and activation as torch ops; its backward is the same
chain by hand (an op body runs below autograd). The decision is made here, inside the op, so
Dynamo never traces the planner and the graph is the same whichever regime a device's tables
pick.
"""

from __future__ import annotations

import torch

from . import activations, reference

_NAMES = {activations.code(n): n for n in (None, *activations.NAMES)}


def is_broadcast(x: torch.Tensor, weight, bias) -> bool:
    """Whether either parameter is other than (C,) (the caller validated both)."""
    c = (x.shape[1],) if x.dim() >= 2 else None
    return any(t is not None and tuple(t.shape) != c for t in (weight, bias))


def _plan(x, spec, weight, bias, residual, act, center, given):
    """The launch plan an eager call of this signature uses, or None where it does not take
    broadcast parameters (then the composite runs)."""
    from . import core
    from .kernels import launch

    plan = launch.forward_plan(x, spec, weight is not None, bias is not None, residual is not None, act, center,
                               "given" if given else "train", launch.NO_RUNNING,
                               (None if residual is None else residual.stride(),), param_full=True,
                               param_nc=core._param_nc(x, spec, weight, bias))
    return plan if plan.fusable_full else None


def _plain(x, spec, center, given):
    """The plain norm's plan (no affine, residual or activation): the composite's first step."""
    from .kernels import launch

    return launch.forward_plan(x, spec, False, False, False, 0, center, "given" if given else "train",
                               launch.NO_RUNNING)


def _out_like(x, t):
    """``t`` in y's dtype and layout (what the fake implementations promise)."""
    out = torch.empty_like(x, memory_format=torch.preserve_format)
    return out.copy_(t)


def forward(x, spec, weight, bias, residual, given, eps: float, center: bool, act: int):
    """(y, [5, P] statistics). ``given``: (running_mean or None, running_var) to normalize with."""
    rm, rv = given if given is not None else (None, None)
    plan = _plan(x, spec, weight, bias, residual, act, center, given is not None)
    from . import core

    if plan is not None:
        return plan(x, *core.expanded(plan.nc is None, plan, weight, bias, x), residual, rm, rv, eps)

    z, stats = _plain(x, spec, center, given is not None)(x, None, None, None, rm, rv, eps)
    return _out_like(x, core.compose(z, x, weight, bias, residual, _NAMES[act])), stats


def backward(dy, x, spec, weight, bias, residual, stats, center: bool, act: int, given: bool, needs):
    """(dx, dweight, dbias, dresidual), None where not asked for; a broadcast parameter's
    gradient has its shape (contiguous), summed over its broadcast axes."""
    from . import core

    needs = tuple(bool(n) for n in needs)
    plan = _plan(x, spec, weight, bias, residual, act, center, given)
    if plan is None:
        return _composite_backward(dy, x, spec, weight, bias, residual, stats, center, act, given, needs)
    dx, dw, db, dres = core.param_backward(plan.nc is None, plan, plan.backward(needs), dy, x, weight, bias,
                                           residual, stats)
    return dx, _dense(dw), _dense(db), dres


def _dense(t):
    return None if t is None else t.contiguous()


def _composite_backward(dy, x, spec, weight, bias, residual, stats, center, act, given, needs):
    """The backward of ``forward``'s composite: z = norm(x) (rounded to x's dtype, as the forward
    stored it) * weight + bias + residual, y = act(z); the plain norm's backward plan takes
    dz * weight for dx."""
    need_dx, need_dw, need_db, need_dres = needs
    name = _NAMES[act]
    shape = spec.stat_shape(x.shape)
    xg, _ = reference._grouped(x.float(), spec)
    # As the kernels: ((x - pivot) - shifted mean) * rstd (pivot and mean 0 without centring).
    pivot, shifted, rstd = (reference._broadcast_stat(stats[i].view(shape), spec, x.shape) for i in range(3))
    xhat = (((xg - pivot) - shifted if center else xg) * rstd).reshape(x.shape).to(x.dtype).float()
    w = None if weight is None else reference.affine_view(weight, x).float()
    dz = dy.float()
    if act != 0:
        from . import core

        dz = dz * activations.grad(name, core.compose(xhat, x, w, bias, residual, None).float())
    dx = dw = db = dres = None
    if need_dx:
        g = (dz if w is None else dz * w).to(x.dtype)
        dx = _plain(x, spec, center, given).backward((True, False, False, False))(
            _out_like(x, g), x, None, None, None, stats)[0]
    if need_dw:
        dw = _param_grad(dz * xhat, weight, x)
    if need_db:
        db = _param_grad(dz, bias, x)
    if need_dres:
        dres = _out_like(x, dz)
    return dx, dw, db, dres


def _param_grad(g, param, x):
    """A per-element gradient summed over ``param``'s broadcast axes, in its dtype and shape."""
    return g.sum_to_size(reference.affine_view(param, x).shape).reshape(param.shape).to(param.dtype).contiguous()
