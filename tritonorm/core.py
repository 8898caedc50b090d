"""``tritonorm.norm``: mean/variance normalization over any scope, fused with affine, residual
and activation. Checks arguments, picks the backend, runs it, updates running statistics."""

from __future__ import annotations

import torch

from . import activations, backend as backends, ops, reference  # noqa: F401 (ops registers torch.ops.tritonorm)
from .scope import Spec
from .validation import check_norm_args


def norm(x: torch.Tensor, scope: str = "group", *, num_groups: int | None = None,
         weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
         center: bool = True, activation: str | None = None, residual: torch.Tensor | None = None,
         running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
         momentum: float = 0.1, training: bool = True, backend: str | None = None) -> torch.Tensor:
    """Normalize ``x`` (N, C, *spatial) over ``scope``: ``act(weight * xhat + bias + residual)``.

    See docs/api.md for every argument. ``xhat = (x - mean) / sqrt(var + eps)`` with the mean
    and biased variance taken over the scope (``center=False``: no mean, RMS normalization).
    """
    y, _, _ = norm_with_stats(x, scope, num_groups=num_groups, weight=weight, bias=bias, eps=eps,
                              center=center, activation=activation, residual=residual,
                              running_mean=running_mean, running_var=running_var, momentum=momentum,
                              training=training, backend=backend)
    return y


def norm_with_stats(x, scope="group", *, num_groups=None, weight=None, bias=None, eps=1e-5,
                    center=True, activation=None, residual=None, running_mean=None,
                    running_var=None, momentum=0.1, training=True, backend=None):
    """``norm`` that also returns the batch statistics (mean, biased var; fp32 or float64,
    shaped like the kept axes, detached). When running statistics are used (eval) both are None.

    For what is built on top (instance_norm's running statistics, which are the batch mean of the
    per-instance statistics).
    """
    spec, act = check_norm_args(x, scope, num_groups, weight, bias, eps, center, activation, residual,
                                running_mean, running_var, momentum, training)
    name = backends.resolve(backend, x.device, x.dtype)
    use_running = running_var is not None and not training
    if x.numel() == 0:
        stat_shape = spec.stat_shape(x.shape)
        empty = torch.zeros(stat_shape, dtype=torch.float32, device=x.device)
        return x.clone(), empty, empty
    if name == "reference":
        return _reference(x, spec, weight, bias, eps, center, act, residual, running_mean,
                          running_var, momentum, training, use_running)
    given_mean = given_rstd = None
    if use_running:
        given_rstd = torch.rsqrt(running_var.detach().float() + eps)
        given_mean = running_mean.detach().float() if center else torch.zeros_like(given_rstd)
    y, mean, var, _, _, _ = torch.ops.tritonorm.norm_fwd(
        x, weight, bias, residual, given_mean, given_rstd, spec.layout, spec.letters,
        spec.num_groups, float(eps), center, activations.code(act))
    if use_running:
        return y, None, None
    if training and running_var is not None:
        _update_running(spec, x.shape, mean, var, running_mean, running_var, momentum, center)
    return y, mean, var


def _update_running(spec: Spec, shape, mean, var, running_mean, running_var, momentum, center):
    """PyTorch's rule: r <- (1 - m) r + m batch, with the unbiased variance; blended in fp32
    (float64 for float64 statistics) and rounded to the buffer's dtype once, as torch does."""
    m = spec.count(shape)
    with torch.no_grad():
        if center:
            blend_(running_mean, mean, momentum)
            var = var * (m / (m - 1))
        blend_(running_var, var, momentum)


def blend_(running: torch.Tensor, batch: torch.Tensor, momentum: float) -> None:
    """``running <- (1 - momentum) running + momentum batch`` computed at fp32 or wider, one rounding."""
    acc = torch.promote_types(running.dtype, torch.float32)
    new = running.to(acc) * (1 - momentum) + batch.reshape(-1).to(acc) * momentum
    running.copy_(new)


def _reference(x, spec, weight, bias, eps, center, act, residual, running_mean, running_var,
               momentum, training, use_running):
    if use_running:
        y = reference.norm(x, spec, weight, bias, eps, center, act, residual, running_mean,
                           running_var, momentum, training=False)
        return y, None, None
    mean, var = reference.moments(x.detach(), spec, center)
    y = reference.norm(x, spec, weight, bias, eps, center, act, residual, None, None, momentum,
                       training)
    if training and running_var is not None:
        _update_running(spec, x.shape, mean, var, running_mean, running_var, momentum, center)
    return y, mean, var


def moments(x: torch.Tensor, scope: str = "group", *, num_groups: int | None = None,
            center: bool = True, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` per statistic of ``scope``, differentiable.

    Shaped like the kept axes (``Spec.stat_shape``: ``(C,)`` for batch, ``(N, C)`` for instance,
    ``(N, G)`` for group); fp32 (float64 on the reference path). With ``center=False`` the mean
    is zero and the variance is the mean square. The Triton path reads x once (or twice for
    statistics too large for one program) and writes nothing else; the building block of
    Switchable Normalization and SyncBatchNorm.
    """
    spec, _ = check_norm_args(x, scope, num_groups, None, None, 1.0, center, None, None, None,
                              None, 0.1, False)
    name = backends.resolve(backend, x.device, x.dtype)
    if name == "reference" or x.numel() == 0:
        return reference.moments(x, spec, center)
    return torch.ops.tritonorm.moments(x, spec.layout, spec.letters, spec.num_groups, center)
