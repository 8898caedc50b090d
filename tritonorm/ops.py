"""The Triton path as registered PyTorch ops (``torch.ops.tritonorm.*``), for torch.compile/export.

Eager calls do not come through here: they go autograd.Function -> cached launch plan -> kernel
(``tritonorm.core``), which costs a fraction of a custom op's dispatch. Under
``torch.compile`` the ops below are what Dynamo traces: ``torch.library.custom_op`` gives them
fake (meta) implementations and an autograd formula, so ``fullgraph=True`` works and no host
synchronisation happens inside. Running statistics are blended outside the op with torch ops,
which Inductor fuses. Kernel modules are imported lazily: ``import tritonorm`` must work where
triton cannot be imported.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .scope import Spec


def encode_spec(spec: Spec) -> str:
    """A Spec as the string argument of the registered ops (every field, in order)."""
    return "|".join(str(getattr(spec, f.name)) for f in dataclasses.fields(spec))


def decode_spec(text: str) -> Spec:
    parts = text.split("|")
    values = {}
    for f, part in zip(dataclasses.fields(Spec), parts):
        values[f.name] = int(part) if f.type in (int, "int") else part
    return Spec(**values)


def _n_stats(spec: Spec, shape) -> int:
    n = 1
    for s in spec.stat_shape(shape):
        n *= s
    return n


@torch.library.custom_op("tritonorm::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor], spec: str, eps: float,
             center: bool, act: int) -> tuple[Tensor, Tensor]:
    """y and the [5, P] fp32 statistics (pivot, shifted mean, rstd, var, mean). With
    ``running_var`` the running statistics are applied (eval), never updated here."""
    from . import broadcast_ops
    from .kernels import launch

    given = None if running_var is None else (running_mean, running_var)
    if broadcast_ops.is_broadcast(x, weight, bias):  # adaptive affine: planned as eager plans it
        return broadcast_ops.forward(x, decode_spec(spec), weight, bias, residual, given, eps, center, act)
    return launch.forward(x, decode_spec(spec), weight, bias, residual, eps, center, act, given=given)


@norm_fwd.register_fake
def _(x, weight, bias, residual, running_mean, running_var, spec, eps, center, act):
    y = torch.empty_like(x, memory_format=torch.preserve_format)
    return y, x.new_empty((5, _n_stats(decode_spec(spec), x.shape)), dtype=torch.float32)


@torch.library.custom_op("tritonorm::norm_bwd", mutates_args=())
def norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], stats: Tensor, spec: str, center: bool, act: int, given: bool,
             needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dweight, dbias, dresidual; an empty tensor stands for a gradient not asked for. A
    broadcast weight's or bias's gradient has its shape."""
    from . import broadcast_ops
    from .kernels import launch

    if broadcast_ops.is_broadcast(x, weight, bias):
        dx, dw, db, dres = broadcast_ops.backward(dy, x, decode_spec(spec), weight, bias, residual, stats, center,
                                                  act, given, needs)
    else:
        mode = "given" if given else "train"
        plan = launch.forward_plan(x, decode_spec(spec), weight is not None, bias is not None,
                                   residual is not None, act, center, mode, launch.NO_RUNNING,
                                   (None if residual is None else residual.stride(),))
        dx, dw, db, dres = plan.backward(tuple(bool(n) for n in needs))(dy, x, weight, bias, residual, stats)
    if dres is dy:  # the op's outputs must not alias its inputs
        dres = dy.clone()
    # Distinct empty tensors: outputs must not alias each other either.
    return tuple(x.new_empty(0) if t is None else t for t in (dx, dw, db, dres))


@norm_bwd.register_fake
def _(dy, x, weight, bias, residual, stats, spec, center, act, given, needs):
    dx = torch.empty_like(x, memory_format=torch.preserve_format) if needs[0] else x.new_empty(0)
    # (C,) or broadcast, the gradient has the parameter's shape, contiguous
    dw = weight.new_empty(weight.shape) if needs[1] else x.new_empty(0)
    db = bias.new_empty(bias.shape) if needs[2] else x.new_empty(0)
    dres = torch.empty_like(x, memory_format=torch.preserve_format) if needs[3] else x.new_empty(0)
    return dx, dw, db, dres


def _setup(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, spec, eps, center, act = inputs
    _, stats = output
    ctx.save_for_backward(x, weight, bias, residual if act != 0 else None, stats)
    ctx.meta = (spec, center, act, running_var is not None, residual is not None)
    ctx.eps = eps  # for double_backward's recompute
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dy, _stats_grad):
    x, weight, bias, residual, stats = ctx.saved_tensors
    spec, center, act, given, has_res = ctx.meta
    need = ctx.needs_input_grad
    needs = [bool(need[0]), weight is not None and bool(need[1]), bias is not None and bool(need[2]),
             has_res and bool(need[3])]
    if dy is None or not any(needs):
        return (None,) * 10
    if torch.is_grad_enabled():  # create_graph=True: differentiable recompute, see double_backward.py
        from . import double_backward

        return double_backward.from_ctx(ctx, dy, needs)
    # Without an activation dresidual is dy itself: no kernel output needed for it.
    kernel_needs = needs[:3] + [needs[3] and act != 0]
    dx, dw, db, dres = torch.ops.tritonorm.norm_bwd(dy, x, weight, bias, residual, stats, spec, center, act,
                                                    given, kernel_needs)
    if needs[3] and act == 0:
        dres = dy
    out = [dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
           dres if needs[3] else None]
    return (*out, None, None, None, None, None, None)


norm_fwd.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("tritonorm::moments", mutates_args=())
def moments(x: Tensor, spec: str, center: bool) -> tuple[Tensor, Tensor]:
    """mean and biased variance (mean square without centring) per statistic, fp32, flat; x read
    once or twice and no output written."""
    from .kernels import launch

    _, stats = launch.forward(x, decode_spec(spec), None, None, None, 1.0, center, 0, stats_only=True)
    return stats[4].clone(), stats[3].clone()


@moments.register_fake
def _(x, spec, center):
    n = _n_stats(decode_spec(spec), x.shape)
    return x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


def moments_grad(x: Tensor, mean: Tensor, spec: Spec, center: bool, dmean, dvar) -> Tensor:
    """dL/dx from dL/dmean and dL/dvar: d mean / dx = 1/M, d var / dx = 2 (x - mean) / M.
    Elementwise torch ops, so they fuse under torch.compile."""
    full = [1 if red else size for _, size, red in spec.logical_axes(x.shape)]
    xg = x.float().reshape([size for _, size, _ in spec.logical_axes(x.shape)])
    g = torch.zeros_like(xg)
    if dmean is not None and center:
        g = g + dmean.reshape(full)
    if dvar is not None:
        dev = xg - mean.reshape(full) if center else xg
        g = g + 2.0 * dvar.reshape(full) * dev
    return (g / spec.count(x.shape)).reshape(x.shape).to(x.dtype)


def _moments_setup(ctx, inputs, output):
    x, spec, center = inputs
    ctx.save_for_backward(x, output[0])
    ctx.meta = (spec, center)


def _moments_backward(ctx, dmean, dvar):
    x, mean = ctx.saved_tensors
    spec, center = ctx.meta
    return moments_grad(x, mean, decode_spec(spec), center, dmean, dvar), None, None


moments.register_autograd(_moments_backward, setup_context=_moments_setup)
