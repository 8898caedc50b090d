"""Pure-PyTorch references for orthogonalization and whitening (ALGORITHMS §1-4, §8).

Readable and float64-capable: the CPU fallback, the large-group path on GPU (batched matmuls),
the tests' oracle and the benchmarks' eager baseline all come from here.

Shapes: a *row batch* ``Z`` is ``(G, n, d)``: G groups of n rows of length d. Groups of unequal
size are handled by ``chunks`` (all full groups in one batch, the smaller last group in another),
never by padding, because padding rows would change ``tr S`` and ``||S||_F``.

Arguments are assumed valid (``tritonorm.orthogonalize`` and the modules check them).
"""

from __future__ import annotations

import torch


def chunks(rows: int, group_size: int) -> list[tuple[int, int, int]]:
    """Split ``rows`` contiguous rows into groups of ``group_size`` (the last one may be smaller).

    Returns ``(start_row, num_groups, size)`` per batch of equal-size groups: at most two entries.
    """
    full, tail = rows // group_size, rows % group_size  # not divmod: torch.compile cannot trace it
    out = []
    if full:
        out.append((0, full, group_size))
    if tail:
        out.append((full * group_size, 1, tail))
    return out


def gram(zc: torch.Tensor, eps: float, scale: float = 1.0) -> torch.Tensor:
    """``S = scale·Zc·Zcᵀ + eps·I`` for ``zc`` of shape (G, n, d); returns (G, n, n)."""
    s = torch.matmul(zc, zc.transpose(-1, -2))
    if scale != 1.0:
        s = s * scale
    eye = torch.eye(zc.shape[-2], dtype=zc.dtype, device=zc.device)
    return s + eps * eye


def newton_iterate(sn: torch.Tensor, iters: int) -> torch.Tensor:
    """Uncoupled Newton-Schulz: ``B₀ = I``, ``B_t = 1.5·B_{t−1} − 0.5·B_{t−1}³·S_N``.

    ``sn``: (G, n, n) with eigenvalues in (0, 1]. Returns ``B_T`` ≈ ``S_N^{-1/2}``, (G, n, n).
    """
    b = torch.eye(sn.shape[-1], dtype=sn.dtype, device=sn.device).expand_as(sn)
    for _ in range(iters):
        b3 = torch.matmul(torch.matmul(b, b), b)
        b = 1.5 * b - 0.5 * torch.matmul(b3, sn)
    return b


def newton_scalar(lam: torch.Tensor, iters: int) -> torch.Tensor:
    """The same iteration on one eigenvalue: ``b_T(λ)`` (the theory the tests check against)."""
    b = torch.ones_like(lam)
    for _ in range(iters):
        b = 1.5 * b - 0.5 * b**3 * lam
    return b


class _InvSqrtEigh(torch.autograd.Function):
    """``S^{-1/2}`` of symmetric positive definite S by ``torch.linalg.eigh``, with a stable backward.

    Autograd through ``eigh`` divides by ``λᵢ − λⱼ`` and is inf/NaN for repeated eigenvalues. For a
    spectral function f the exact derivative is ``dS = U·(K ∘ Uᵀ·dP·U)·Uᵀ`` with the divided
    difference ``K_ij = (f(λᵢ) − f(λⱼ))/(λᵢ − λⱼ)``; for f = λ^{-1/2} it has the closed form
    ``K_ij = −1 / (√λᵢ·√λⱼ·(√λᵢ + √λⱼ))``, finite for every pair, equal to f'(λᵢ) on the diagonal.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, floor: float) -> torch.Tensor:
        try:
            lam, u = torch.linalg.eigh(s)
        except torch.linalg.LinAlgError as exc:  # CPU LAPACK reports NaN/inf input this way
            raise FloatingPointError(f"eigendecomposition failed (non-finite input?): {exc}") from exc
        # True eigenvalues of Zc·Zcᵀ + eps·I are >= eps; rounding in the solver can push them
        # below (even negative) when eps is small relative to ||S||, so clamp at the floor.
        lam = lam.clamp_min(floor)
        r = lam.rsqrt()
        ctx.save_for_backward(u, lam)
        return torch.matmul(u * r.unsqueeze(-2), u.transpose(-1, -2))

    @staticmethod
    def backward(ctx, dp: torch.Tensor):
        u, lam = ctx.saved_tensors
        rt = lam.sqrt()
        k = -1.0 / (rt.unsqueeze(-1) * rt.unsqueeze(-2) * (rt.unsqueeze(-1) + rt.unsqueeze(-2)))
        ut = u.transpose(-1, -2)
        inner = torch.matmul(torch.matmul(ut, dp), u) * k
        return torch.matmul(torch.matmul(u, inner), ut), None


def inv_sqrt_eigh(s: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """``S^{-1/2}`` for (G, n, n) symmetric positive definite ``s``; eigenvalues clamped at ``floor``."""
    return _InvSqrtEigh.apply(s, floor)


def _orth_group_batch(z: torch.Tensor, method: str, iters: int, eps: float) -> torch.Tensor:
    """Orthogonalize each of the G groups of ``z`` (G, n, d); returns (G, n, d)."""
    zc = z - z.mean(dim=-1, keepdim=True)
    s = gram(zc, eps)
    if method == "eigen":
        return torch.matmul(inv_sqrt_eigh(s, floor=eps), zc)
    c = torch.linalg.matrix_norm(s)  # Frobenius, per group
    b = newton_iterate(s / c[:, None, None], iters)
    return torch.matmul(b, zc) / c.sqrt()[:, None, None]


def orthogonalize(weight: torch.Tensor, method: str = "newton_schulz", group_size: int | None = None,
                  iters: int = 5, eps: float = 1e-5) -> torch.Tensor:
    """Reference of ``tritonorm.orthogonalize``: same shape and dtype as ``weight``.

    ``weight`` (out, *rest) is flattened to (out, d) rows, d = prod(rest), in C order; rows form
    contiguous groups of ``group_size`` (default: all rows). Computed in float32 for fp16/bf16.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    rows = weight.shape[0]
    z = weight.reshape(rows, -1).to(acc)
    parts = []
    for start, count, size in chunks(rows, group_size or rows):
        zg = z[start:start + count * size].reshape(count, size, -1)
        parts.append(_orth_group_batch(zg, method, iters, eps).reshape(count * size, -1))
    return torch.cat(parts).reshape(weight.shape).to(weight.dtype)


def channel_groups(x: torch.Tensor, group_size: int) -> list[tuple[int, int, int, torch.Tensor]]:
    """View activations ``x`` (N, C, *spatial) as per-chunk matrices ``(G, size, m)``, m = N·prod(spatial).

    Returns ``(start_channel, num_groups, size, X)`` per chunk (see ``chunks``).
    """
    xt = x.transpose(0, 1).reshape(x.shape[1], -1)
    return [(start, count, size, xt[start:start + count * size].reshape(count, size, -1))
            for start, count, size in chunks(x.shape[1], group_size)]


def ungroup(parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Inverse of ``channel_groups``: list of (G, size, m) back to (N, C, *spatial)."""
    xt = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])
    return xt.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)


def whitening_matrix(xc: torch.Tensor, method: str, iters: int, eps: float) -> torch.Tensor:
    """Whitening matrix of centred samples ``xc`` (G, n, m): ``Σ = Xc·Xcᵀ/m + eps·I``.

    ``method="newton"`` (IterNorm): ``B_T(Σ/tr Σ)/√tr Σ``; ``"eigen"`` (DBN, ZCA): ``Σ^{-1/2}``.
    Returns (G, n, n).
    """
    sigma = gram(xc, eps, scale=1.0 / xc.shape[-1])
    if method == "eigen":
        return inv_sqrt_eigh(sigma, floor=eps)
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    return newton_iterate(sigma / tr, iters) / tr.sqrt()


def whiten(x: torch.Tensor, group_size: int, method: str, iters: int = 5, eps: float = 1e-5):
    """Training-mode IterNorm/DBN without affine: returns ``(x̂, means, wms)``.

    ``x̂`` has ``x``'s shape; ``means`` and ``wms`` are lists per chunk of (G, size, 1) and
    (G, size, size). Computed in float32 for fp16/bf16 (x̂ returned in ``x.dtype``).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    outs, means, wms = [], [], []
    for _, _, _, xg in channel_groups(x.to(acc), group_size):
        mu = xg.mean(dim=-1, keepdim=True)
        xc = xg - mu
        wm = whitening_matrix(xc, method, iters, eps)
        outs.append(torch.matmul(wm, xc))
        means.append(mu)
        wms.append(wm)
    return ungroup(outs, x.shape).to(x.dtype), means, wms


def centered_weight_norm(v: torch.Tensor, scale: torch.Tensor | float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    """CWN (ALGORITHMS §8): per output row, ``w = scale·(v − mean v)/(‖v − mean v‖ + eps)``.

    ``v``: (out, *rest); ``scale``: a float or a tensor of shape (out,).
    """
    flat = v.reshape(v.shape[0], -1)
    vc = flat - flat.mean(dim=1, keepdim=True)
    w = vc / (torch.linalg.vector_norm(vc, dim=1, keepdim=True) + eps)
    if isinstance(scale, torch.Tensor):
        w = w * scale.reshape(-1, 1).to(w.dtype)
    elif scale != 1.0:
        w = w * scale
    return w.reshape(v.shape)
