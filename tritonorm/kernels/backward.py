"""Backward kernels.

With g = dy * act'(pre) * w_c (the gradient at xhat) and, per statistic over its M elements,
S1 = sum g and S2 = sum g * xhat:

    dx = rstd * (g - S1/M - xhat * S2/M)     (centred)
    dx = rstd * (g - xhat * S2/M)            (center=False: RMS)
    dx = rstd * g                            (statistics given: eval with running stats)

dresidual = dy * act'(pre); dweight_c = sum dy*act'(pre)*xhat and dbias_c = sum dy*act'(pre)
over every element of channel c. Where they come from:
  each statistic one channel (BatchNorm): the dx kernels' row sums, written by the dx kernels;
  each column one channel (LayerNorm rows, positional scope), fused regime: a persistent grid
      keeps per-channel sums per program; ``_finish_kernel`` adds the programs' partials;
      Looped/split: ``_bwd_col_sums_kernel`` keeps the per-column sums of each column tile over
      the rows its program takes, beside the rows' S1, S2; ``_finish_kernel`` adds them;
  each statistic a run of per-(sample, channel) segments (GroupNorm, InstanceNorm, LayerNorm over
      C and space; layout.Segments): the dx pass stores one fp32 partial per segment (and
      chunk), segment n*C + c. Fused: the tile is (channel digit j, position h), reshaped to
      sum each j, then ``_finish_kernel`` adds the N partials. Looped/split: ``_bwd_sums_kernel``
      runs on the segment view (rows = the N*C segments) and also stores each segment's S1, S2;
      ``_bwd_apply_kernel`` adds a statistic's hm*SPLIT of those and its first programs add the
      dweight/dbias partials (FINISH). Two launches either way, x and dy read as often as for dx;
  each statistic a run of (sample group, channel) segments (Ghost BatchNorm: one channel, the
      segment view the statistic view; batch_group: Cg channels; layout.batch_segments): the
      same, segment s*C + c, partials [2, S, C] added over the S groups;
  conditional BatchNorm (each statistic one channel, a per-(sample, channel) weight/bias,
      layout.sample_segments): each row's N per-sample runs are the segments; the fused tile
      stores them at n*C + c (SEG_T: its rows are channels), the looped/split sums kernel runs on
      the (n, c) segment view, whose partials the apply kernel reads N-strided (PART_N);
  otherwise (e.g. NCHW batch_group fused, sample groups with kept spatial axes or C outside N
      in memory, LayerNorm rows looped or split, only dweight/dbias asked for): ``_dwdb_kernel``
      sweeps the channel view; with one chunk per channel it writes the result itself, else
      ``_finish_kernel`` adds its chunks.
Partials are fp32 and summed in a fixed order (deterministic, no atomics). Every kernel
normalizes ``(x - K) - Mean`` with the forward's pivot K and shifted mean from the [5, P]
statistics buffer (see forward.py); the pre-activation is recomputed, not stored. The regimes
mirror the forward ones: fused (x, dy read once), looped (twice), split (partial sums on SPLIT
programs per statistic, then an apply kernel that adds them itself).
"""

import triton
import triton.language as tl

from .common import (add_incoming, col_tile, grad_terms, load2d, load_residual, load_stats, param_offsets,
                     row_block, sample_row_block, side_offsets, store2d, store_param_grads, strided_tiles)


@triton.jit
def _seg_tile(rmask, M, HM_B: tl.constexpr, HD_B: tl.constexpr, ORDER: tl.constexpr, INT64: tl.constexpr, CG):
    """A whole statistic as a (channel digit j, position h) tile of HM_B * HD_B columns (powers of
    two, so // and % are shifts): ORDER 1: col = j*H + h (H = the digit's div; j-major, so each
    channel's run stays contiguous and vector loads survive), ORDER 2: col = h*hm + j (h-major).
    ORDER 3 (conditional BatchNorm NCHW): col = j*H + h with the columns side exactly the two
    digits (j, h), so the offsets are j*stride0 + h*stride1 with no division of the flat index
    (which would hide the h runs' contiguity from the compiler: 16-byte accesses).
    Returns col_tile's (cmask, tile mask, offsets, channel) and hm."""
    s1, s2, s3, x0, x1, x2, x3, o0, o1, o2, o3, t0, t1, t2, t3, hd, hm, hk = CG
    e = tl.arange(0, HM_B * HD_B)
    if INT64:
        e = e.to(tl.int64)
    if ORDER == 3:
        j = e // HD_B
        h = e % HD_B
        cmask = (j < hm) & (h < hd)
        mask = rmask[:, None] & cmask[None, :]
        return cmask, mask, j * x0 + h * x1, j * o0 + h * o1, j * t0 + h * t1, j * 0, hm
    if HM_B == 1:  # one channel a statistic (InstanceNorm): plain columns
        cols = e
        cmask = cols < M
    elif ORDER == 1:
        j = e // HD_B
        h = e % HD_B
        cols = j * hd + h
        cmask = (j < hm) & (h < hd)
    else:
        j = e % HM_B
        h = e // HM_B
        cols = h * hm + j
        cmask = (j < hm) & (h < M // hm)
    mask = rmask[:, None] & cmask[None, :]
    cx, co, ct, ch = side_offsets(cols, CG)
    return cmask, mask, cx, co, ct, ch, hm


@triton.jit
def _seg_store(Part, rows, rmask, v, hm, plane, BLOCK_P: tl.constexpr, HM_B: tl.constexpr,
               HD_B: tl.constexpr, ORDER: tl.constexpr, TRANS: tl.constexpr = False, P=1):
    """Per-channel sums of a (j, h) tile, stored to Part[row*hm + j] (+ plane) in Part's dtype;
    TRANS (conditional BatchNorm: rows channels c, j the sample n): to Part[j*P + row], n*C + c."""
    if ORDER == 2:  # (ORDER 3 is j-major as 1)
        per = tl.sum(tl.reshape(v, [BLOCK_P, HD_B, HM_B]), axis=1)
    else:
        per = tl.sum(tl.reshape(v, [BLOCK_P, HM_B, HD_B]), axis=2)
    jj = tl.arange(0, HM_B)
    if TRANS:
        idx = jj[None, :] * P + rows[:, None]
    else:
        idx = rows[:, None] * hm + jj[None, :]
    tl.store(Part + plane + idx, per.to(Part.dtype.element_ty), mask=rmask[:, None] & (jj < hm)[None, :])


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
def _row_sums(X, DY, Res, W, B, rows, rmask, rx, ro, rh, k, mean, rstd, M, CG, HAS_W: tl.constexpr,
              HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, CHAN: tl.constexpr,
              INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_A: tl.constexpr):
    """S1 = sum g and S2 = sum g * xhat of each row of a row block over all its M columns, BLOCK_A
    at a time (the fused kernel's WIDE sweep)."""
    s1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for m in range(0, M, BLOCK_A):
        cmask, mask, cx, co, ct, ch = col_tile(m, M, rmask, BLOCK_A, INT64, CG)
        x = load2d(X, rx, cx, mask, "") - k[:, None]
        dy = load2d(DY, ro, co, mask, "")
        res = load_residual(Res, ro, co, mask, HAS_RES, "")
        xhat, gz, g = grad_terms(x, dy, mean[:, None], rstd[:, None], rh, ch, rh, ch, rmask, cmask, mask, res,
                                 W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        s1 += tl.sum(g, axis=1)
        s2 += tl.sum(g * xhat, axis=1)
    return s1, s2


@triton.jit(do_not_specialize=["ROW_BLOCKS"])
def _bwd_fused_kernel(
    X, DY, Res, W, B, Stats,    # Stats: the forward's [5, P] statistics
    DX, DRes,                   # dx; dresidual (only if WRITE_DRES)
    DW, DB,                     # ROW_CHANNEL: dweight, dbias; COL_CHANNEL: fp32 partials [2, programs, M]
    P, M, ROW_BLOCKS,           # statistics, elements per statistic, cdiv(P, BLOCK_P)
    RG, CG,
    CENTER: tl.constexpr, GIVEN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, WRITE_DRES: tl.constexpr, ACT: tl.constexpr, CHAN: tl.constexpr,
    INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, ROW_CHANNEL: tl.constexpr,
    COL_CHANNEL: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    DH=None, ADD_DH: tl.constexpr = False,  # add_norm: dx += the incoming gradient of h
    DX_TWICE: tl.constexpr = False,         # add_norm: dx also stored to DRes (the residual's dtype)
    PARAM_FULL: tl.constexpr = False,       # W, B laid out like y; DW, DB get per-element gradients
    SEG: tl.constexpr = 0,                  # segments: 0 off, else their ORDER (see _seg_tile);
    HM_B: tl.constexpr = 1, HD_B: tl.constexpr = 1,  # then DW: fp32 partials [2, P*hm]
    PARAM_NC: tl.constexpr = False, PS=None,  # W, B per (sample, channel) (common.param_offsets);
    W_NC: tl.constexpr = False, B_NC: tl.constexpr = False,  # with SEG: DW / DB is that gradient,
    STORE_DX: tl.constexpr = True,          # (N, C) contiguous, stored whole here; STORE_DX: dx asked
    LEAN: tl.constexpr = 0,                 # Stats is [LEAN, P] (common.load_stats)
    COL_DIRECT: tl.constexpr = False,       # COL_CHANNEL on one program: DW, DB are the gradients
    SEG_T: tl.constexpr = False,            # SEG on BatchNorm rows (channels): _seg_store's TRANS
    WIDE: tl.constexpr = 0,                 # > 0: rows too long for one program (see below)
):
    """Whole statistics in registers: S1, S2 and dx in one pass over x and dy.

    The grid walks the row blocks (one each when it covers them all). ROW_CHANNEL (each row is
    one channel: BatchNorm): the row sums of gz*xhat and gz are dweight and dbias, stored here.
    COL_CHANNEL (each column is one channel: LayerNorm rows, positional scope; launched on a
    persistent grid): each program keeps per-channel sums over the rows it saw.
    PARAM_NC == 2 with COL_CHANNEL (adaLN's per-(sample, column) weight/bias, their gradients
    asked for): a (J, N) grid, program (j, n) walking row blocks j, j+J, ... (ROW_BLOCKS of them)
    of sample n only, so its per-column sums are partials of that sample's gradient ([2, N*J, M]).

    WIDE (contiguous rows longer than one program holds; launched on a persistent (R, TILES)
    grid, R * TILES programs at most one an SM): program (r, t) holds column tile t (BLOCK_M
    wide) of row blocks r, r + R, ... Each row's S1, S2 come first from a sweep of the whole row
    in WIDE-column chunks (_row_sums), the same sweep in every tile's program, so they agree
    bit for bit: the TILES programs of a row block read the same rows at about the same time
    and the L2 serves all but the first of those reads, and the tile's own reload follows the
    sweep that just read it. x and dy come from HBM once, where the looped backward's two
    stages read them twice. COL_CHANNEL: the per-column sums of tile t are columns t*BLOCK_M...
    of the program's row r of the [2, R, M] partials (or of dweight/dbias: COL_DIRECT).
    """
    dw = tl.zeros([BLOCK_M], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for rb in range(tl.program_id(0), ROW_BLOCKS, tl.num_programs(0)):
        if PARAM_NC == 2 and COL_CHANNEL:
            rows, rmask, rx, ro, rt, rh = sample_row_block(rb, tl.program_id(1), P, BLOCK_P, INT64, RG, PS)
        else:
            rows, rmask, rx, ro, rt, rh = row_block(rb, P, BLOCK_P, INT64, RG)
        k, mean, rstd = load_stats(Stats, P, rt, rmask, X, rx, LEAN)
        if SEG:
            cmask, mask, cx, co, ct, ch, hm = _seg_tile(rmask, M, HM_B, HD_B, SEG, INT64, CG)
        elif WIDE:
            if STORE_DX:
                s1, s2 = _row_sums(X, DY, Res, W, B, rows, rmask, rx, ro, rh, k, mean, rstd, M, CG, HAS_W, HAS_B,
                                   HAS_RES, ACT, CHAN, INT64, BLOCK_P, WIDE)
            cmask, mask, cx, co, ct, ch = col_tile(tl.program_id(1) * BLOCK_M, M, rmask, BLOCK_M, INT64, CG)
        else:
            cmask, mask, cx, co, ct, ch = col_tile(0, M, rmask, BLOCK_M, INT64, CG)
        wr, wc, br, bc = param_offsets(rows, rh, ch, ro, co, PARAM_FULL, PARAM_NC, PS)
        x = load2d(X, rx, cx, mask, "") - k[:, None]
        dy = load2d(DY, ro, co, mask, "")
        res = load_residual(Res, ro, co, mask, HAS_RES, "")
        xhat, gz, g = grad_terms(x, dy, mean[:, None], rstd[:, None], wr, wc, br, bc, rmask, cmask, mask,
                                 res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        if STORE_DX:
            if not WIDE:
                s1 = tl.sum(g, axis=1)
                s2 = tl.sum(g * xhat, axis=1)
            dx = add_incoming(_dx(g, xhat, rstd, s1, s2, M, CENTER, GIVEN), DH, ro, co, mask, ADD_DH)
            store2d(DX, ro, co, dx, mask, "")
        if WRITE_DRES:
            store2d(DRes, ro, co, gz, mask, "")
        if DX_TWICE:
            store2d(DRes, ro, co, dx, mask, "")
        store_param_grads(DW, DB, ro, co, gz, xhat, mask, PARAM_FULL, NEED_DW, NEED_DB)
        if ROW_CHANNEL:
            if NEED_DW:
                tl.store(DW + rh, tl.sum(gz * xhat, axis=1).to(DW.dtype.element_ty), mask=rmask)
            if NEED_DB:
                tl.store(DB + rh, tl.sum(gz, axis=1).to(DB.dtype.element_ty), mask=rmask)
        if COL_CHANNEL:
            dw += tl.sum(tl.where(mask, gz * xhat, 0.0), axis=0)
            db += tl.sum(gz, axis=0)
        if SEG:  # fp32 partials [2, N*C] (DW = DB), or (W_NC, B_NC) the gradient itself
            if NEED_DW:
                _seg_store(DW, rows, rmask, tl.where(mask, gz * xhat, 0.0), hm, 0, BLOCK_P, HM_B, HD_B, SEG,
                           SEG_T, P)
            if NEED_DB:
                _seg_store(DB, rows, rmask, gz, hm, 0 if B_NC else P * hm, BLOCK_P, HM_B, HD_B, SEG, SEG_T, P)
    if COL_CHANNEL:
        cols = tl.arange(0, BLOCK_M)
        if WIDE:
            cols += tl.program_id(1) * BLOCK_M
        if COL_DIRECT:  # one program saw every row: its sums are dweight and dbias (no finish)
            if NEED_DW:
                tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=cols < M)
            if NEED_DB:
                tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=cols < M)
        else:  # partials [2, programs, M]: each program stores a contiguous row
            if WIDE:  # axis 1 is the column tile: one partial row a program along the rows
                prog = tl.program_id(0)
                progs = tl.num_programs(0)
            else:
                prog = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)  # PARAM_NC == 2: n*J + j
                progs = tl.num_programs(0) * tl.num_programs(1)
            tl.store(DW + prog * M + cols, dw, mask=cols < M)
            tl.store(DW + M * progs + prog * M + cols, db, mask=cols < M)


@triton.jit(do_not_specialize=["SPLIT"])
def _bwd_sums_kernel(
    X, DY, Res, W, B, Stats,
    Part,                       # partial sums out, [4, P, SPLIT] fp32: S1, S2, dweight, dbias
    P, M, CHUNK, SPLIT, NSTAT,  # NSTAT: the statistics (P, or on the segment view P / hm)
    SEG_HM,                     # segments a statistic has (segment view: statistic = offset // hm)
    RG, CG,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    ROW_CHANNEL: tl.constexpr, PARAM_FULL: tl.constexpr = False,
    PARAM_NC: tl.constexpr = False, PS=None, LEAN: tl.constexpr = 0,  # LEAN: as the fused kernel
    PART_ROW: tl.constexpr = 0,  # > 0: Part is the statistics buffer, the partials from its row PART_ROW
):
    """S1, S2 over one column chunk (looped regime: SPLIT = 1; split regime: stage 1); with
    ROW_CHANNEL also the dweight, dbias partials (sums of gz*xhat and gz). Also runs on the
    segment view (rows = (sample, channel) segments, each reading its statistic's row)."""
    if PART_ROW != 0:
        Part += PART_ROW * NSTAT
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, RG)
    sp = tl.program_id(1)
    if INT64:
        sp = sp.to(tl.int64)
    k, mean, rstd = load_stats(Stats, NSTAT, rt // SEG_HM, rmask, X, rx, LEAN)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, M)
    s1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    u1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    u2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for m in range(0, CHUNK, BLOCK_M):  # a fixed trip count: tiles past `end` are masked
        cmask, mask, cx, co, ct, ch = col_tile(start + m, end, rmask, BLOCK_M, INT64, CG)
        wr, wc, br, bc = param_offsets(rows, rh, ch, ro, co, PARAM_FULL, PARAM_NC, PS)
        x = load2d(X, rx, cx, mask, "") - k[:, None]
        dy = load2d(DY, ro, co, mask, "")
        res = load_residual(Res, ro, co, mask, HAS_RES, "")
        xhat, gz, g = grad_terms(x, dy, mean[:, None], rstd[:, None], wr, wc, br, bc, rmask, cmask, mask,
                                 res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        s1 += tl.sum(g, axis=1)
        s2 += tl.sum(g * xhat, axis=1)
        if ROW_CHANNEL:
            u1 += tl.sum(gz, axis=1)
            u2 += tl.sum(gz * xhat, axis=1)
    plane = P * SPLIT
    idx = rows * SPLIT + sp
    tl.store(Part + idx, s1, mask=rmask)
    tl.store(Part + plane + idx, s2, mask=rmask)
    if ROW_CHANNEL:
        tl.store(Part + 2 * plane + idx, u2, mask=rmask)
        tl.store(Part + 3 * plane + idx, u1, mask=rmask)


@triton.jit(do_not_specialize=["TILES", "ROW_BLOCKS"])
def _bwd_col_sums_kernel(
    X, DY, Res, W, B, Stats,
    Part,                       # [2, P, TILES] fp32 out: S1, S2 of each row over each column tile
    DWP,                        # [2, programs on axis 0, M] fp32 out: dweight, dbias sums per column
    P, M, TILES, ROW_BLOCKS,
    RG, CG,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    LEAN: tl.constexpr = 0,     # as the fused kernel
    PARAM_NC: tl.constexpr = False, PS=None,  # 2: adaLN's per-(sample, column) W, B (see below)
):
    """Stage 1 of the looped/split backward when each column is one channel (LayerNorm rows too
    long to fuse). Program (r, t) takes column tile t of row blocks r, r + R, ...: it stores each
    row's S1, S2 over the tile (the apply kernel adds a row's TILES of them, as a split's) and
    keeps the tile's per-column dweight, dbias sums over all its rows in registers, stored once
    (``_finish_kernel`` adds the R programs'). One read of x and dy serves both, where the
    channel-view sweep read them a third time.

    PARAM_NC == 2 (adaLN's (N, 1, D) weight/bias read in place): an (R, TILES, N) grid, program
    (r, t, n) walking row blocks r, r + R, ... (ROW_BLOCKS of them) of sample n only (a block
    never spans two), so its sums are partials of that sample's gradient, stored as row n*R + r
    of [2, N*R, M] (``_finish_samples_kernel`` adds each sample's R)."""
    t = tl.program_id(1)
    r = tl.program_id(0)
    n = tl.program_id(2)
    if INT64:
        t = t.to(tl.int64)
        r = r.to(tl.int64)
        n = n.to(tl.int64)
    dw = tl.zeros([BLOCK_M], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for rb in range(tl.program_id(0), ROW_BLOCKS, tl.num_programs(0)):
        if PARAM_NC == 2:
            rows, rmask, rx, ro, rt, rh = sample_row_block(rb, n, P, BLOCK_P, INT64, RG, PS)
        else:
            rows, rmask, rx, ro, rt, rh = row_block(rb, P, BLOCK_P, INT64, RG)
        k, mean, rstd = load_stats(Stats, P, rt, rmask, X, rx, LEAN)
        cmask, mask, cx, co, ct, ch = col_tile(t * BLOCK_M, M, rmask, BLOCK_M, INT64, CG)
        wr, wc, br, bc = param_offsets(rows, rh, ch, ro, co, False, PARAM_NC, PS)
        x = load2d(X, rx, cx, mask, "") - k[:, None]
        dy = load2d(DY, ro, co, mask, "")
        res = load_residual(Res, ro, co, mask, HAS_RES, "")
        xhat, gz, g = grad_terms(x, dy, mean[:, None], rstd[:, None], wr, wc, br, bc, rmask, cmask, mask,
                                 res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        idx = rows * TILES + t
        tl.store(Part + idx, tl.sum(g, axis=1), mask=rmask)
        tl.store(Part + P * TILES + idx, tl.sum(g * xhat, axis=1), mask=rmask)
        dw += tl.sum(tl.where(mask, gz * xhat, 0.0), axis=0)
        db += tl.sum(gz, axis=0)
    cols = t * BLOCK_M + tl.arange(0, BLOCK_M)
    progs = tl.num_programs(0) * tl.num_programs(2)
    prog = n * tl.num_programs(0) + r
    tl.store(DWP + prog * M + cols, dw, mask=cols < M)
    tl.store(DWP + (progs + prog) * M + cols, db, mask=cols < M)


@triton.jit
def _finish_segments(Part, DW, DB, N, C, S, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, W_NC: tl.constexpr = False,
                     B_NC: tl.constexpr = False):
    """dweight, dbias from the sums kernel's segment partials Part[2:4, N, C, S], a channel block
    per program (programs over the whole grid, in a fixed order): the sums over n and s, or
    (W_NC, B_NC: a per-(sample, channel) parameter) each sample's sum over s, stored to
    DW[n*C + c]."""
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    progs = tl.num_programs(0) * tl.num_programs(1)
    plane = N * C * S
    for cb in range(pid, tl.cdiv(C, BLOCK_C), progs):
        cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        db = tl.zeros([BLOCK_C], dtype=tl.float32)
        for n in range(0, N):
            if W_NC:
                dw = tl.zeros([BLOCK_C], dtype=tl.float32)
            if B_NC:
                db = tl.zeros([BLOCK_C], dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                ss = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (ss < S)[None, :]
                idx = (n * C + cs)[:, None] * S + ss[None, :]
                if NEED_DW:
                    dw += tl.sum(tl.load(Part + 2 * plane + idx, mask=mask, other=0.0), axis=1)
                if NEED_DB:
                    db += tl.sum(tl.load(Part + 3 * plane + idx, mask=mask, other=0.0), axis=1)
            if NEED_DW:
                if W_NC:
                    tl.store(DW + n * C + cs, dw.to(DW.dtype.element_ty), mask=cmask)
            if NEED_DB:
                if B_NC:
                    tl.store(DB + n * C + cs, db.to(DB.dtype.element_ty), mask=cmask)
        if NEED_DW:
            if not W_NC:
                tl.store(DW + cs, dw.to(DW.dtype.element_ty), mask=cmask)
        if NEED_DB:
            if not B_NC:
                tl.store(DB + cs, db.to(DB.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=["SPLIT", "TILE_STEP", "TILES_PER_PROG", "FIRST_TILE", "FIN_N", "FIN_S"])
def _bwd_apply_kernel(
    X, DY, Res, W, B, Stats,
    Part,                             # [4, P, SPLIT] partial sums of _bwd_sums_kernel (unused if GIVEN)
    DX, DRes, DW, DB,                 # dx, dresidual; dweight, dbias (ROW_CHANNEL)
    P, M, SPLIT, TILE_STEP, TILES_PER_PROG, FIRST_TILE,  # column tiles a program takes (common.strided_tiles)
    RG, CG,
    CENTER: tl.constexpr, GIVEN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, WRITE_DRES: tl.constexpr, ACT: tl.constexpr, CHAN: tl.constexpr,
    INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    ROW_CHANNEL: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    DH=None, ADD_DH: tl.constexpr = False, DX_TWICE: tl.constexpr = False,  # as the fused kernel
    PARAM_FULL: tl.constexpr = False,
    FIN_N=1, FIN_C=1, FIN_S=1,                # FINISH: Part holds [4, N, C, S] segment partials
    FINISH: tl.constexpr = False, BLOCK_C: tl.constexpr = 64,
    PARAM_NC: tl.constexpr = False, PS=None,  # as the fused kernel
    W_NC: tl.constexpr = False, B_NC: tl.constexpr = False,
    LEAN: tl.constexpr = 0,                   # as the fused kernel
    PART_N: tl.constexpr = False,             # FINISH on BatchNorm rows: Part is [4, N, P, FIN_S]
    ColPart=None, FINISH_COLS: tl.constexpr = False,  # [2, FIN_S, M] column sums (see below)
    FINISH_SAMPLES: tl.constexpr = False, W_SAMPLE: tl.constexpr = False, B_SAMPLE: tl.constexpr = False,
    PART_ROW: tl.constexpr = 0,               # as _bwd_sums_kernel's (Part is Stats)
    EV: tl.constexpr = "",                    # the tiles' eviction policy (dispatch.second_pass_policy)
):
    """dx (and dresidual) over a 2-D grid of (row block, column tiles); each program adds its
    rows' SPLIT partial sums itself, and with ROW_CHANNEL the programs of column 0 store dweight
    and dbias. FINISH (segments: SPLIT = hm * the sums kernel's split): the first programs also
    add the dweight/dbias partials of every channel. PART_N (conditional BatchNorm: rows are
    channels, the segments (n, c) sample-major): a row's N*FIN_S partials are strided by P*FIN_S.
    FINISH_COLS (LayerNorm rows, looped/split: _bwd_col_sums_kernel's FIN_S programs' per-column
    dweight/dbias sums in ColPart): the programs share out the column blocks and store their
    sums, where a finish launch of its own did. FINISH_SAMPLES: the same for adaLN's per-sample
    sums ([2, FIN_N * FIN_S, M], FIN_S programs a sample; as _finish_samples_kernel)."""
    if PART_ROW != 0:
        Part += PART_ROW * P
    if FINISH:
        _finish_segments(Part, DW, DB, FIN_N, FIN_C, FIN_S, NEED_DW, NEED_DB, BLOCK_C, BLOCK_S, W_NC, B_NC)
    if FINISH_COLS:
        _finish_columns(ColPart, DW, DB, M, FIN_S, tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
                        tl.num_programs(0) * tl.num_programs(1), NEED_DW, NEED_DB, BLOCK_C, BLOCK_S)
    if FINISH_SAMPLES:
        _finish_sample_columns(ColPart, DW, DB, M, FIN_N, FIN_S,
                               tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
                               tl.num_programs(0) * tl.num_programs(1), 0, 1, NEED_DW, NEED_DB, W_SAMPLE, B_SAMPLE,
                               BLOCK_C, BLOCK_S)
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), P, BLOCK_P, INT64, RG)
    k, mean, rstd = load_stats(Stats, P, rt, rmask, X, rx, LEAN)
    s1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    if not GIVEN:
        plane = P * SPLIT
        dw = tl.zeros([BLOCK_P], dtype=tl.float32)
        db = tl.zeros([BLOCK_P], dtype=tl.float32)
        for s0 in range(0, SPLIT, BLOCK_S):  # BLOCK_S partials at a time: no variant per split
            sps = s0 + tl.arange(0, BLOCK_S)
            pmask = rmask[:, None] & (sps < SPLIT)[None, :]
            if PART_N:  # partial k = n*FIN_S + s of row (channel) c at (n*P + c)*FIN_S + s
                idx = (sps // FIN_S * P * FIN_S + sps % FIN_S)[None, :] + rows[:, None] * FIN_S
            else:
                idx = rows[:, None] * SPLIT + sps[None, :]
            s1 += tl.sum(tl.load(Part + idx, mask=pmask, other=0.0), axis=1)
            s2 += tl.sum(tl.load(Part + plane + idx, mask=pmask, other=0.0), axis=1)
            if ROW_CHANNEL:
                dw += tl.sum(tl.load(Part + 2 * plane + idx, mask=pmask, other=0.0), axis=1)
                db += tl.sum(tl.load(Part + 3 * plane + idx, mask=pmask, other=0.0), axis=1)
        if ROW_CHANNEL:
            if tl.program_id(1) == 0:
                if NEED_DW:
                    tl.store(DW + rh, dw.to(DW.dtype.element_ty), mask=rmask)
                if NEED_DB:
                    tl.store(DB + rh, db.to(DB.dtype.element_ty), mask=rmask)
    start, step = strided_tiles(TILE_STEP, FIRST_TILE, BLOCK_M, INT64)
    for i in range(0, TILES_PER_PROG):
        cmask, mask, cx, co, ct, ch = col_tile(start, M, rmask, BLOCK_M, INT64, CG)
        start += step
        wr, wc, br, bc = param_offsets(rows, rh, ch, ro, co, PARAM_FULL, PARAM_NC, PS)
        x = load2d(X, rx, cx, mask, EV) - k[:, None]
        dy = load2d(DY, ro, co, mask, EV)
        res = load_residual(Res, ro, co, mask, HAS_RES, EV)
        xhat, gz, g = grad_terms(x, dy, mean[:, None], rstd[:, None], wr, wc, br, bc, rmask, cmask, mask,
                                 res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        dx = add_incoming(_dx(g, xhat, rstd, s1, s2, M, CENTER, GIVEN), DH, ro, co, mask, ADD_DH)
        store2d(DX, ro, co, dx, mask, EV)
        if WRITE_DRES:
            store2d(DRes, ro, co, gz, mask, EV)
        if DX_TWICE:
            store2d(DRes, ro, co, dx, mask, EV)
        store_param_grads(DW, DB, ro, co, gz, xhat, mask, PARAM_FULL, NEED_DW, NEED_DB)


@triton.jit(do_not_specialize=["NSTAT", "SPLIT"])
def _dwdb_kernel(
    X, DY, Res, W, B, Stats,          # Stats: [5, NSTAT] statistics, gathered per element here
    DW, DB,                           # DIRECT: dweight, dbias; else fp32 partials [2, SPLIT, C]
    C, M, NSTAT, CHUNK, SPLIT,        # channel view: C rows, M = N * spatial columns
    RG, CG,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    CHAN: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    DIRECT: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
):
    """Per-channel sums of gz * xhat and gz over one column chunk of the channel view.

    The statistics vary across both sides of the channel view, so they are gathered per element.
    """
    rows, rmask, rx, ro, rt, rh = row_block(tl.program_id(0), C, BLOCK_P, INT64, RG)
    sp = tl.program_id(1)
    if INT64:
        sp = sp.to(tl.int64)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, M)
    dw = tl.zeros([BLOCK_P], dtype=tl.float32)
    db = tl.zeros([BLOCK_P], dtype=tl.float32)
    for m in range(0, CHUNK, BLOCK_M):  # a fixed trip count: tiles past `end` are masked
        cmask, mask, cx, co, ct, ch = col_tile(start + m, end, rmask, BLOCK_M, INT64, CG)
        x = load2d(X, rx, cx, mask, "") - load2d(Stats, rt, ct, mask, "")
        dy = load2d(DY, ro, co, mask, "")
        res = load_residual(Res, ro, co, mask, HAS_RES, "")
        xhat, gz, g = grad_terms(x, dy, load2d(Stats + NSTAT, rt, ct, mask, ""),
                                 load2d(Stats + 2 * NSTAT, rt, ct, mask, ""), rh, ch, rh, ch,
                                 rmask, cmask, mask, res, W, B, HAS_W, HAS_B, HAS_RES, ACT, CHAN)
        dw += tl.sum(gz * xhat, axis=1)
        db += tl.sum(gz, axis=1)
    if DIRECT:
        if NEED_DW:
            tl.store(DW + rh, dw.to(DW.dtype.element_ty), mask=rmask)
        if NEED_DB:
            tl.store(DB + rh, db.to(DB.dtype.element_ty), mask=rmask)
    else:  # partials [2, SPLIT, C]
        tl.store(DW + sp * C + rh, dw, mask=rmask)
        tl.store(DW + C * SPLIT + sp * C + rh, db, mask=rmask)


@triton.jit(do_not_specialize=["S"])
def _finish_kernel(
    Part, DW, DB,                     # fp32 partials [2, S, C] (dweight, dbias); outputs
    C, S,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dweight, dbias = the sums of their S partials per channel, in a fixed order, cast once.
    Channels are the contiguous axis of the partials, so the loads are wide."""
    _finish_columns(Part, DW, DB, C, S, tl.program_id(0), tl.num_programs(0), NEED_DW, NEED_DB, BLOCK_C, BLOCK_S)


@triton.jit
def _finish_columns(Part, DW, DB, C, S, pid, progs, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """The sums over S of fp32 partials [2, S, C] (dweight's, dbias's) stored to DW, DB: column
    blocks pid, pid + progs, ... (a finish kernel's own, or shared out over an apply grid)."""
    for cb in range(pid, tl.cdiv(C, BLOCK_C), progs):
        cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        if NEED_DW:
            dw = _sum_rows(Part, 0, S, cs, cmask, C, BLOCK_C, BLOCK_S)
            tl.store(DW + cs, dw.to(DW.dtype.element_ty), mask=cmask)
        if NEED_DB:
            db = _sum_rows(Part + S * C, 0, S, cs, cmask, C, BLOCK_C, BLOCK_S)
            tl.store(DB + cs, db.to(DB.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=["N", "J"])
def _finish_samples_kernel(
    Part, DW, DB,                     # fp32 partials [2, N*J, M] (program n*J + j of the dx pass)
    M, N, J,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, W_SAMPLE: tl.constexpr, B_SAMPLE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """adaLN's dweight, dbias from the per-sample partials of the fused dx pass: a per-sample
    parameter (W_SAMPLE, B_SAMPLE; (N, 1, D) stored contiguous) gets each sample's sum of its J
    partials at n*M + d, a per-column one ((1, 1, D) beside it) the sum of all N*J, by the
    programs of sample 0 (the grid is then (column blocks, 1)). Fixed order, cast once."""
    _finish_sample_columns(Part, DW, DB, M, N, J, tl.program_id(0), tl.num_programs(0), tl.program_id(1),
                           tl.num_programs(1), NEED_DW, NEED_DB, W_SAMPLE, B_SAMPLE, BLOCK_C, BLOCK_S)


@triton.jit
def _finish_sample_columns(Part, DW, DB, M, N, J, pid, progs, n0, n_step, NEED_DW: tl.constexpr,
                           NEED_DB: tl.constexpr, W_SAMPLE: tl.constexpr, B_SAMPLE: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """``_finish_samples_kernel``'s sums for column blocks pid, pid + progs, ... and samples n0,
    n0 + n_step, ... (those with n0 == 0 also the per-column parameter's sum of all N*J): a finish
    kernel's own grid, or shared out over an apply grid (n0 = 0, n_step = 1)."""
    plane = N * J * M
    for cb in range(pid, tl.cdiv(M, BLOCK_C), progs):
        cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < M
        for n in range(n0, N, n_step):
            if NEED_DW:
                if W_SAMPLE:
                    dw = _sum_rows(Part, n * J, n * J + J, cs, cmask, M, BLOCK_C, BLOCK_S)
                    tl.store(DW + n * M + cs, dw.to(DW.dtype.element_ty), mask=cmask)
            if NEED_DB:
                if B_SAMPLE:
                    db = _sum_rows(Part + plane, n * J, n * J + J, cs, cmask, M, BLOCK_C, BLOCK_S)
                    tl.store(DB + n * M + cs, db.to(DB.dtype.element_ty), mask=cmask)
        if n0 == 0:
            if NEED_DW:
                if not W_SAMPLE:
                    dw = _sum_rows(Part, 0, N * J, cs, cmask, M, BLOCK_C, BLOCK_S)
                    tl.store(DW + cs, dw.to(DW.dtype.element_ty), mask=cmask)
            if NEED_DB:
                if not B_SAMPLE:
                    db = _sum_rows(Part + plane, 0, N * J, cs, cmask, M, BLOCK_C, BLOCK_S)
                    tl.store(DB + cs, db.to(DB.dtype.element_ty), mask=cmask)


@triton.jit
def _sum_rows(Part, lo, hi, cs, cmask, M, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """The sum of rows lo ... hi-1 of a [rows, M] fp32 buffer at columns ``cs``, BLOCK_S rows a step."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = (ss < hi)[:, None] & cmask[None, :]
        acc += tl.sum(tl.load(Part + ss[:, None] * M + cs[None, :], mask=mask, other=0.0), axis=0)
    return acc
