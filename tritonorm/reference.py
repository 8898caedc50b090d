"""Pure-PyTorch reference of every tritonorm operation.

Readable and float64-capable: the CPU fallback, the tests' oracle and the benchmarks' baseline
all import it from here. It follows the same semantics as the kernels (DESIGN §2-3):

    mu, var = mean and biased variance of x over the scope (var = mean(x^2), mu = 0 if not center)
    y = act(weight_c * (x - mu) / sqrt(var + eps) + bias_c + residual)

Arguments are assumed valid (``tritonorm.norm`` checks them before calling in).
"""

from __future__ import annotations

import torch

from . import activations
from .scope import Spec


def _grouped(x: torch.Tensor, spec: Spec) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View x as its logical axes ([S,] N, G, Cg, *spatial) and return it with the dims to reduce."""
    xg = x.reshape(spec.logical_shape(x.shape))
    dims = tuple(i for i, (_, _, red) in enumerate(spec.logical_axes(x.shape)) if red)
    return xg, dims


def moments(x: torch.Tensor, spec: Spec, center: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-statistic mean and biased variance, shaped ``spec.stat_shape(x.shape)``.

    Computed in float32 for low-precision x (float64 stays float64). With ``center=False`` the
    mean is zero and the "variance" is the mean square.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg, dims = _grouped(x.to(acc), spec)
    if center:
        mean = xg.mean(dim=dims, keepdim=True)
        var = (xg - mean).square().mean(dim=dims, keepdim=True)
    else:
        mean = torch.zeros((), dtype=acc, device=x.device)
        var = xg.square().mean(dim=dims, keepdim=True)
    shape = spec.stat_shape(x.shape)
    return mean.expand_as(var).reshape(shape), var.reshape(shape)


def update_running(spec: Spec, shape, mean, var, running_mean, running_var, momentum: float) -> None:
    """PyTorch's rule, in place: ``r <- (1 - momentum) r + momentum batch``, with the unbiased
    variance (the mean square as is when ``mean`` is None, i.e. without centring).

    With sample groups the batch value is the mean over the S groups of each group's mean and
    unbiased variance (torch's rule for instance_norm's running statistics): one update per call.
    """
    m = spec.count(shape)
    stat = spec.stat_shape(shape)
    acc = torch.float64 if var.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        v = var.reshape(stat).to(acc)
        if mean is not None and m > 1:
            v = v * (m / (m - 1))
        if spec.sample_groups > 1:
            v = v.mean(dim=0)
        # Blended in fp32 (or float64) and rounded once to the buffer's dtype, as the kernels do.
        running_var.copy_((1 - momentum) * running_var.to(acc) + momentum * v.reshape(running_var.shape))
        if mean is not None:
            mu = mean.reshape(stat).to(acc)
            if spec.sample_groups > 1:
                mu = mu.mean(dim=0)
            running_mean.copy_((1 - momentum) * running_mean.to(acc) + momentum * mu.reshape(running_mean.shape))


def _broadcast_stat(stat: torch.Tensor, spec: Spec, shape, running: bool = False) -> torch.Tensor:
    """Reshape a per-statistic tensor so it broadcasts against the logical view of x.
    ``running``: a running statistic, shared by every sample group (no S axis)."""
    full = [1 if red or (running and name == "S") else size
            for name, size, red in spec.logical_axes(shape)]
    return stat.reshape(full)


def norm(
    x: torch.Tensor,
    spec: Spec,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    center: bool = True,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float = 0.1,
    training: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference normalization. Differentiable by autograd; updates running stats in place.

    ``compute_dtype`` defaults to float64 for float64 input and float32 otherwise; passing the
    input's own low-precision dtype gives what an eager composition of PyTorch ops computes.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = x.shape
    xc = x.to(compute_dtype)
    xg, dims = _grouped(xc, spec)
    use_running = running_var is not None and not training
    if use_running:
        var = _broadcast_stat(running_var.to(compute_dtype), spec, shape, running=True)
        mean = _broadcast_stat(running_mean.to(compute_dtype), spec, shape, running=True) if center else None
    else:
        if center:
            mean = xg.mean(dim=dims, keepdim=True)
            var = (xg - mean).square().mean(dim=dims, keepdim=True)
        else:
            mean = None
            var = xg.square().mean(dim=dims, keepdim=True)
        if training and running_var is not None:
            update_running(spec, shape, mean.detach() if center else None, var.detach(),
                           running_mean, running_var, momentum)
    xhat = (xg - mean if center else xg) * torch.rsqrt(var + eps)
    y = xhat.reshape(shape)
    if weight is not None:
        y = y * affine_view(weight.to(compute_dtype), x)
    if bias is not None:
        y = y + affine_view(bias.to(compute_dtype), x)
    if residual is not None:
        y = y + residual.to(compute_dtype)
    y = activations.apply(activation, y)
    return y.to(x.dtype)


def affine_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A weight or bias in x's broadcasting terms: (C,) is per channel (axis 1); anything else
    (broadcast / adaptive affine: (N, C, 1, 1), (N, 1, D), ...) broadcasts by torch's rules."""
    if tuple(t.shape) == (x.shape[1],):
        return t.view(1, -1, *([1] * (x.dim() - 2)))
    return t
