"""The Triton path as registered PyTorch ops (``torch.ops.tritonorm.*``).

Registering through ``torch.library.custom_op`` gives the ops fake (meta) implementations for
tracing and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through them and
no host synchronisation happens inside. Kernel modules are imported lazily: ``import tritonorm``
must work where triton cannot be imported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import double_backward
from .scope import Spec


def _spec(layout: str, letters: str, num_groups: int) -> Spec:
    return Spec(layout=layout, letters=letters, num_groups=num_groups)


@torch.library.custom_op("tritonorm::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
             given_mean: Optional[Tensor], given_rstd: Optional[Tensor], layout: str, letters: str,
             num_groups: int, eps: float, center: bool,
             act: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y, mean, var, then what backward needs: pivot, shifted mean, rstd (fp32 statistics,
    shaped like the kept axes; mean = pivot + shifted mean, see kernels/forward.py)."""
    from .kernels import launch

    given = None if given_rstd is None else (given_mean, given_rstd)
    y, k, mean_d, rstd, var = launch.forward(x, _spec(layout, letters, num_groups), weight, bias,
                                             residual, eps, center, act, given=given)
    return y, k + mean_d, var, k, mean_d, rstd


@norm_fwd.register_fake
def _(x, weight, bias, residual, given_mean, given_rstd, layout, letters, num_groups, eps, center, act):
    shape = _spec(layout, letters, num_groups).stat_shape(x.shape)
    y = torch.empty_like(x, memory_format=torch.preserve_format)
    stats = [x.new_empty(shape, dtype=torch.float32) for _ in range(5)]
    return (y, *stats)


@torch.library.custom_op("tritonorm::norm_bwd", mutates_args=())
def norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], pivot: Tensor, mean_shifted: Tensor, rstd: Tensor,
             layout: str, letters: str, num_groups: int, center: bool, act: int, given: bool,
             needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dweight, dbias, dresidual; an empty tensor stands for a gradient not asked for."""
    from .kernels import launch

    dx, dw, db, dres = launch.backward(dy, x, _spec(layout, letters, num_groups), weight, bias,
                                       residual, pivot, mean_shifted, rstd, center, act, given, *needs)
    if dres is dy:  # the op's outputs must not alias its inputs
        dres = dy.clone()
    # Distinct empty tensors: outputs must not alias each other either.
    return tuple(x.new_empty(0) if t is None else t for t in (dx, dw, db, dres))


@norm_bwd.register_fake
def _(dy, x, weight, bias, residual, pivot, mean_shifted, rstd, layout, letters, num_groups, center,
      act, given, needs):
    dx = torch.empty_like(x, memory_format=torch.preserve_format) if needs[0] else x.new_empty(0)
    dw = torch.empty_like(weight) if needs[1] else x.new_empty(0)
    db = torch.empty_like(bias) if needs[2] else x.new_empty(0)
    dres = torch.empty_like(x, memory_format=torch.preserve_format) if needs[3] else x.new_empty(0)
    return dx, dw, db, dres


def _setup(ctx, inputs, output):
    x, weight, bias, residual, given_mean, given_rstd, layout, letters, num_groups, eps, center, act = inputs
    _, mean, var, k, mean_d, rstd = output
    ctx.save_for_backward(x, weight, bias, residual if act != 0 else None, k, mean_d, rstd)
    ctx.meta = (layout, letters, num_groups, center, act, given_rstd is not None, residual is not None)
    ctx.eps = eps  # for double_backward's recompute
    ctx.mark_non_differentiable(mean, var, k, mean_d, rstd)


def _backward(ctx, dy, *_stat_grads):
    x, weight, bias, residual, k, mean_d, rstd = ctx.saved_tensors
    layout, letters, num_groups, center, act, given, has_res = ctx.meta
    need = ctx.needs_input_grad
    needs = [bool(need[0]), weight is not None and bool(need[1]), bias is not None and bool(need[2]),
             has_res and bool(need[3])]
    if dy is None or not any(needs):
        return (None,) * 12
    if torch.is_grad_enabled():  # create_graph=True: differentiable recompute, see double_backward.py
        return double_backward.from_ctx(ctx, dy, needs)
    # Without an activation dresidual is dy itself: no kernel output needed for it.
    kernel_needs = needs[:3] + [needs[3] and act != 0]
    dx, dw, db, dres = torch.ops.tritonorm.norm_bwd(dy, x, weight, bias, residual, k, mean_d, rstd,
                                                    layout, letters, num_groups, center, act, given,
                                                    kernel_needs)
    if needs[3] and act == 0:
        dres = dy
    out = [dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
           dres if needs[3] else None]
    return (*out, None, None, None, None, None, None, None, None)


norm_fwd.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("tritonorm::moments", mutates_args=())
def moments(x: Tensor, layout: str, letters: str, num_groups: int, center: bool) -> tuple[Tensor, Tensor]:
    """mean and biased variance (mean square without centring) per statistic, fp32; x read once
    or twice and no output written."""
    from .kernels import launch

    _, k, mean_d, _, var = launch.forward(x, _spec(layout, letters, num_groups), None, None, None, 1.0,
                                          center, 0, stats_only=True)
    return k + mean_d, var


@moments.register_fake
def _(x, layout, letters, num_groups, center):
    shape = _spec(layout, letters, num_groups).stat_shape(x.shape)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def _moments_setup(ctx, inputs, output):
    x, layout, letters, num_groups, center = inputs
    ctx.save_for_backward(x, output[0])
    ctx.meta = (layout, letters, num_groups, center)


def _moments_backward(ctx, dmean, dvar):
    # d mean / dx = 1/M, d var / dx = 2 (x - mean) / M: elementwise, written in PyTorch ops so
    # they fuse under torch.compile.
    x, mean = ctx.saved_tensors
    layout, letters, num_groups, center = ctx.meta
    spec = _spec(layout, letters, num_groups)
    full = [1 if red else size for _, size, red in spec.logical_axes(x.shape)]
    xg = x.float().reshape(x.shape[0], num_groups, x.shape[1] // num_groups, *x.shape[2:])
    g = torch.zeros_like(xg)
    if dmean is not None and center:
        g = g + dmean.reshape(full)
    if dvar is not None:
        dev = xg - mean.reshape(full) if center else xg
        g = g + 2.0 * dvar.reshape(full) * dev
    return (g / spec.count(x.shape)).reshape(x.shape).to(x.dtype), None, None, None, None


moments.register_autograd(_moments_backward, setup_context=_moments_setup)
