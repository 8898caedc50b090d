"""Launchers, registered ops and autograd for the batched Newton-Schulz inverse square root.

Layers: ``_newton_fwd_kernel`` → ``newton_fwd()`` launcher → ``tritonorm::orth_newton_fwd`` op
(with a fake implementation, so ``torch.compile`` traces through it) → autograd chaining it to
``tritonorm::orth_newton_bwd`` → ``newton_isqrt()``, which also picks the batched-matmul path for
groups too large to keep on chip.
"""

from __future__ import annotations

import torch

from . import reference

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


@torch.library.custom_op("tritonorm::orth_newton_fwd", mutates_args=())
def _newton_fwd_op(sn: torch.Tensor, iters: int, save_history: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return newton_fwd(sn, iters, save_history)


@_newton_fwd_op.register_fake
def _(sn, iters, save_history):
    g, n, _ = sn.shape
    return torch.empty_like(sn), sn.new_empty((g, iters, n, n) if save_history else (0,))


@torch.library.custom_op("tritonorm::orth_newton_bwd", mutates_args=())
def _newton_bwd_op(sn: torch.Tensor, hist: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    return newton_bwd(sn, hist, db)


@_newton_bwd_op.register_fake
def _(sn, hist, db):
    return torch.empty_like(sn)


def _setup_context(ctx, inputs, output):
    sn, _, _ = inputs
    _, hist = output
    ctx.save_for_backward(sn, hist)


def _backward(ctx, db, _dhist):
    sn, hist = ctx.saved_tensors
    if hist.numel() == 0 and sn.numel() != 0:
        raise RuntimeError("orth_newton_fwd ran without saving its history; its backward cannot run")
    return _newton_bwd_op(sn, hist, db.contiguous()), None, None


_newton_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def newton_isqrt(sn: torch.Tensor, iters: int, use_triton: bool) -> torch.Tensor:
    """``B_T(S_N)`` ≈ ``S_N^{-1/2}`` for (G, n, n) ``sn`` (fp32 or float64), differentiable.

    The fused kernel runs when ``use_triton`` and n <= MAX_FUSED_ROWS and the dtype is fp32;
    otherwise the batched-matmul reference iteration runs (autograd through torch.matmul).
    """
    if not use_triton or sn.shape[-1] > MAX_FUSED_ROWS or sn.dtype != torch.float32:
        return reference.newton_iterate(sn, iters)
    save = torch.is_grad_enabled() and sn.requires_grad
    b, _ = _newton_fwd_op(sn.contiguous(), iters, save)
    return b


# Relative asymmetry of B_T above which the iteration is declared diverged. In exact arithmetic
# B_T is a polynomial in the symmetric S_N, hence symmetric; the uncoupled iteration amplifies the
# rounding errors that break this, geometrically in T on ill-conditioned groups (ALGORITHMS §2), and
# the result turns to finite garbage several steps before it turns to inf/NaN. Measured (fp32,
# randn 32×64 and 16×17 groups): below 2e-4 while B_T agrees with float64, 2e-2..2 once the
# orthogonality error is 100× float64's. So 1e-3 flags errors of roughly 0.1% of B_T and up.
ASYMMETRY_LIMIT = 1e-3


def diverged(b: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: some group's ``B_T`` (G, n, n) is non-finite or visibly asymmetric."""
    asym = (b - b.transpose(-1, -2)).abs().amax(dim=(-1, -2))
    size = b.abs().amax(dim=(-1, -2))
    return ~(asym <= ASYMMETRY_LIMIT * size).all()  # NaN compares False: counted as diverged


def nonfinite(t: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(t).all()


def raise_if(bad: torch.Tensor, what: str) -> None:
    """Raise FloatingPointError if the 0-dim bool ``bad`` is set: a result must never be returned
    silently as garbage.

    This reads one flag back to the host (a sync); it is skipped while ``torch.compile`` traces or
    a CUDA graph captures, where a sync is not allowed.
    """
    if torch.compiler.is_compiling():
        return
    if bad.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if bool(bad):
        raise FloatingPointError(
            f"{what} produced a non-finite or diverged result: the Newton-Schulz iteration is "
            "unstable on ill-conditioned groups at large iteration counts (or the input is not "
            "finite). Use fewer iters, a larger eps, smaller groups, or method='eigen'."
        )
