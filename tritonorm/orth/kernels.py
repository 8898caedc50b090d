"""Triton kernels for batched Newton-Schulz inverse square roots (ONI, IterNorm).

One program per group holds the group's n×n matrices on chip, padded to BLOCK_N (a power of two
>= 16, the smallest tl.dot tile). Padding is exact: ``S_N`` is zero-padded and ``B₀`` is the
identity on the real rows only, so every padded row and column of ``B_t`` stays exactly zero.

TF32: every ``tl.dot`` uses ``input_precision="ieee"`` (full fp32 products, fp32 accumulation).
The iteration feeds each product back into the next one T times, and TF32's 10-bit mantissa
would put ~1e-3 relative error into ``B_T``, far over the 1e-4 the library promises for fp32.
The matrices are tiny, so the cost of IEEE products is small next to the launch it replaces.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _group_tile(n, BLOCK_N: tl.constexpr):
    """This program's group, and the masked [BLOCK_N, BLOCK_N] offsets of its n x n matrix."""
    g = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n) & (rows[None, :] < n)
    offs = rows[:, None] * n + rows[None, :]
    return g, rows, mask, offs, n * n


@triton.jit
def _newton_fwd_kernel(
    SN,  # (G, n, n) fp32: normalized matrices S_N, eigenvalues in (0, 1]
    B,  # (G, n, n) fp32 out: B_T
    Hist,  # (G, iters, n, n) fp32 out: B_0 .. B_{T-1}, for the backward (unused unless SAVE_HISTORY)
    n,  # rows per group
    iters,  # T, a runtime value: a new T must not recompile
    SAVE_HISTORY: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``B_t = 1.5·B_{t−1} − 0.5·B_{t−1}³·S_N``, ``B₀ = I``, for t = 1..T, one group per program."""
    g, rows, mask, offs, nn = _group_tile(n, BLOCK_N)
    s = tl.load(SN + g * nn + offs, mask=mask, other=0.0)
    b = ((rows[:, None] == rows[None, :]) & mask).to(tl.float32)  # I on the real rows only
    for t in range(iters):
        if SAVE_HISTORY:
            tl.store(Hist + (g * iters + t) * nn + offs, b, mask=mask)
        b2 = tl.dot(b, b, input_precision="ieee")
        b3 = tl.dot(b2, b, input_precision="ieee")
        b = 1.5 * b - 0.5 * tl.dot(b3, s, input_precision="ieee")
    tl.store(B + g * nn + offs, b, mask=mask)


@triton.jit
def _newton_bwd_kernel(
    SN,  # (G, n, n) fp32: the forward's S_N
    Hist,  # (G, iters, n, n) fp32: B_0 .. B_{T-1} saved by the forward
    DB,  # (G, n, n) fp32: dL/dB_T
    DSN,  # (G, n, n) fp32 out: dL/dS_N
    n,  # rows per group
    iters,  # T
    BLOCK_N: tl.constexpr,
):
    """Reverse of the forward's T steps: with H = dL/dB_t and B = B_{t−1}, P = B·B,
    ``dS_N += −0.5·(P·B)ᵀ·H`` and ``dL/dB_{t−1} = 1.5·H − 0.5·(H·(P·S_N)ᵀ + Bᵀ·H·(B·S_N)ᵀ + Pᵀ·H·S_Nᵀ)``.

    The transposes are kept (B and S_N commute only up to rounding) so this is the exact adjoint
    of the fp32 forward, as autograd would compute it.
    """
    g, rows, mask, offs, nn = _group_tile(n, BLOCK_N)
    s = tl.load(SN + g * nn + offs, mask=mask, other=0.0)
    st = tl.trans(s)
    h = tl.load(DB + g * nn + offs, mask=mask, other=0.0)
    ds = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for i in range(iters):
        t = iters - 1 - i
        b = tl.load(Hist + (g * iters + t) * nn + offs, mask=mask, other=0.0)
        bt = tl.trans(b)
        p = tl.dot(b, b, input_precision="ieee")
        pt = tl.trans(p)
        p3t = tl.trans(tl.dot(p, b, input_precision="ieee"))
        ds += -0.5 * tl.dot(p3t, h, input_precision="ieee")
        ps_t = tl.trans(tl.dot(p, s, input_precision="ieee"))
        bs_t = tl.trans(tl.dot(b, s, input_precision="ieee"))
        acc = tl.dot(h, ps_t, input_precision="ieee")
        acc += tl.dot(tl.dot(bt, h, input_precision="ieee"), bs_t, input_precision="ieee")
        acc += tl.dot(tl.dot(pt, h, input_precision="ieee"), st, input_precision="ieee")
        h = 1.5 * h - 0.5 * acc
    tl.store(DSN + g * nn + offs, ds, mask=mask)
