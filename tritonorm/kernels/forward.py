"""Forward kernels: y = act(w_c * (x - mean) * rstd + b_c + residual), and the statistics.

Regimes (chosen by tritonorm.dispatch):
  fused   one program per BLOCK_P statistics; the whole statistic in registers; x read once.
  looped  one program per BLOCK_P statistics; Chan-merged BLOCK_M tiles, then a second sweep
          applies the epilogue; x read twice.
  split   partial moments of column chunks on SPLIT programs per statistic, then the apply
          kernel merges the partials of its rows itself and writes y: two launches, x read
          twice, the whole GPU busy when there are few statistics (BatchNorm).
Given statistics (eval with running stats) use the apply kernel alone, reading the running
buffers directly.

Moments are taken of x minus a per-statistic pivot K (its first element): sums of deviations
instead of raw values keep the mean exact to fp32 when |mean| >> std, where PyTorch's kernels
lose digits. Statistics live in one [5, P] fp32 buffer: pivot K, shifted mean (mean - K), rstd,
biased variance and the mean itself; every consumer normalizes ``(x - K) - shifted mean``.
Running statistics (BatchNorm) are blended in the kernel that stores the statistics.

Every kernel takes the view geometry of layout.View as two tuples, RG (rows) and CG (columns).
Counts that change with the batch and never decide an access width (splits, programs, tiles per
program) are ``do_not_specialize``: a new batch size must not compile a new variant. P, M, CHUNK
and the strides stay specialized: masked 16-byte accesses need their divisibility.
"""

import triton
import triton.language as tl

from .common import (chan_merge, col_tile, epilogue, load_input, load_residual, param_offsets, pivot_input,
                     row_block, store2d, store_stats, strided_tiles, tile_moments)


@triton.jit
def _fwd_fused_kernel(
    X, Y, Res, W, B,          # x, y, residual, weight, bias (Y unused unless STORE_Y)
    Stats,                    # [5, P] fp32 out: pivot, shifted mean, rstd, var, mean
    RunMean, RunVar,          # running statistics, updated in place when RUNNING
    P, M, eps, momentum, unbias,  # statistics, elements per statistic, epsilon, running blend
    RG, CG,                   # row and column geometry tuples
    CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr, STORE_Y: tl.constexpr, RUNNING: tl.constexpr,
    H=None, PRE_ADD: tl.constexpr = False,  # PRE_ADD: normalize h = x + Res, stored to H
    PARAM_FULL: tl.constexpr = False,       # W, B laid out like y (broadcast affine)
    PARAM_NC: tl.constexpr = False, PS=None,  # W, B per (sample, channel) (common.param_offsets)
    LEAN: tl.constexpr = 0,                 # Stats is [LEAN, P] (common.store_stats)
):
    """Whole statistic in registers: moments, epilogue and stats in one pass over x
    (STORE_Y=False: statistics only)."""
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, RG)
    cmask, mask, cx, co, ct, ch = col_tile(0, M, rmask, BLOCK_M, INT64, CG)
    wr, wc, br, bc = param_offsets(rows, rh, ch, ro, co, PARAM_FULL, PARAM_NC, PS)
    k = pivot_input(X, Res, H, rx, ro, rmask, CENTER, PRE_ADD)
    d = tl.where(mask, load_input(X, Res, H, rx, cx, ro, co, mask, PRE_ADD, STORE_Y, "") - k[:, None], 0.0)
    mean_d, m2 = tile_moments(d, mask, M, CENTER)
    rstd = store_stats(Stats, P, rt, rmask, k, mean_d, m2 / M, eps, RunMean, RunVar, momentum, unbias,
                       RUNNING, LEAN)
    if STORE_Y:
        res = load_residual(Res, ro, co, mask, HAS_RES, "")
        y = epilogue((d - mean_d[:, None]) * rstd[:, None], wr, wc, br, bc, rmask, cmask, res,
                     W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        store2d(Y, ro, co, y, mask, "")


@triton.jit(do_not_specialize=["M_BACK"])
def _fwd_looped_kernel(
    X, Y, Res, W, B, Stats, RunMean, RunVar,  # as the fused kernel
    P, M, eps, momentum, unbias,
    RG, CG,
    M_BACK,  # the y sweep's column tiles: tile |M_BACK - j| (dispatch.sweep_back: last to first)
    CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr, STORE_Y: tl.constexpr, RUNNING: tl.constexpr,
    H=None, PRE_ADD: tl.constexpr = False,  # as the fused kernel; both sweeps re-add x + Res
    PARAM_FULL: tl.constexpr = False, PARAM_NC: tl.constexpr = False, PS=None, LEAN: tl.constexpr = 0,
    EV: tl.constexpr = "",  # the y sweep's eviction policy (dispatch.second_pass_policy)
):
    """Moments by Chan-merging BLOCK_M tiles, then a second sweep applies the epilogue
    (STORE_Y=False: statistics only, one sweep), its tiles in the order M_BACK gives."""
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, RG)
    k = pivot_input(X, Res, H, rx, ro, rmask, CENTER, PRE_ADD)
    mean_d = tl.zeros([BLOCK_P], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cmask, mask, cx, co, ct, ch = col_tile(m0, M, rmask, BLOCK_M, INT64, CG)
        d = tl.where(mask, load_input(X, Res, H, rx, cx, ro, co, mask, PRE_ADD, False, "") - k[:, None], 0.0)
        nt = tl.minimum(M - m0, BLOCK_M).to(tl.float32)
        t_mean, t_m2 = tile_moments(d, mask, nt, CENTER)
        mean_d, m2 = chan_merge(m0 * 1.0, mean_d, m2, nt, t_mean, t_m2)
    rstd = store_stats(Stats, P, rt, rmask, k, mean_d, m2 / M, eps, RunMean, RunVar, momentum, unbias,
                       RUNNING, LEAN)
    if STORE_Y:
        for j in range(0, tl.cdiv(M, BLOCK_M)):
            cmask, mask, cx, co, ct, ch = col_tile(tl.abs(M_BACK - j) * BLOCK_M, M, rmask, BLOCK_M, INT64, CG)
            wr, wc, br, bc = param_offsets(rows, rh, ch, ro, co, PARAM_FULL, PARAM_NC, PS)
            xin = load_input(X, Res, H, rx, cx, ro, co, mask, PRE_ADD, True, EV)
            xhat = ((xin - k[:, None]) - mean_d[:, None]) * rstd[:, None]
            res = load_residual(Res, ro, co, mask, HAS_RES, EV)
            y = epilogue(xhat, wr, wc, br, bc, rmask, cmask, res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
            store2d(Y, ro, co, y, mask, EV)


@triton.jit(do_not_specialize=["SPLIT"])
def _fwd_partial_kernel(
    X, Part,                  # x; partial shifted means and M2 out, [2, P, SPLIT] fp32
    P, M, CHUNK, SPLIT,       # CHUNK: columns per split (a multiple of BLOCK_M)
    RG, CG,
    CENTER: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    Res=None, H=None, PRE_ADD: tl.constexpr = False,  # PRE_ADD: moments of h = x + Res (not stored)
    PART_ROW: tl.constexpr = 0,  # > 0: Part is the [>= PART_ROW + 2 SPLIT, P] statistics buffer (launch.part_row)
):
    """Moments (of x minus the row's pivot) of one column chunk of BLOCK_P statistics
    (split regime, stage 1)."""
    if PART_ROW != 0:
        Part += PART_ROW * P
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, RG)
    sp = tl.program_id(1)
    if INT64:
        sp = sp.to(tl.int64)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, M)
    k = pivot_input(X, Res, H, rx, ro, rmask, CENTER, PRE_ADD)
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for m in range(0, CHUNK, BLOCK_M):  # a fixed trip count: tiles past `end` are masked
        m0 = start + m
        cmask, mask, cx, co, ct, ch = col_tile(m0, end, rmask, BLOCK_M, INT64, CG)
        d = tl.where(mask, load_input(X, Res, H, rx, cx, ro, co, mask, PRE_ADD, False, "") - k[:, None], 0.0)
        nt = tl.maximum(tl.minimum(end - m0, BLOCK_M), 0).to(tl.float32)
        t_mean, t_m2 = tile_moments(d, mask, tl.maximum(nt, 1.0), CENTER)
        n_before = tl.maximum(tl.minimum(end - start, m), 0).to(tl.float32)
        mean, m2 = chan_merge(n_before, mean, m2, nt, t_mean, t_m2)
    tl.store(Part + rows * SPLIT + sp, mean, mask=rmask)
    tl.store(Part + P * SPLIT + rows * SPLIT + sp, m2, mask=rmask)


@triton.jit
def _merge_partials(Part, rows, rmask, P, M, CHUNK, SPLIT, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """Shifted mean and biased variance of each row from its SPLIT partials, BLOCK_S at a time
    (a fixed block, so the split count never compiles a variant):
    mean = sum n_i mu_i / n, M2 = sum M2_i + n_i (mu_i - mean)^2."""
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        sps = s0 + tl.arange(0, BLOCK_S)
        mask = rmask[:, None] & (sps < SPLIT)[None, :]
        mu = tl.load(Part + rows[:, None] * SPLIT + sps[None, :], mask=mask, other=0.0)
        cnt = tl.minimum(tl.maximum(M - sps * CHUNK, 0), CHUNK).to(tl.float32)[None, :]
        mean += tl.sum(cnt * mu, axis=1)
    mean = mean / M
    m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        sps = s0 + tl.arange(0, BLOCK_S)
        mask = rmask[:, None] & (sps < SPLIT)[None, :]
        idx = rows[:, None] * SPLIT + sps[None, :]
        mu = tl.load(Part + idx, mask=mask, other=0.0)
        cnt = tl.minimum(tl.maximum(M - sps * CHUNK, 0), CHUNK).to(tl.float32)[None, :]
        d = tl.where(mask, mu - mean[:, None], 0.0)
        m2 += tl.sum(tl.load(Part + P * SPLIT + idx, mask=mask, other=0.0), axis=1) + tl.sum((cnt * d) * d, axis=1)
    return mean, m2 / M


@triton.jit(do_not_specialize=["SPLIT", "TILE_STEP", "TILES_PER_PROG", "FIRST_TILE"])
def _fwd_apply_kernel(
    X, Y, Res, W, B, Stats, RunMean, RunVar,  # as the fused kernel
    Part,                             # [2, P, SPLIT] partials of the split regime (SOURCE=0)
    P, M, CHUNK, SPLIT, eps, momentum, unbias,
    TILE_STEP, TILES_PER_PROG, FIRST_TILE,  # column tiles each program takes (common.strided_tiles)
    RG, CG,
    SOURCE: tl.constexpr,             # 0: merge Part (split regime); 1: the running statistics (eval)
    CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, RUNNING: tl.constexpr,  # BLOCK_S: partials per step
    H=None, PRE_ADD: tl.constexpr = False,  # as the fused kernel; re-adds x + Res, stores H
    PARAM_FULL: tl.constexpr = False, PARAM_NC: tl.constexpr = False, PS=None, LEAN: tl.constexpr = 0,
    PART_ROW: tl.constexpr = 0,       # > 0: the partials sit in Part (= Stats) from row PART_ROW on
    EV: tl.constexpr = "",            # the tiles' eviction policy (dispatch.second_pass_policy)
):
    """Epilogue over a 2-D grid of (row block, column tiles). Each program derives its rows'
    statistics itself (merging the split partials, or from the running buffers); the programs of
    column 0 store them (and blend the running statistics), so no launch sits in between."""
    if PART_ROW != 0:
        Part += PART_ROW * P
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, RG)
    if SOURCE == 0:
        k = pivot_input(X, Res, H, rx, ro, rmask, CENTER, PRE_ADD)
        mean, var = _merge_partials(Part, rows, rmask, P, M, CHUNK, SPLIT, BLOCK_P, BLOCK_S)
    else:
        k = tl.zeros([BLOCK_P], dtype=tl.float32)
        var = tl.load(RunVar + rt, mask=rmask, other=1.0).to(tl.float32)
        mean = tl.zeros([BLOCK_P], dtype=tl.float32)
        if CENTER:
            mean = tl.load(RunMean + rt, mask=rmask, other=0.0).to(tl.float32)
    if tl.program_id(1) == 0:
        store_stats(Stats, P, rt, rmask, k, mean, var, eps, RunMean, RunVar, momentum, unbias, RUNNING, LEAN)
    rstd = tl.rsqrt(var + eps)
    start, step = strided_tiles(TILE_STEP, FIRST_TILE, BLOCK_M, INT64)
    for i in range(0, TILES_PER_PROG):
        cmask, mask, cx, co, ct, ch = col_tile(start, M, rmask, BLOCK_M, INT64, CG)
        start += step
        wr, wc, br, bc = param_offsets(rows, rh, ch, ro, co, PARAM_FULL, PARAM_NC, PS)
        xin = load_input(X, Res, H, rx, cx, ro, co, mask, PRE_ADD, True, EV)
        xhat = ((xin - k[:, None]) - mean[:, None]) * rstd[:, None]
        res = load_residual(Res, ro, co, mask, HAS_RES, EV)
        y = epilogue(xhat, wr, wc, br, bc, rmask, cmask, res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        store2d(Y, ro, co, y, mask, EV)
