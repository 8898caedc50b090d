"""Drop-in replacements for ``torch.nn.functional``'s normalization functions.

Same signatures as PyTorch's, plus keyword-only ``activation`` and ``residual`` (added after the
affine, before the activation), and ``backend``. They run on ``tritonorm.norm``.
"""

from __future__ import annotations

import math

import torch

from .core import norm, norm_with_stats
from .validation import broadcasts_to, check_number, check_running_buffers, check_tensor


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None, residual=None, backend=None):
    """``F.batch_norm``: statistics per channel over N and the spatial axes."""
    return norm(input, "batch", weight=weight, bias=bias, eps=eps, activation=activation,
                residual=residual, running_mean=running_mean, running_var=running_var,
                momentum=momentum, training=training, backend=backend)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
               residual=None, backend=None):
    """``F.group_norm``: statistics per (sample, group of contiguous channels)."""
    # training=False without running statistics is batch statistics, minus norm's training-only
    # refusal of single-value statistics (PyTorch's group_norm accepts them).
    return norm(input, "group", num_groups=num_groups, weight=weight, bias=bias, eps=eps,
                activation=activation, residual=residual, training=False, backend=backend)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, activation=None, residual=None,
                  backend=None):
    """``F.instance_norm``: statistics per (sample, channel) over the spatial axes.

    As in PyTorch, running statistics (per channel) are the batch average of the per-instance
    mean and unbiased variance; ``use_input_stats=False`` normalizes with them instead.
    """
    if isinstance(input, torch.Tensor) and input.dim() < 3:
        raise ValueError(f"input must have spatial axes (N, C, *spatial) for instance_norm, got {input.dim()}-D")
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("use_input_stats=False needs running_mean and running_var")
        return norm(input, "batch", weight=weight, bias=bias, eps=eps, activation=activation,
                    residual=residual, running_mean=running_mean, running_var=running_var,
                    momentum=momentum, training=False, backend=backend)
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        check_tensor(name, t, input, (c,))
    updates = running_mean is not None or running_var is not None
    if updates:
        check_number("momentum", momentum, lo=0.0, hi=1.0)
    check_running_buffers(running_mean, running_var)
    y, mean, var = norm_with_stats(input, "instance", weight=weight, bias=bias, eps=eps,
                                   activation=activation, residual=residual, training=True,
                                   backend=backend)
    if input.numel() and updates:
        m = math.prod(input.shape[2:])
        with torch.no_grad():
            if running_mean is not None:
                _instance_update_(running_mean, mean, momentum)
            if running_var is not None:
                _instance_update_(running_var, var * (m / (m - 1)), momentum)
    return y


def _instance_update_(running: torch.Tensor, stat: torch.Tensor, momentum: float) -> None:
    """torch's instance-norm rule, rounding included: each sample blends its (N, C) statistic
    into the running value at fp32 (or wider) and rounds to the buffer's dtype (torch runs a
    batch norm over N*C channels on a repeated buffer); the N results are averaged at fp32 and
    rounded once more."""
    acc = torch.promote_types(running.dtype, torch.float32)
    per_sample = (running.to(acc) * (1 - momentum) + stat.to(acc) * momentum).to(running.dtype)
    running.copy_(per_sample.to(acc).mean(0))


def _rows(input: torch.Tensor, normalized_shape, name: str) -> tuple[tuple[int, ...], int]:
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    try:
        if isinstance(normalized_shape, (str, bytes)):
            raise TypeError
        shape = tuple(int(s) for s in normalized_shape)
    except (TypeError, ValueError):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}") from None
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    k = len(shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k:]) != shape:
        raise ValueError(f"{name}: normalized_shape={list(shape)} must match the trailing dims of "
                         f"input of shape {tuple(input.shape)}")
    return shape, math.prod(shape)


def _last_dims(input, normalized_shape, weight, bias, eps, center, activation, residual, backend, name):
    shape, d = _rows(input, normalized_shape, name)
    lead = input.shape[: input.dim() - len(shape)]
    rows = math.prod(lead)
    per_sample = _per_sample_rows(input, shape, lead, d, weight, bias)
    if per_sample is not None:
        check_tensor("residual", residual, input, tuple(input.shape), same_dtype=True)
        return _sample_rows_norm(input, shape, lead, d, *per_sample, eps, center, activation, residual, backend)
    weight, bias = _broadcast_rows(input, shape, rows, d, weight, bias)
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (rows, d):
            check_tensor(arg, t, input, shape)
    check_tensor("residual", residual, input, tuple(input.shape), same_dtype=True)
    # The transformer case: rows of a (B, T, D) tensor are a 2-D (rows, D) input whose
    # "channel" axis is D, normalized over C with an elementwise affine.
    x2 = input.reshape(rows, d)
    r2 = residual.reshape(rows, d) if residual is not None else None
    y = norm(x2, "C", weight=_row_param(weight, shape, d),
             bias=_row_param(bias, shape, d), eps=eps, center=center,
             activation=activation, residual=r2, training=False, backend=backend)
    y = y.reshape(input.shape)
    if not center and not input.is_contiguous():
        # torch's rms_norm is elementwise ops, which keep a dense input's layout (channels_last
        # included); layer_norm's output is contiguous, as here.
        y = torch.empty_like(input).copy_(y)
    return y


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, activation=None,
               residual=None, backend=None):
    """``F.layer_norm``: normalize the trailing ``normalized_shape`` with an elementwise affine."""
    return _last_dims(input, normalized_shape, weight, bias, eps, True, activation, residual,
                      backend, "layer_norm")


def rms_norm(input, normalized_shape, weight=None, eps=None, *, activation=None, residual=None,
             backend=None):
    """``F.rms_norm``: ``x / sqrt(mean(x^2) + eps) * weight`` over the trailing dims.

    ``eps=None`` means ``torch.finfo(input.dtype).eps``, as in PyTorch.
    """
    if eps is None and isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = torch.finfo(input.dtype).eps
    return _last_dims(input, normalized_shape, weight, None, eps, False, activation, residual,
                      backend, "rms_norm")


# --- Pre-norm residual: (y, h) with h = input + residual, y = norm(h) (tritonorm.add_norm) -------


def _add_last_dims(input, residual, normalized_shape, weight, bias, eps, center, activation, backend,
                   residual_dtype, name):
    from .prenorm import add_norm, check_add_args

    shape, d = _rows(input, normalized_shape, name)
    check_add_args(input, residual, residual_dtype)
    lead = input.shape[: input.dim() - len(shape)]
    rows = math.prod(lead)
    per_sample = _per_sample_rows(input, shape, lead, d, weight, bias)
    if per_sample is not None:  # adaLN: (N, T, D) over its last axis, the parameters read in place
        x3 = input.reshape(lead[0], -1, d)
        y, h = add_norm(x3, residual.reshape(x3.shape), "L", weight=per_sample[0], bias=per_sample[1], eps=eps,
                        center=center, activation=activation, training=False, backend=backend,
                        residual_dtype=residual_dtype)
        return y.reshape(input.shape), h.reshape(input.shape)
    weight, bias = _broadcast_rows(input, shape, rows, d, weight, bias)
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (rows, d):
            check_tensor(arg, t, input, shape)
    y, h = add_norm(input.reshape(rows, d), residual.reshape(rows, d), "C",
                    weight=_row_param(weight, shape, d),
                    bias=_row_param(bias, shape, d), eps=eps, center=center, activation=activation,
                    training=False, backend=backend, residual_dtype=residual_dtype)
    return y.reshape(input.shape), h.reshape(input.shape)


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, activation=None,
                   residual_dtype=None, backend=None):
    """``(y, h)``: ``h = input + residual`` (in ``residual_dtype``, default input's), ``y =
    layer_norm(h)``; one kernel each way (see tritonorm.add_norm)."""
    return _add_last_dims(input, residual, normalized_shape, weight, bias, eps, True, activation, backend,
                          residual_dtype, "add_layer_norm")


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, *, activation=None,
                 residual_dtype=None, backend=None):
    """``(y, h)``: ``h = input + residual``, ``y = rms_norm(h)`` (vLLM's fused_add_rms_norm);
    ``eps=None`` means ``torch.finfo(input.dtype).eps``."""
    if eps is None and isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = torch.finfo(input.dtype).eps
    return _add_last_dims(input, residual, normalized_shape, weight, None, eps, False, activation, backend,
                          residual_dtype, "add_rms_norm")


# --- Broadcast (adaptive) affine for the row norms ----------------------------------------------


def _per_sample_rows(input, shape, lead, d, weight, bias):
    """adaLN: (weight, bias) as (N, 1, D) or (1, 1, D) tensors when at least one is per sample,
    (N, 1, ..., 1, *normalized_shape) for leading dims (N, ...), and each other one is such, per
    row (1, ..., 1, *normalized_shape) or ``normalized_shape`` itself; else None (the expansion
    of ``_broadcast_rows`` handles every other broadcast shape). The input is then viewed as
    (N, T, D) and normalized over its last axis, the parameters read in place by the kernels
    where the plan allows (core._row_affine)."""
    if len(lead) < 2 or input.numel() == 0:
        return None
    k, N = len(shape), lead[0]
    out, sample = [], False
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            out.append(None)
            continue
        if not isinstance(t, torch.Tensor):
            return None
        if tuple(t.shape) == shape:
            out.append(t.reshape(1, 1, d))
            continue
        if t.dim() != input.dim() or tuple(t.shape[t.dim() - k:]) != shape or any(s != 1 for s in t.shape[1:-k]):
            return None
        if t.shape[0] != 1 and (t.shape[0] != N or N == 1):
            return None
        check_tensor(name, t, input)  # floating point, x's device (the norm checks the rest)
        sample = sample or t.shape[0] != 1
        out.append(t.reshape(t.shape[0], 1, d))
    return out if sample else None


def _sample_rows_norm(input, shape, lead, d, weight, bias, eps, center, activation, residual, backend):
    """``norm`` of the input viewed as (N, T, D) over its last axis ("L") with ``_per_sample_rows``'
    parameters, in the input's shape."""
    N = lead[0]
    x3 = input.reshape(N, -1, d)
    r3 = residual.reshape(x3.shape) if residual is not None else None
    y = norm(x3, "L", weight=weight, bias=bias, eps=eps, center=center, activation=activation, residual=r3,
             training=False, backend=backend).reshape(input.shape)
    if not center and not input.is_contiguous():
        y = torch.empty_like(input).copy_(y)  # as _last_dims: torch's rms_norm keeps the layout
    return y


def _row_param(t, shape, d):
    """A normalized-shape parameter flattened to (D,); a broadcast one, (rows, D), as it is."""
    return t.reshape(d) if t is not None and tuple(t.shape) == shape else t


def _broadcast_rows(input, shape, rows, d, weight, bias):
    """A weight or bias that is not ``normalized_shape`` but broadcastable to the input (a
    per-position (1, T, D) one for a (N, T, D) input; adaLN's (N, 1, D) where _per_sample_rows
    does not take it) as a (rows, D) tensor, one row per normalized row; a (1, ..., 1,
    *normalized_shape) one as ``normalized_shape`` (a view: the same for every row);
    ``normalized_shape``-shaped ones are returned as they are."""
    out = []
    k = len(shape)
    for name, t in (("weight", weight), ("bias", bias)):
        if isinstance(t, torch.Tensor) and tuple(t.shape) != shape and t.dim() == input.dim():
            if not broadcasts_to(t, input.shape):
                raise ValueError(f"{name} must have the normalized shape {list(shape)} or be broadcastable "
                                 f"to the input's shape {tuple(input.shape)}, got {tuple(t.shape)}")
            check_tensor(name, t, input)
            if tuple(t.shape[t.dim() - k:]) == shape and all(s == 1 for s in t.shape[:t.dim() - k]):
                t = t.reshape(shape)
            else:
                t = t.expand(input.shape).reshape(rows, d)
        out.append(t)
    return out
