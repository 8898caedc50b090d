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

    ``given``: (mean, var) per statistic when the forward normalized with given (running)
    statistics, else None (batch statistics, recomputed here). weight and bias may be (C,) or
    broadcastable to x (adaptive affine). ``residual`` may be None although the forward
    had one (``has_residual``): without an activation it only shifts y, so dresidual is dy.
    """
    act = _NAME_OF_CODE[act_code]
    inputs = (x, weight, bias, residual)
    # A tensor whose gradient is not asked for is a constant here.
    live = [None if t is None else (t if need else t.detach()) for t, need in zip(inputs, needs)]
    with torch.enable_grad():
        # Given statistics (eval) are the running ones the forward read: constants here.
        running = (None, None) if given is None else given
        y = reference.norm(live[0], spec, live[1], live[2], eps, center, act, live[3], *running,
                           training=given is None, compute_dtype=_compute_dtype(x))
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


def from_ctx(ctx, dy: torch.Tensor, needs: list[bool]) -> tuple:
    """The hook for ops.py's ``norm_fwd`` backward (the torch.compile path): unpack its context,
    return its 10 outputs."""
    from .ops import decode_spec

    x, weight, bias, residual, stats = ctx.saved_tensors
    spec, center, act, given, has_res = ctx.meta
    spec = decode_spec(spec)
    shape = spec.stat_shape(x.shape)
    given_stats = (stats[4].view(shape), stats[3].view(shape)) if given else None
    out = grads(dy, x, weight, bias, residual, spec, ctx.eps, center, act, given_stats, needs, has_res)
    return (*out, None, None, None, None, None, None)
