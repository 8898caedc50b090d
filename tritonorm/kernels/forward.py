"""Forward kernels: y = act(w_c * (x - mean) * rstd + b_c + residual), and the statistics.

Regimes (chosen by tritonorm.dispatch):
  fused   one program per BLOCK_P statistics; the whole statistic in registers; x read once.
  looped  one program per BLOCK_P statistics; Chan-merged BLOCK_M tiles, then a second sweep
          applies the epilogue; x read twice.
  split   partial moments of column chunks on SPLIT programs per statistic -> merge -> apply;
          x read twice, the whole GPU busy when there are few statistics (BatchNorm).
Given statistics (eval with running stats) use the apply kernel alone.

Moments are taken of x minus a per-statistic pivot K (its first element): sums of deviations
instead of raw values keep the mean exact to fp32 when |mean| >> std, where PyTorch's kernels
lose digits. The kernels store K and the shifted mean (``Mean`` = mean - K) and every consumer
normalizes ``(x - K) - Mean``; the true mean K + Mean is formed only for the caller.

Every kernel takes the view arguments of layout.View in order: rows (s1..s3, the x, out and stat
strides, the channel digit), then cols (the same). Statistics are fp32.
"""

import triton
import triton.language as tl

from .common import (chan_merge, col_tile, epilogue, load2d, load_residual, pivot, row_block, store2d,
                     store_stats, strided_tile_start, tile_moments)


@triton.jit
def _fwd_fused_kernel(
    X, Y, Res, W, B, K, Mean, Rstd, Var,  # x, y, residual, weight, bias; stats out: pivot, shifted mean, rstd, var
    P, M, eps,                            # statistics, elements per statistic, epsilon
    rs1, rs2, rs3, rx0, rx1, rx2, rx3, ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk,
    cs1, cs2, cs3, cx0, cx1, cx2, cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk,
    CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr, STORE_Y: tl.constexpr,
):
    """Whole statistic in registers: moments, epilogue and stats in one pass over x
    (STORE_Y=False: statistics only)."""
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, rs1, rs2, rs3, rx0, rx1, rx2, rx3,
                                            ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk)
    cmask, mask, cx, co, ct, ch = col_tile(0, M, rmask, BLOCK_M, INT64, cs1, cs2, cs3, cx0, cx1, cx2, cx3,
                                           co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk)
    k = pivot(X, rx, rmask, CENTER)
    d = tl.where(mask, load2d(X, rx, cx, mask) - k[:, None], 0.0)
    mean_d, m2 = tile_moments(d, mask, M, CENTER)
    rstd = store_stats(K, Mean, Rstd, Var, rt, rmask, k, mean_d, m2 / M, eps)
    if STORE_Y:
        res = load_residual(Res, ro, co, mask, HAS_RES)
        y = epilogue((d - mean_d[:, None]) * rstd[:, None], rh, ch, rmask, cmask, res,
                     W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        store2d(Y, ro, co, y, mask)


@triton.jit
def _fwd_looped_kernel(
    X, Y, Res, W, B, K, Mean, Rstd, Var,  # as the fused kernel
    P, M, eps,
    rs1, rs2, rs3, rx0, rx1, rx2, rx3, ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk,
    cs1, cs2, cs3, cx0, cx1, cx2, cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk,
    CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr, STORE_Y: tl.constexpr,
):
    """Moments by Chan-merging BLOCK_M tiles, then a second sweep applies the epilogue
    (STORE_Y=False: statistics only, one sweep)."""
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, rs1, rs2, rs3, rx0, rx1, rx2, rx3,
                                            ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk)
    k = pivot(X, rx, rmask, CENTER)
    mean_d = tl.zeros([BLOCK_P], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cmask, mask, cx, co, ct, ch = col_tile(m0, M, rmask, BLOCK_M, INT64, cs1, cs2, cs3, cx0, cx1, cx2, cx3,
                                               co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk)
        d = tl.where(mask, load2d(X, rx, cx, mask) - k[:, None], 0.0)
        nt = tl.minimum(M - m0, BLOCK_M).to(tl.float32)
        t_mean, t_m2 = tile_moments(d, mask, nt, CENTER)
        mean_d, m2 = chan_merge(m0 * 1.0, mean_d, m2, nt, t_mean, t_m2)
    rstd = store_stats(K, Mean, Rstd, Var, rt, rmask, k, mean_d, m2 / M, eps)
    if STORE_Y:
        for m0 in range(0, M, BLOCK_M):
            cmask, mask, cx, co, ct, ch = col_tile(m0, M, rmask, BLOCK_M, INT64, cs1, cs2, cs3, cx0, cx1, cx2,
                                                   cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk)
            xhat = ((load2d(X, rx, cx, mask) - k[:, None]) - mean_d[:, None]) * rstd[:, None]
            res = load_residual(Res, ro, co, mask, HAS_RES)
            y = epilogue(xhat, rh, ch, rmask, cmask, res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
            store2d(Y, ro, co, y, mask)


@triton.jit
def _fwd_partial_kernel(
    X, PMean, PM2,                # x; partial shifted means and M2, [P, SPLIT] fp32
    P, M, CHUNK, SPLIT,           # CHUNK: columns per split (a multiple of BLOCK_M)
    rs1, rs2, rs3, rx0, rx1, rx2, rx3, ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk,
    cs1, cs2, cs3, cx0, cx1, cx2, cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk,
    CENTER: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Moments (of x minus the row's pivot) of one column chunk of BLOCK_P statistics
    (split regime, stage 1)."""
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, rs1, rs2, rs3, rx0, rx1, rx2, rx3,
                                            ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk)
    sp = tl.program_id(1)
    if INT64:
        sp = sp.to(tl.int64)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, M)
    k = pivot(X, rx, rmask, CENTER)
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for m in range(0, CHUNK, BLOCK_M):  # a fixed trip count: tiles past `end` are masked
        m0 = start + m
        cmask, mask, cx, co, ct, ch = col_tile(m0, end, rmask, BLOCK_M, INT64, cs1, cs2, cs3, cx0, cx1, cx2, cx3,
                                               co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk)
        d = tl.where(mask, load2d(X, rx, cx, mask) - k[:, None], 0.0)
        nt = tl.maximum(tl.minimum(end - m0, BLOCK_M), 0).to(tl.float32)
        t_mean, t_m2 = tile_moments(d, mask, tl.maximum(nt, 1.0), CENTER)
        n_before = tl.maximum(tl.minimum(end - start, m), 0).to(tl.float32)
        mean, m2 = chan_merge(n_before, mean, m2, nt, t_mean, t_m2)
    tl.store(PMean + rows * SPLIT + sp, mean, mask=rmask)
    tl.store(PM2 + rows * SPLIT + sp, m2, mask=rmask)


@triton.jit
def _fwd_merge_kernel(
    X, PMean, PM2, K, Mean, Rstd, Var,  # x (for the pivots); partials [P, SPLIT]; stats out
    P, M, CHUNK, SPLIT, eps,
    rs1, rs2, rs3, rx0, rx1, rx2, rx3, ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk,
    CENTER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge SPLIT partials per statistic: mean = sum n_i mu_i / n, M2 = sum M2_i + n_i (mu_i - mean)^2."""
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, False, rs1, rs2, rs3, rx0, rx1, rx2, rx3,
                                            ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk)
    sps = tl.arange(0, BLOCK_S)
    mask = rmask[:, None] & (sps < SPLIT)[None, :]
    idx = rows[:, None] * SPLIT + sps[None, :]
    mu = tl.load(PMean + idx, mask=mask, other=0.0)
    m2 = tl.load(PM2 + idx, mask=mask, other=0.0)
    cnt = tl.minimum(tl.maximum(M - sps * CHUNK, 0), CHUNK).to(tl.float32)[None, :]
    mean = tl.sum(cnt * mu, axis=1) / M
    d = tl.where(mask, mu - mean[:, None], 0.0)
    var = (tl.sum(m2, axis=1) + tl.sum(cnt * d * d, axis=1)) / M
    store_stats(K, Mean, Rstd, Var, rt, rmask, pivot(X, rx, rmask, CENTER), mean, var, eps)


@triton.jit
def _fwd_apply_kernel(
    X, Y, Res, W, B, K, Mean, Rstd,   # as the fused kernel; the statistics are inputs here
    P, M, COL_PROGS, TILES_PER_PROG,  # programs on grid axis 1, column tiles each
    rs1, rs2, rs3, rx0, rx1, rx2, rx3, ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk,
    cs1, cs2, cs3, cx0, cx1, cx2, cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Epilogue with given statistics, over a 2-D grid of (row block, column tiles)."""
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, rs1, rs2, rs3, rx0, rx1, rx2, rx3,
                                            ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk)
    k = tl.load(K + rt, mask=rmask, other=0.0)
    mean = tl.load(Mean + rt, mask=rmask, other=0.0)
    rstd = tl.load(Rstd + rt, mask=rmask, other=0.0)
    for i in range(0, TILES_PER_PROG):
        cmask, mask, cx, co, ct, ch = col_tile(strided_tile_start(i, COL_PROGS, BLOCK_M, INT64), M, rmask,
                                               BLOCK_M, INT64, cs1, cs2, cs3, cx0, cx1, cx2, cx3, co0, co1,
                                               co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk)
        xhat = ((load2d(X, rx, cx, mask) - k[:, None]) - mean[:, None]) * rstd[:, None]
        res = load_residual(Res, ro, co, mask, HAS_RES)
        y = epilogue(xhat, rh, ch, rmask, cmask, res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        store2d(Y, ro, co, y, mask)
