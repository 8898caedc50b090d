"""Backward kernels.

With g = dy * act'(pre) * w_c (the gradient at xhat) and, per statistic over its M elements,
S1 = sum g and S2 = sum g * xhat:

    dx = rstd * (g - S1/M - xhat * S2/M)     (centred)
    dx = rstd * (g - xhat * S2/M)            (center=False: RMS)
    dx = rstd * g                            (statistics given: eval with running stats)

dresidual = dy * act'(pre); dweight_c = sum dy*act'(pre)*xhat and dbias_c = sum dy*act'(pre)
over every element of channel c (the channel view, with fp32 partials summed in a second,
deterministic stage; when each statistic is one channel, as in BatchNorm, the dx kernels'
row sums give them without that extra sweep). Every kernel normalizes ``(x - K) - Mean`` with the forward's pivot K and
shifted mean (see forward.py); the pre-activation is recomputed, not stored. The regimes mirror
the forward ones: fused (x, dy read once), looped (twice), split (partial sums on SPLIT
programs per statistic, then apply).
"""

import triton
import triton.language as tl

from .common import col_tile, grad_terms, load2d, load_residual, row_block, store2d, strided_tile_start


@triton.jit
def _dx(g, xhat, rstd, s1, s2, M, CENTER: tl.constexpr, GIVEN: tl.constexpr):
    if GIVEN:
        dx = g * rstd[:, None]
    elif CENTER:
        dx = (g - s1[:, None] / M - xhat * (s2[:, None] / M)) * rstd[:, None]
    else:
        dx = (g - xhat * (s2[:, None] / M)) * rstd[:, None]
    return dx


@triton.jit
def _row_stats(K, Mean, Rstd, rt, rmask):
    k = tl.load(K + rt, mask=rmask, other=0.0)
    mean = tl.load(Mean + rt, mask=rmask, other=0.0)
    rstd = tl.load(Rstd + rt, mask=rmask, other=0.0)
    return k, mean, rstd


@triton.jit
def _bwd_fused_kernel(
    X, DY, Res, W, B, K, Mean, Rstd, DX, DRes,  # K, Mean: pivot and shifted mean; DRes only if WRITE_DRES
    PDW, PDB,                                   # dweight, dbias partials (ROW_CHANNEL: [P]; COL_CHANNEL: [programs, M])
    P, M, ROW_BLOCKS,                           # statistics, elements per statistic, cdiv(P, BLOCK_P)
    rs1, rs2, rs3, rx0, rx1, rx2, rx3, ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk,
    cs1, cs2, cs3, cx0, cx1, cx2, cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk,
    CENTER: tl.constexpr, GIVEN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, WRITE_DRES: tl.constexpr, ACT: tl.constexpr, CHAN: tl.constexpr,
    INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, ROW_CHANNEL: tl.constexpr,
    COL_CHANNEL: tl.constexpr,
):
    """Whole statistics in registers: S1, S2 and dx in one pass over x and dy.

    The grid walks the row blocks (one each when it covers them all). ROW_CHANNEL (each row is
    one channel: BatchNorm): the row sums of gz*xhat and gz are dweight and dbias. COL_CHANNEL
    (each column is one channel: LayerNorm rows, positional scope; launched on a persistent
    grid): each program keeps per-channel sums over the rows it saw. Either way dweight and
    dbias need no sweep of their own.
    """
    dw = tl.zeros([BLOCK_M], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for rb in range(tl.program_id(0), ROW_BLOCKS, tl.num_programs(0)):
        rows, rmask, rx, ro, rt, rh = row_block(rb, P, BLOCK_P, INT64, rs1, rs2, rs3, rx0, rx1, rx2, rx3,
                                                ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk)
        cmask, mask, cx, co, ct, ch = col_tile(0, M, rmask, BLOCK_M, INT64, cs1, cs2, cs3, cx0, cx1, cx2, cx3,
                                               co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk)
        k, mean, rstd = _row_stats(K, Mean, Rstd, rt, rmask)
        x = load2d(X, rx, cx, mask) - k[:, None]
        dy = load2d(DY, ro, co, mask)
        res = load_residual(Res, ro, co, mask, HAS_RES)
        xhat, gz, g = grad_terms(x, dy, mean[:, None], rstd[:, None], rh, ch, rmask, cmask,
                                 res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        dx = _dx(g, xhat, rstd, tl.sum(g, axis=1), tl.sum(g * xhat, axis=1), M, CENTER, GIVEN)
        store2d(DX, ro, co, dx, mask)
        if WRITE_DRES:
            store2d(DRes, ro, co, gz, mask)
        if ROW_CHANNEL:
            tl.store(PDW + rows, tl.sum(gz * xhat, axis=1), mask=rmask)
            tl.store(PDB + rows, tl.sum(gz, axis=1), mask=rmask)
        if COL_CHANNEL:
            dw += tl.sum(tl.where(mask, gz * xhat, 0.0), axis=0)
            db += tl.sum(gz, axis=0)
    if COL_CHANNEL:
        cols = tl.arange(0, BLOCK_M)
        tl.store(PDW + tl.program_id(0) * M + cols, dw, mask=cols < M)
        tl.store(PDB + tl.program_id(0) * M + cols, db, mask=cols < M)


@triton.jit
def _bwd_sums_kernel(
    X, DY, Res, W, B, K, Mean, Rstd, PS1, PS2,  # partial sums out, [P, SPLIT] fp32
    PDW, PDB,                                   # partial dweight, dbias, [P, SPLIT] (ROW_CHANNEL only)
    P, M, CHUNK, SPLIT,
    rs1, rs2, rs3, rx0, rx1, rx2, rx3, ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk,
    cs1, cs2, cs3, cx0, cx1, cx2, cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    ROW_CHANNEL: tl.constexpr,
):
    """S1, S2 over one column chunk (looped regime: SPLIT = 1; split regime: stage 1); with
    ROW_CHANNEL also the dweight, dbias partials (sums of gz*xhat and gz)."""
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, rs1, rs2, rs3, rx0, rx1, rx2, rx3,
                                            ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk)
    sp = tl.program_id(1)
    if INT64:
        sp = sp.to(tl.int64)
    k, mean, rstd = _row_stats(K, Mean, Rstd, rt, rmask)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, M)
    s1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    u1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    u2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for m in range(0, CHUNK, BLOCK_M):  # a fixed trip count: tiles past `end` are masked
        cmask, mask, cx, co, ct, ch = col_tile(start + m, end, rmask, BLOCK_M, INT64, cs1, cs2, cs3, cx0, cx1, cx2,
                                               cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk)
        x = load2d(X, rx, cx, mask) - k[:, None]
        dy = load2d(DY, ro, co, mask)
        res = load_residual(Res, ro, co, mask, HAS_RES)
        xhat, gz, g = grad_terms(x, dy, mean[:, None], rstd[:, None], rh, ch, rmask, cmask,
                                 res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        s1 += tl.sum(g, axis=1)
        s2 += tl.sum(g * xhat, axis=1)
        if ROW_CHANNEL:
            u1 += tl.sum(gz, axis=1)
            u2 += tl.sum(gz * xhat, axis=1)
    tl.store(PS1 + rows * SPLIT + sp, s1, mask=rmask)
    tl.store(PS2 + rows * SPLIT + sp, s2, mask=rmask)
    if ROW_CHANNEL:
        tl.store(PDW + rows * SPLIT + sp, u2, mask=rmask)
        tl.store(PDB + rows * SPLIT + sp, u1, mask=rmask)


@triton.jit
def _bwd_apply_kernel(
    X, DY, Res, W, B, K, Mean, Rstd, S1, S2, DX, DRes,  # S1, S2: [P] fp32 by row index (unused if GIVEN)
    P, M, COL_PROGS, TILES_PER_PROG,  # programs on grid axis 1, column tiles each
    rs1, rs2, rs3, rx0, rx1, rx2, rx3, ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk,
    cs1, cs2, cs3, cx0, cx1, cx2, cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk,
    CENTER: tl.constexpr, GIVEN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, WRITE_DRES: tl.constexpr, ACT: tl.constexpr, CHAN: tl.constexpr,
    INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dx (and dresidual) over a 2-D grid of (row block, column tiles)."""
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, rs1, rs2, rs3, rx0, rx1, rx2, rx3,
                                            ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk)
    k, mean, rstd = _row_stats(K, Mean, Rstd, rt, rmask)
    s1 = rstd * 0.0
    s2 = rstd * 0.0
    if not GIVEN:
        s1 = tl.load(S1 + rows, mask=rmask, other=0.0)
        s2 = tl.load(S2 + rows, mask=rmask, other=0.0)
    for i in range(0, TILES_PER_PROG):
        cmask, mask, cx, co, ct, ch = col_tile(strided_tile_start(i, COL_PROGS, BLOCK_M, INT64), M, rmask,
                                               BLOCK_M, INT64, cs1, cs2, cs3, cx0, cx1, cx2, cx3, co0, co1,
                                               co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk)
        x = load2d(X, rx, cx, mask) - k[:, None]
        dy = load2d(DY, ro, co, mask)
        res = load_residual(Res, ro, co, mask, HAS_RES)
        xhat, gz, g = grad_terms(x, dy, mean[:, None], rstd[:, None], rh, ch, rmask, cmask,
                                 res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        store2d(DX, ro, co, _dx(g, xhat, rstd, s1, s2, M, CENTER, GIVEN), mask)
        if WRITE_DRES:
            store2d(DRes, ro, co, gz, mask)


@triton.jit
def _dwdb_kernel(
    X, DY, Res, W, B, K, Mean, Rstd, PDW, PDB,  # partial dweight/dbias out, [C, SPLIT] fp32
    C, M, CHUNK, SPLIT,                         # channel view: C rows, M = N * spatial columns
    rs1, rs2, rs3, rx0, rx1, rx2, rx3, ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk,
    cs1, cs2, cs3, cx0, cx1, cx2, cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Per-channel sums of gz * xhat and gz over one column chunk (stage 1 of dweight, dbias).

    The statistics vary across both sides of the channel view, so they are gathered per element.
    """
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), C, BLOCK_P, INT64, rs1, rs2, rs3, rx0, rx1, rx2, rx3,
                                            ro0, ro1, ro2, ro3, rt0, rt1, rt2, rt3, rhd, rhm, rhk)
    sp = tl.program_id(1)
    if INT64:
        sp = sp.to(tl.int64)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, M)
    dw = tl.zeros([BLOCK_P], dtype=tl.float32)
    db = tl.zeros([BLOCK_P], dtype=tl.float32)
    for m in range(0, CHUNK, BLOCK_M):  # a fixed trip count: tiles past `end` are masked
        cmask, mask, cx, co, ct, ch = col_tile(start + m, end, rmask, BLOCK_M, INT64, cs1, cs2, cs3, cx0, cx1, cx2,
                                               cx3, co0, co1, co2, co3, ct0, ct1, ct2, ct3, chd, chm, chk)
        x = load2d(X, rx, cx, mask) - load2d(K, rt, ct, mask)
        dy = load2d(DY, ro, co, mask)
        res = load_residual(Res, ro, co, mask, HAS_RES)
        xhat, gz, g = grad_terms(x, dy, load2d(Mean, rt, ct, mask), load2d(Rstd, rt, ct, mask), rh, ch,
                                 rmask, cmask, res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        dw += tl.sum(gz * xhat, axis=1)
        db += tl.sum(gz, axis=1)
    tl.store(PDW + rh * SPLIT + sp, dw, mask=rmask)
    tl.store(PDB + rh * SPLIT + sp, db, mask=rmask)
