"""Argument checks for tritonorm.norm and the functionals.

Everything is checked before anything runs, so a failing call changes nothing (running
statistics included). Messages name the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import activations
from .scope import Spec, parse


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t, x: torch.Tensor, shape=None, allow_none: bool = True,
                 same_dtype: bool = False) -> None:
    if t is None:
        if not allow_none:
            raise ValueError(f"{name} is required")
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_dtype_name(t.dtype)}")
    if same_dtype and t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {_dtype_name(x.dtype)}, got {_dtype_name(t.dtype)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def broadcasts_to(t: torch.Tensor, shape) -> bool:
    """Whether ``t`` broadcasts to exactly ``shape`` (a broadcast / adaptive affine parameter).
    Compared size by size rather than by catching torch.broadcast_shapes' error, which
    torch.compile cannot trace (an exception inside a compiled region is a graph break)."""
    if t.dim() > len(shape):
        return False
    return all(a == 1 or a == b for a, b in zip(t.shape[::-1], tuple(shape)[::-1]))


def check_number(name: str, value, lo=None, hi=None, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument is
    # symbolic, and Dynamo traces comparisons (as guards) but not math.isfinite. NaN fails both.
    if not -math.inf < v < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return v


def _self_overlapping(t: torch.Tensor) -> bool:
    """True when two elements of t share memory. With the dims of size > 1 sorted by stride,
    t is free of overlap when each stride exceeds the span of the dims before it (a stride-0
    dim, as in an expanded view, never does)."""
    span = 0
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def _element_offsets(t: torch.Tensor) -> torch.Tensor:
    """Storage offsets (in elements) of every element of t."""
    off = torch.tensor(t.storage_offset())
    for size, stride in zip(t.shape, t.stride()):
        off = off[..., None] + torch.arange(size) * stride
    return off.reshape(-1)


def _share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.element_size() != b.element_size():
        return True  # views of one storage under different dtypes: assume the worst
    return bool(torch.isin(_element_offsets(a), _element_offsets(b)).any())


def check_running_buffers(running_mean, running_var) -> None:
    """Running statistics are updated in place, element by element: reject buffers where two
    elements share memory (expanded views, stride 0) or where the two buffers share elements,
    before anything runs. Otherwise the update would fail half-way (after running_mean was
    changed) or silently write one statistic over the other. Assumes both passed check_tensor.
    Under torch.compile (module buffers, whose layout the eager path checks) it is skipped: storage
    pointers cannot be traced."""
    if torch.compiler.is_compiling():
        return
    bufs = [(n, t) for n, t in (("running_mean", running_mean), ("running_var", running_var))
            if t is not None and t.numel() > 0]
    for name, t in bufs:
        if _self_overlapping(t):
            raise ValueError(f"{name} must not have elements that share memory (an expanded view: "
                             f"stride {tuple(t.stride())} for shape {tuple(t.shape)}); it is updated "
                             f"in place, so pass a tensor of its own, e.g. {name}.clone()")
    if len(bufs) == 2 and _share_memory(bufs[0][1], bufs[1][1]):
        raise ValueError("running_mean and running_var must not share memory: both are updated in place")


def check_norm_args(x, scope, num_groups, weight, bias, eps, center, activation, residual,
                    running_mean, running_var, momentum, training,
                    sample_groups=1) -> tuple[Spec, str | None]:
    """Validate a tritonorm.norm call; return the parsed scope and activation name."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got {_dtype_name(x.dtype)}")
    spec = parse(scope, x.dim(), num_groups, channels=x.shape[1] if x.dim() >= 2 else None,
                 sample_groups=sample_groups, batch=x.shape[0] if x.dim() >= 2 else None)
    c = x.shape[1]
    check_tensor("weight", weight, x, (c,))
    check_tensor("bias", bias, x, (c,))
    check_tensor("residual", residual, x, tuple(x.shape), same_dtype=True)
    act = activations.check(activation)
    check_number("eps", eps, lo=0.0, lo_open=True)
    if training and (running_mean is not None or running_var is not None):
        # Only read when running statistics are updated; torch ignores it otherwise.
        check_number("momentum", momentum, lo=0.0, hi=1.0)
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {type(center).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if running_mean is not None or running_var is not None:
        if not spec.allows_running_stats:
            raise ValueError(
                f"running statistics need a scope that reduces N and every spatial axis "
                f"({'N' + spec.spatial}); scope {scope!r} reduces {spec.letters}")
        n_stats = math.prod(spec.running_shape(x.shape))
        if center:
            if running_mean is None or running_var is None:
                raise ValueError("running_mean and running_var must be given together")
        elif running_mean is not None:
            raise ValueError("running_mean must be None with center=False "
                             "(running_var then tracks the mean square)")
        check_tensor("running_mean", running_mean, x, (n_stats,))
        check_tensor("running_var", running_var, x, (n_stats,))
        if training:  # eval only reads them
            check_running_buffers(running_mean, running_var)
    if training and center and x.numel() > 0 and spec.count(x.shape) == 1:
        raise ValueError(
            f"each statistic of scope {spec.letters!r} covers a single value for x of shape "
            f"{tuple(x.shape)}; expected more than 1 value per statistic in training")
    return spec, act
