"""``tritonorm.orthogonalize``: argument checks and dispatch (ALGORITHMS §1-2)."""

from __future__ import annotations

import math
import warnings

import torch

from .. import backend as _backend
from . import ops, reference

METHODS = ("newton_schulz", "eigen")


def check_common(*, iters: int, eps: float, group_size: int | None = None, iters_name: str = "iters") -> None:
    """Checks shared by ``orthogonalize`` and the modules; raises before anything is computed.
    ``iters_name`` is what the caller calls the iteration count (IterNorm: ``T``)."""
    if isinstance(iters, bool) or not isinstance(iters, int):
        raise TypeError(f"{iters_name} must be an int, got {type(iters).__name__}")
    if iters < 1:
        raise ValueError(f"{iters_name} must be >= 1, got {iters}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")


def check_method(method: str, allowed: tuple[str, ...] = METHODS) -> str:
    if not isinstance(method, str) or method not in allowed:
        raise ValueError(f"method={method!r} is not a method; expected one of {', '.join(allowed)}")
    return method


def warn_if_not_orthonormal(group_size: int, row_length: int) -> None:
    """Rows are centred, so a group spans at most d − 1 dimensions: with ``group_size >= d`` its
    rows cannot be orthonormal and the eps term dominates the result. A warning, not an error,
    because the references allow it (and a scale-only use of such a layer may be intended)."""
    if group_size >= row_length:
        warnings.warn(
            f"group_size={group_size} >= row length {row_length}: centred rows of length "
            f"{row_length} span at most {row_length - 1} dimensions, so a group this large cannot be "
            "orthonormal; use groups of at most row length - 1 rows",
            UserWarning, stacklevel=3)


def orthogonalize(weight: torch.Tensor, *, method: str = "newton_schulz", group_size: int | None = None,
                  iters: int = 5, eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """Orthogonalize the rows of ``weight`` per group (OLM/OWN with ``"eigen"``, ONI with ``"newton_schulz"``).

    ``weight``: (out, *rest), 2-D or more, floating point; flattened to Z of shape (out, d),
    d = prod(rest), in C order. Rows form contiguous groups of ``group_size`` (default: one group
    of all rows; the last group may be smaller). Per group, rows are centred, ``S = Zc·Zcᵀ + eps·I``:

    - ``"eigen"``: ``W = S^{-1/2}·Zc`` by ``torch.linalg.eigh`` (backward finite for close eigenvalues);
    - ``"newton_schulz"``: ``S_N = S/‖S‖_F``, ``B₀ = I``, ``B_t = 1.5·B_{t−1} − 0.5·B_{t−1}³·S_N``
      for ``iters`` steps, ``W = B_T·Zc/√‖S‖_F``.

    Returns a tensor of ``weight``'s shape and dtype, differentiable with respect to ``weight``.
    Computed in fp32 for fp16/bf16 (float64 stays float64, on the reference path).

    Raises ValueError/TypeError naming the argument on bad input, FloatingPointError when the result
    is not finite or the Newton iteration diverged (``ops.diverged``), and warns when ``group_size >= d`` (see
    ``warn_if_not_orthonormal``).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (out, in, ...), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got dtype {weight.dtype}")
    check_method(method)
    check_common(iters=iters, eps=eps, group_size=group_size)
    path = _backend.resolve(backend, weight.device, weight.dtype)

    rows = weight.shape[0]
    d = weight[0].numel() if rows else 0
    size = min(group_size or rows, rows) if rows else 1
    if rows and d:
        warn_if_not_orthonormal(size, d)
    if weight.numel() == 0:
        return weight.clone()

    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    z = weight.reshape(rows, d).to(acc)
    parts, bad = [], []
    for start, count, gsize in reference.chunks(rows, size):
        zg = z[start:start + count * gsize].reshape(count, gsize, d)
        w, b = _orth_batch(zg, method, iters, eps, use_triton=path == "triton")
        parts.append(w.reshape(-1, d))
        if b is not None:
            bad.append(ops.diverged(b.detach()))
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    bad.append(ops.nonfinite(out.detach()))
    ops.raise_if(torch.stack(bad).any(), f"orthogonalize(method={method!r}, iters={iters})")
    return out.reshape(weight.shape).to(weight.dtype)


def _orth_batch(z: torch.Tensor, method: str, iters: int, eps: float, use_triton: bool):
    """One batch of equal-size groups, z (G, n, d) → ``(W, B_T)``: W (G, n, d), and the Newton
    iterate (G, n, n) for the divergence check (None for ``"eigen"``).

    The Gram matrix and the final product are batched matmuls (cuBLAS is already good at them);
    what the kernel fuses is the T-step iteration on the small matrices, ~3T launches on eager.
    """
    zc = z - z.mean(dim=-1, keepdim=True)
    s = reference.gram(zc, eps)
    if method == "eigen":
        return torch.matmul(reference.inv_sqrt_eigh(s, floor=eps), zc), None
    c = torch.linalg.matrix_norm(s)[:, None, None]
    b = ops.newton_isqrt(s / c, iters, use_triton)
    return torch.matmul(b, zc) / c.sqrt(), b
