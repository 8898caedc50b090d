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
                  iters: int = 5, eps: float = 1e-5, backend: str = "auto",
                  events: torch.Tensor | None = None) -> torch.Tensor:
    """Orthogonalize the rows of ``weight`` per group (OLM/OWN with ``"eigen"``, ONI with ``"newton_schulz"``).

    ``weight``: (out, *rest), 2-D or more, floating point; flattened to Z of shape (out, d),
    d = prod(rest), in C order. Rows form contiguous groups of ``group_size`` (default: one group
    of all rows; the last group may be smaller). Per group, rows are centred, ``S = Zc·Zcᵀ + eps·I``:

    - ``"eigen"``: ``W = S^{-1/2}·Zc`` by ``torch.linalg.eigh`` (backward finite for close eigenvalues);
    - ``"newton_schulz"``: ``S_N = S/‖S‖_F``, ``B₀ = I``, ``B_t = 1.5·B_{t−1} − 0.5·B_{t−1}³·S_N``
      for ``iters`` steps, ``W = B_T·Zc/√‖S‖_F``.

    Returns a tensor of ``weight``'s shape and dtype, differentiable with respect to ``weight``.
    Computed in fp32 for fp16/bf16 (float64 stays float64, on the reference path).

    Numerical failures are handled on the device, with no host read (docs/orthogonalization.md):
    a group whose Newton iterate diverged (``ops.diverged_groups``) gets the fallback
    ``W = diag(S)^{-1/2}·Zc`` (its centred rows scaled to unit norm) instead; a group with
    non-finite input comes out NaN. ``events``, if given, is an int64 tensor of shape (2,) on
    ``weight``'s device to which the call adds ``[groups that fell back, groups returned
    non-finite]``; read it with ``event_counts``/``check`` when you choose to. The modules own
    such a buffer (``orth_events``).

    Raises ValueError/TypeError naming the argument on bad input, and warns when
    ``group_size >= d`` (see ``warn_if_not_orthonormal``).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (out, in, ...), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got dtype {weight.dtype}")
    check_method(method)
    check_common(iters=iters, eps=eps, group_size=group_size)
    check_events(events, weight.device)
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
    parts, fell_back, nonfinite = [], [], []
    for start, count, gsize in reference.chunks(rows, size):
        zg = z[start:start + count * gsize].reshape(count, gsize, d)
        w, bad = _orth_batch(zg, method, iters, eps, use_triton=path == "triton")
        parts.append(w.reshape(-1, d))
        if events is not None:
            fell_back.append(bad.sum())
            nonfinite.append(ops.nonfinite_groups(w.detach()).sum())
    if events is not None:
        with torch.no_grad():
            events.add_(torch.stack([sum(fell_back), sum(nonfinite)]))
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out.reshape(weight.shape).to(weight.dtype)


def _orth_batch(z: torch.Tensor, method: str, iters: int, eps: float, use_triton: bool):
    """One batch of equal-size groups, z (G, n, d) → ``(W, bad)``: W (G, n, d), and the (G,) bool
    flags of the groups whose Newton iterate was replaced by the fallback (all False for eigen).

    The Gram matrix and the final product are batched matmuls (cuBLAS is already good at them);
    what the kernel fuses is the T-step iteration on the small matrices, ~3T launches on eager.
    """
    zc = z - z.mean(dim=-1, keepdim=True)
    s = reference.gram(zc, eps)
    if method == "eigen":
        p, ok = eigen_isqrt(s, eps)
        w = torch.where(ok[:, None, None], torch.matmul(p, zc), torch.nan)
        return w, torch.zeros_like(ok)
    c = torch.linalg.matrix_norm(s)[:, None, None]
    b, bad = ops.newton_isqrt(s / c, iters, use_triton)
    return torch.matmul(b, zc) / c.sqrt(), bad


def eigen_isqrt(s: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S^{-1/2}, ok)`` for (G, n, n) ``s`` by eigendecomposition, with ``ok`` (G,) False where
    ``s`` has a non-finite entry. Such a group is decomposed as the identity instead, so that
    ``eigh`` never sees inf/NaN (CPU LAPACK refuses it; a GPU solver returns garbage): the
    caller marks its result NaN with ``ok``, on the device."""
    ok = ~ops.nonfinite_groups(s)
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    return reference.inv_sqrt_eigh(torch.where(ok[:, None, None], s, eye), floor=eps), ok


# ---------------------------------------------------------------------------------------------
# Event counters: written on the device by every forward, read on the host only when asked.

EVENTS = ("fallbacks", "nonfinite")


def new_events(device=None) -> torch.Tensor:
    """A zeroed counter tensor for ``orthogonalize(events=...)``: int64 (2,), ``[fallbacks, nonfinite]``."""
    return torch.zeros(len(EVENTS), dtype=torch.int64, device=device)


def check_events(events, device: torch.device) -> None:
    if events is None:
        return
    if not isinstance(events, torch.Tensor) or events.dtype != torch.int64 or events.shape != (len(EVENTS),):
        raise TypeError(f"events must be an int64 tensor of shape ({len(EVENTS)},) "
                        f"(see tritonorm.orth.new_events), got {events!r}")
    if events.device != device:
        raise ValueError(f"events is on {events.device}, weight on {device}: they must share a device")


def _counters(source) -> list[tuple[str, torch.Tensor]]:
    if isinstance(source, torch.Tensor):
        check_events(source, source.device)
        return [("events", source)]
    if isinstance(source, torch.nn.Module):
        return [(name or type(source).__name__, mod.orth_events) for name, mod in source.named_modules()
                if isinstance(getattr(mod, "orth_events", None), torch.Tensor)]
    raise TypeError(f"source must be an nn.Module or an events tensor, got {type(source).__name__}")


def event_counts(source) -> dict[str, int]:
    """Totals of the events counted so far in ``source``: an ``nn.Module`` (summed over every
    submodule with an ``orth_events`` buffer: OrthLinear/OrthConv, IterNorm, DBN) or an events
    tensor. ``{"fallbacks": groups whose Newton-Schulz result diverged and was replaced by the
    fallback, "nonfinite": groups whose result was inf/NaN}``. This reads each counter back (a sync):
    call it when you log, not inside the step."""
    totals = [0] * len(EVENTS)
    for _, t in _counters(source):
        for i, v in enumerate(t.tolist()):
            totals[i] += v
    return dict(zip(EVENTS, totals))


def check(source) -> None:
    """Raise FloatingPointError if ``source`` (a module or an events tensor, as ``event_counts``)
    counted any event, naming each module and its counts; otherwise return None. Reads each
    counter back once (a sync per layer): call it between steps, not inside one.
    The counters are left as they are (``reset_events`` clears them)."""
    found = []
    for name, t in _counters(source):
        counts = t.tolist()
        if any(counts):
            found.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in zip(EVENTS, counts)))
    if found:
        raise FloatingPointError(
            "orthogonalization/whitening events: " + "; ".join(found) + ". A fallback means the "
            "Newton-Schulz iteration diverged on a group (unstable on ill-conditioned groups at "
            "large iteration counts) and that group was orthogonalized by its diagonal instead; use "
            "fewer iters/T, a larger eps, smaller groups, or method='eigen' (DBN). Non-finite means "
            "the input (weight or activations) had inf/NaN.")


def reset_events(source) -> None:
    """Zero the counters of ``source`` (a module or an events tensor), on the device."""
    for _, t in _counters(source):
        t.zero_()
