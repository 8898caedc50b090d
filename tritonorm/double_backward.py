"""Double backward (gradient penalties: WGAN-GP, R1) for the Triton norm op.

The Triton backward kernel computes first-order gradients below autograd, so a graph through
them cannot be differentiated again. When the backward runs with ``create_graph=True`` (grad mode
on inside backward), the op's backward calls ``grads`` instead: it recomputes the forward from the
saved tensors with differentiable PyTorch ops at fp32 (float64 stays float64) and returns
``torch.autograd.grad(y, inputs, dy, create_graph=True)``, so the first-order gradients carry
their own graph back to x, weight, bias, residual and dy. Running statistics are not touched.

Statistics: from the batch (recomputed, differentiable in x), or the given ones (running
statistics in eval: constants, as in PyTorch).
"""

from __future__ import annotations

import torch

from . import activations, reference
from .scope import Spec

_NAME_OF_CODE = {activations.code(name): name for name in (None, *activations.NAMES)}


def grads(dy: torch.Tensor, x: torch.Tensor, weight, bias, residual, spec: Spec, eps: float,
          center: bool, act_code: int, given: tuple[torch.Tensor, torch.Tensor] | None,
          needs: list[bool], has_residual: bool) -> list[torch.Tensor | None]:
    """[dx, dweight, dbias, dresidual] (None where not needed), differentiable.

    ``given``: (mean, rstd) per statistic when the forward normalized with given statistics,
    else None (batch statistics, recomputed here). ``residual`` may be None although the forward
    had one (``has_residual``): without an activation it only shifts y, so dresidual is dy.
    """
    act = _NAME_OF_CODE[act_code]
    inputs = (x, weight, bias, residual)
    # A tensor whose gradient is not asked for is a constant here.
    live = [None if t is None else (t if need else t.detach()) for t, need in zip(inputs, needs)]
    with torch.enable_grad():
        if given is None:
            y = reference.norm(live[0], spec, live[1], live[2], eps, center, act, live[3],
                               training=True, compute_dtype=_compute_dtype(x))
        else:
            y = _given_stats_forward(live[0], spec, live[1], live[2], live[3], given, center, act)
        wanted = [i for i, t in enumerate(live) if needs[i] and t is not None]
        out = torch.autograd.grad(y, [live[i] for i in wanted], dy, create_graph=True,
                                  allow_unused=True)
    result: list[torch.Tensor | None] = [None] * 4
    for i, g in zip(wanted, out):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    if needs[3] and residual is None and has_residual:
        result[3] = dy
    return result


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _given_stats_forward(x, spec: Spec, weight, bias, residual, given, center: bool, act):
    """y = act(weight * (x - mean) * rstd + bias + residual) with constant mean and rstd."""
    acc = _compute_dtype(x)
    mean, rstd = given
    full = [1 if red else size for _, size, red in spec.logical_axes(x.shape)]
    xg = x.to(acc).reshape(spec.logical_shape(x.shape))
    if center:
        xg = xg - mean.detach().to(acc).reshape(full)
    y = (xg * rstd.detach().to(acc).reshape(full)).reshape(x.shape)
    bshape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(acc).reshape(bshape)
    if bias is not None:
        y = y + bias.to(acc).reshape(bshape)
    if residual is not None:
        y = y + residual.to(acc)
    return activations.apply(act, y).to(x.dtype)


def from_ctx(ctx, dy: torch.Tensor, needs: list[bool]) -> tuple:
    """The hook for ops.py's ``norm_fwd`` backward (the torch.compile path): unpack its context,
    return its 10 outputs."""
    from .ops import decode_spec

    x, weight, bias, residual, stats = ctx.saved_tensors
    spec, center, act, given, has_res = ctx.meta
    spec = decode_spec(spec)
    shape = spec.stat_shape(x.shape)
    given_stats = (stats[4].view(shape), stats[2].view(shape)) if given else None
    out = grads(dy, x, weight, bias, residual, spec, ctx.eps, center, act, given_stats, needs, has_res)
    return (*out, None, None, None, None, None, None)
