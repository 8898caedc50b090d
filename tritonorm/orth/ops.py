"""Launchers, registered ops and autograd for the batched Newton-Schulz inverse square root.

Layers: ``_newton_fwd_kernel`` → ``newton_fwd()`` launcher → ``tritonorm::orth_newton_fwd`` op
(with a fake implementation, so ``torch.compile`` traces through it) → autograd chaining it to
``tritonorm::orth_newton_bwd`` → ``newton_isqrt()``, which also picks the batched-matmul path for
groups too large to keep on chip. Both paths replace a diverged group's result by a fallback on the
device (``_guard``) and report it in a flag tensor: no host read anywhere.
"""

from __future__ import annotations

import torch

# Largest group the fused kernel keeps on chip. The backward holds about eight BLOCK_N² fp32
# matrices live per program: at 64 that is 128 KiB across a CTA's registers, the most that fits
# without spilling; at 128 it would be 512 KiB. Not yet tuned on a GPU (benchmarks/bench_orth.py
# measures both paths on the same shapes, which is how this threshold should be revisited).
MAX_FUSED_ROWS = 64


def _block_n(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _num_warps(block_n: int) -> int:
    return 4 if block_n <= 32 else 8


def newton_fwd(sn: torch.Tensor, iters: int, save_history: bool, b: torch.Tensor | None = None,
               hist: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on contiguous fp32 ``sn`` (G, n, n); returns ``(B_T, history)``.

    ``history`` is (G, iters, n, n), or an empty tensor when ``save_history`` is False. ``b`` and
    ``hist`` are optional preallocated outputs (the tests pass NaN-filled ones).
    """
    from .kernels import _newton_fwd_kernel

    groups, n, _ = sn.shape
    b = torch.empty_like(sn) if b is None else b
    if hist is None:
        hist = sn.new_empty((groups, iters, n, n) if save_history else (0,))
    if groups:
        block = _block_n(n)
        _newton_fwd_kernel[(groups,)](sn, b, hist if save_history else b, n, iters,
                                      SAVE_HISTORY=save_history, BLOCK_N=block,
                                      num_warps=_num_warps(block))
    return b, hist


def newton_bwd(sn: torch.Tensor, hist: torch.Tensor, db: torch.Tensor,
               dsn: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the backward: ``dL/dS_N`` (G, n, n) from ``dL/dB_T`` and the forward's history
    (all contiguous fp32); ``dsn`` is an optional preallocated output."""
    from .kernels import _newton_bwd_kernel

    groups, n, _ = sn.shape
    dsn = torch.empty_like(sn) if dsn is None else dsn
    if groups:
        block = _block_n(n)
        _newton_bwd_kernel[(groups,)](sn, hist, db, dsn, n, hist.shape[1], BLOCK_N=block,
                                      num_warps=_num_warps(block))
    return dsn


# ---------------------------------------------------------------------------------------------
# Divergence: detected and replaced per group on the device, never read back to the host.

# Relative asymmetry of B_T above which the iteration is declared diverged. In exact arithmetic
# B_T is a polynomial in the symmetric S_N, hence symmetric; the uncoupled iteration amplifies the
# rounding errors that break this, geometrically in T on ill-conditioned groups (ALGORITHMS §2), and
# the result turns to finite garbage several steps before it turns to inf/NaN. Measured (fp32,
# randn 32×64 and 16×17 groups): below 2e-4 while B_T agrees with float64, 2e-2..2 once the
# orthogonality error is 100× float64's. So 1e-3 flags errors of roughly 0.1% of B_T and up.
ASYMMETRY_LIMIT = 1e-3


def diverged_groups(b: torch.Tensor) -> torch.Tensor:
    """(G,) bool: group g's ``B_T`` (G, n, n) is non-finite or visibly asymmetric."""
    asym = (b - b.transpose(-1, -2)).abs().amax(dim=(-1, -2))
    size = b.abs().amax(dim=(-1, -2))
    return ~(asym <= ASYMMETRY_LIMIT * size)  # NaN compares False: counted as diverged


def nonfinite_groups(t: torch.Tensor) -> torch.Tensor:
    """(G,) bool: some entry of group g of ``t`` (G, ...) is inf or NaN."""
    return ~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)


def fallback_isqrt(sn: torch.Tensor) -> torch.Tensor:
    """The fallback for a diverged group: ``diag(S_N)^{-1/2}``, the diagonal (Jacobi) approximation
    of ``S_N^{-1/2}``. Orthogonalization then degrades to centred rows scaled to unit norm (up to
    eps), whitening to standardization of each channel: finite and well-defined for any finite
    input, as cheap as a few elementwise ops, and differentiable."""
    return torch.diag_embed(sn.diagonal(dim1=-2, dim2=-1).rsqrt())


def _guard(sn: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, bad)``: ``B_T`` with every diverged group replaced by ``fallback_isqrt``, and the flags."""
    bad = diverged_groups(b)
    return torch.where(bad[:, None, None], fallback_isqrt(sn), b), bad


def _guard_backward(sn: torch.Tensor, db: torch.Tensor, dsn_newton: torch.Tensor,
                    bad: torch.Tensor) -> torch.Tensor:
    """``dL/dS_N`` of ``_guard``'s B: the Newton gradient on kept groups, the fallback's on the
    others. Selected, not added: a group that blew up to inf has inf in its saved iterates, and
    its Newton gradient (0·inf) is NaN even though its upstream gradient is zero."""
    d = sn.diagonal(dim1=-2, dim2=-1)
    dfb = torch.diag_embed(-0.5 * d.rsqrt() / d * db.diagonal(dim1=-2, dim2=-1))
    return torch.where(bad[:, None, None], dfb, dsn_newton)


# ---------------------------------------------------------------------------------------------
# The fused path: registered ops (so torch.compile traces through them) chained by autograd.


@torch.library.custom_op("tritonorm::orth_newton_fwd", mutates_args=())
def _newton_fwd_op(sn: torch.Tensor, iters: int, save_history: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, history, bad)``: ``B_T`` guarded per group (see ``_guard``), the iterates for the
    backward, and the (G,) diverged flags."""
    b, hist = newton_fwd(sn, iters, save_history)
    b, bad = _guard(sn, b)
    return b, hist, bad


@_newton_fwd_op.register_fake
def _(sn, iters, save_history):
    g, n, _ = sn.shape
    return (torch.empty_like(sn), sn.new_empty((g, iters, n, n) if save_history else (0,)),
            sn.new_empty((g,), dtype=torch.bool))


@torch.library.custom_op("tritonorm::orth_newton_bwd", mutates_args=())
def _newton_bwd_op(sn: torch.Tensor, hist: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    return newton_bwd(sn, hist, db)


@_newton_bwd_op.register_fake
def _(sn, hist, db):
    return torch.empty_like(sn)


def _setup_context(ctx, inputs, output):
    sn, _, _ = inputs
    _, hist, bad = output
    ctx.save_for_backward(sn, hist, bad)


def _backward(ctx, db, _dhist, _dbad):
    sn, hist, bad = ctx.saved_tensors
    if hist.numel() == 0 and sn.numel() != 0:
        raise RuntimeError("orth_newton_fwd ran without saving its history; its backward cannot run")
    db = db.contiguous()
    dsn = _newton_bwd_op(sn, hist, torch.where(bad[:, None, None], 0.0, db))
    return _guard_backward(sn, db, dsn, bad), None, None


_newton_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The batched-matmul path (large groups, float64, no Triton): the same contract in PyTorch.


def _reverse_steps(sn: torch.Tensor, hist: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``dL/dS_N`` from ``dL/dB_T`` through the saved iterates, the kernel's backward in torch ops."""
    ds = torch.zeros_like(sn)
    for t in reversed(range(hist.shape[1])):
        b = hist[:, t]
        p = torch.matmul(b, b)
        ds = ds - 0.5 * torch.matmul(torch.matmul(p, b).transpose(-1, -2), h)
        acc = torch.matmul(h, torch.matmul(p, sn).transpose(-1, -2))
        acc = acc + torch.matmul(torch.matmul(b.transpose(-1, -2), h), torch.matmul(b, sn).transpose(-1, -2))
        acc = acc + torch.matmul(torch.matmul(p.transpose(-1, -2), h), sn.transpose(-1, -2))
        h = 1.5 * h - 0.5 * acc
    return ds


class _NewtonBatched(torch.autograd.Function):
    """``reference.newton_iterate`` guarded like the fused op, with the reverse steps as backward
    (autograd through the loop would meet the same 0·inf as the kernel on a blown-up group)."""

    @staticmethod
    def forward(ctx, sn: torch.Tensor, iters: int):
        b = torch.eye(sn.shape[-1], dtype=sn.dtype, device=sn.device).expand_as(sn)
        hist = []
        for _ in range(iters):
            hist.append(b)
            b3 = torch.matmul(torch.matmul(b, b), b)
            b = 1.5 * b - 0.5 * torch.matmul(b3, sn)
        b, bad = _guard(sn, b)
        ctx.save_for_backward(sn, torch.stack(hist, dim=1), bad)
        ctx.mark_non_differentiable(bad)
        return b, bad

    @staticmethod
    def backward(ctx, db, _dbad):
        sn, hist, bad = ctx.saved_tensors
        dsn = _reverse_steps(sn, hist, torch.where(bad[:, None, None], 0.0, db))
        return _guard_backward(sn, db, dsn, bad), None


def newton_isqrt(sn: torch.Tensor, iters: int, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, bad)`` for (G, n, n) ``sn`` (fp32 or float64): ``B_T(S_N)`` ≈ ``S_N^{-1/2}`` where the
    iteration held, ``fallback_isqrt(S_N)`` for the groups flagged in the (G,) bool ``bad``
    (``diverged_groups``). Differentiable; nothing is read back to the host.

    The fused kernel runs when ``use_triton`` and n <= MAX_FUSED_ROWS and the dtype is fp32;
    otherwise the same iteration runs as batched matmuls.
    """
    if not use_triton or sn.shape[-1] > MAX_FUSED_ROWS or sn.dtype != torch.float32:
        return _NewtonBatched.apply(sn, iters)
    save = torch.is_grad_enabled() and sn.requires_grad
    b, _, bad = _newton_fwd_op(sn.contiguous(), iters, save)
    return b, bad
