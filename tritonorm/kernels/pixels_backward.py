"""Backward kernels for the channels_last GroupNorm/InstanceNorm of pixels.py: whole-pixel tiles.

The same tiles as the forward ([BLOCK_HW, CB_pad]: GB whole groups of one sample, 16-byte
vectors). With gz = dy * act'(pre) and g = gz * w_c, one sweep gathers per-channel sums
u1_c = sum gz and u2_c = sum gz * xhat over the block's pixels. They are at once the per-(sample,
channel) partials of dbias and dweight, and, weighted by w_c and folded into groups, the
statistic sums S1 = sum g and S2 = sum g * xhat that dx needs:

    dx = rstd * (g - S1/M - xhat * S2/M)        (M = HW * Cg; without centring no S1 term)

so dweight/dbias cost no extra pass over x and dy. Regimes:
  fused/looped  ``_pixels_bwd_kernel``, one program per (sample, channel block): the sums sweep,
                then dx (from registers when FUSED); partials [2, N, C]; ``_finish_kernel``
                adds them over the samples. 2 launches.
  split         ``_pixels_bwd_sums_kernel`` on SPLIT pixel chunks: per-channel partials
                [SPLIT, N, C] for each of dweight/dbias asked for, and per-GROUP S2, S1 partials
                [2, P, SPLIT] for dx, in one buffer; then ``_pixels_bwd_apply_kernel``: each
                program adds its groups' SPLIT group partials for dx (Cg times fewer bytes than
                the per-channel ones its SPLIT - 1 siblings would re-read too), and the chunk-0
                programs finish dweight/dbias, reading each per-channel plane once. 2 launches.
Fixed-order fp32 sums, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import tile_grads
from .pixels import _block, _fold, _param_bases, _pixel_tile, _spread, pixels_order


@triton.jit
def _stats(Stats, P, rows, gmask, CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr,
           GB_PAD: tl.constexpr):
    """The forward's pivot, shifted mean and rstd of the block's groups, spread to its channels."""
    k = tl.load(Stats + rows, mask=gmask, other=0.0)
    mean = tl.load(Stats + P + rows, mask=gmask, other=0.0)
    rstd = tl.load(Stats + 2 * P + rows, mask=gmask, other=0.0)
    return (_spread(k, CB, CG, CB_PAD, GB_PAD), _spread(mean, CB, CG, CB_PAD, GB_PAD),
            _spread(rstd, CB, CG, CB_PAD, GB_PAD))


@triton.jit
def _params(W, B, chans, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    w = tl.full(chans.shape, 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + chans, mask=cmask, other=0.0).to(tl.float32)
    b = tl.zeros(chans.shape, dtype=tl.float32)
    if HAS_B:
        b = tl.load(B + chans, mask=cmask, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _tile(X, DY, Res, base, hw, hmask, chans, cmask, C, k_c, mean_c, rstd_c, w_c, b_c,
          HAS_RES: tl.constexpr, ACT: tl.constexpr, INT64: tl.constexpr):
    """Offsets, mask, xhat and gz = dy * act'(pre) of one [BLOCK_HW, CB_PAD] tile (0 where masked)."""
    offs, mask = _pixel_tile(base, hw, hmask, chans, cmask, C, INT64)
    xhat, gz = tile_grads(X, DY, Res, offs, mask, k_c, mean_c, rstd_c, w_c, b_c, HAS_RES, ACT, "")
    return offs, mask, xhat, gz


@triton.jit
def _dx_tile(DX, DRes, offs, mask, xhat, gz, w_c, rstd_c, s1_c, s2_c, M, CENTER: tl.constexpr,
             NEED_DX: tl.constexpr, WRITE_DRES: tl.constexpr):
    if NEED_DX:
        g = gz * w_c[None, :]
        if CENTER:
            dx = (g - s1_c[None, :] / M - xhat * (s2_c[None, :] / M)) * rstd_c[None, :]
        else:
            dx = (g - xhat * (s2_c[None, :] / M)) * rstd_c[None, :]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if WRITE_DRES:
        tl.store(DRes + offs, gz.to(DRes.dtype.element_ty), mask=mask)


@triton.jit
def _group_sums(u1, u2, w_c, CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr):
    """S1, S2 per group from the per-channel sums of gz and gz * xhat, spread to channels."""
    s1 = _spread(_fold(w_c * u1, CB, CG, CB_PAD, GB_PAD), CB, CG, CB_PAD, GB_PAD)
    s2 = _spread(_fold(w_c * u2, CB, CG, CB_PAD, GB_PAD), CB, CG, CB_PAD, GB_PAD)
    return s1, s2


@triton.jit(do_not_specialize=["NCB"])
def _pixels_bwd_kernel(
    X, DY, Res, W, B, Stats,  # Stats: the forward's [5, P] statistics
    DX, DRes, Part,           # dx; dresidual (WRITE_DRES); fp32 partials [2, N, C] (dweight, dbias)
    DW, DB,                   # per-(sample, channel) dweight / dbias (W_NC / B_NC), stored here
    P, NCB, HW, C, G, N, PN,  # PN: n strides of weight and bias (0: per channel)
    CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr, FUSED: tl.constexpr, CENTER: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr,
    WRITE_DRES: tl.constexpr, NEED_WB: tl.constexpr, INT64: tl.constexpr,
    W_NC: tl.constexpr = False, B_NC: tl.constexpr = False,
):
    """One program per (sample, channel block): the sums sweep, then dx (FUSED: BLOCK_HW >= HW,
    the tile stays in registers)."""
    base, first, chans, cmask, rows, gmask = _block(tl.program_id(0), NCB, HW, C, G, CB, CG, CB_PAD, GB_PAD, INT64)
    k_c, mean_c, rstd_c = _stats(Stats, P, rows, gmask, CB, CG, CB_PAD, GB_PAD)
    w0, b0 = _param_bases(W, B, tl.program_id(0), first, NCB, PN, INT64)
    w_c, b_c = _params(w0, b0, chans, cmask, HAS_W, HAS_B)
    u1 = tl.zeros([CB_PAD], dtype=tl.float32)
    u2 = tl.zeros([CB_PAD], dtype=tl.float32)
    if FUSED:
        hw = tl.arange(0, BLOCK_HW)
        offs, mask, xhat, gz = _tile(X, DY, Res, base, hw, hw < HW, chans, cmask, C, k_c, mean_c, rstd_c,
                                     w_c, b_c, HAS_RES, ACT, INT64)
        u1 = tl.sum(gz, axis=0)
        u2 = tl.sum(gz * xhat, axis=0)
        s1_c, s2_c = _group_sums(u1, u2, w_c, CB, CG, CB_PAD, GB_PAD)
        _dx_tile(DX, DRes, offs, mask, xhat, gz, w_c, rstd_c, s1_c, s2_c, HW * CG, CENTER, NEED_DX, WRITE_DRES)
    else:
        for t in range(0, HW, BLOCK_HW):
            hw = t + tl.arange(0, BLOCK_HW)
            offs, mask, xhat, gz = _tile(X, DY, Res, base, hw, hw < HW, chans, cmask, C, k_c, mean_c, rstd_c,
                                         w_c, b_c, HAS_RES, ACT, INT64)
            u1 += tl.sum(gz, axis=0)
            u2 += tl.sum(gz * xhat, axis=0)
        s1_c, s2_c = _group_sums(u1, u2, w_c, CB, CG, CB_PAD, GB_PAD)
        if NEED_DX or WRITE_DRES:
            for t in range(0, HW, BLOCK_HW):
                hw = t + tl.arange(0, BLOCK_HW)
                offs, mask, xhat, gz = _tile(X, DY, Res, base, hw, hw < HW, chans, cmask, C, k_c, mean_c,
                                             rstd_c, w_c, b_c, HAS_RES, ACT, INT64)
                _dx_tile(DX, DRes, offs, mask, xhat, gz, w_c, rstd_c, s1_c, s2_c, HW * CG, CENTER, NEED_DX,
                         WRITE_DRES)
    if NEED_WB:  # this sample's per-channel partials: [2, N, C], channel-contiguous
        n = tl.program_id(0) // NCB
        if INT64:
            n = n.to(tl.int64)
        tl.store(Part + n * C + first + chans, u2, mask=cmask)
        tl.store(Part + N * C + n * C + first + chans, u1, mask=cmask)
    # A per-(sample, channel) parameter's gradient is this program's sum itself (laid out [N, C]).
    nc_row = (tl.program_id(0) // NCB) * C + first
    if W_NC:
        tl.store(DW + nc_row + chans, u2.to(DW.dtype.element_ty), mask=cmask)
    if B_NC:
        tl.store(DB + nc_row + chans, u1.to(DB.dtype.element_ty), mask=cmask)


@triton.jit
def _part_planes(Part, SPLIT, N, C, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr):
    """Where the split regime's partials lie in its one fp32 buffer: the per-channel dweight plane
    (at Part, NEED_DW) and dbias plane (NEED_DB), each [SPLIT, N, C]; then the per-group S2 and S1
    planes, each [P, SPLIT] (a statistic's chunks side by side)."""
    plane = SPLIT * N * C
    db_plane = Part
    if NEED_DW:
        db_plane = Part + plane
    groups = db_plane
    if NEED_DB:
        groups = db_plane + plane
    return db_plane, groups


@triton.jit
def _merge_groups(Groups, rows, gmask, P, SPLIT, GB_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """S1, S2 of the block's groups: their SPLIT chunk partials added in a fixed order, BLOCK_S
    at a time (one [GB_PAD, BLOCK_S] load a step)."""
    s1 = tl.zeros([GB_PAD], dtype=tl.float32)
    s2 = tl.zeros([GB_PAD], dtype=tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        sps = s0 + tl.arange(0, BLOCK_S)
        mask = gmask[:, None] & (sps < SPLIT)[None, :]
        idx = rows[:, None] * SPLIT + sps[None, :]
        s2 += tl.sum(tl.load(Groups + idx, mask=mask, other=0.0), axis=1)
        s1 += tl.sum(tl.load(Groups + P * SPLIT + idx, mask=mask, other=0.0), axis=1)
    return s1, s2


@triton.jit
def _finish_plane(Plane, Out, n, first, chans, cmask, N, C, SPLIT, PER_SAMPLE: tl.constexpr):
    """A parameter's gradient from its per-channel plane [SPLIT, N, C]: per (sample, channel)
    (PER_SAMPLE, laid out [N, C]) each sample's chunk-0 program adds its SPLIT rows; per channel
    the programs of sample 0 add all SPLIT * N. Fixed order, cast once."""
    acc = tl.zeros(chans.shape, dtype=tl.float32)
    if PER_SAMPLE:
        for s in range(0, SPLIT):
            acc += tl.load(Plane + (s * N + n) * C + first + chans, mask=cmask, other=0.0)
        tl.store(Out + n * C + first + chans, acc.to(Out.dtype.element_ty), mask=cmask)
    elif n == 0:
        for r in range(0, SPLIT * N):
            acc += tl.load(Plane + r * C + first + chans, mask=cmask, other=0.0)
        tl.store(Out + first + chans, acc.to(Out.dtype.element_ty), mask=cmask)


@triton.jit
def _store_group_sums(Out, v, rows, gmask, row0, SPLIT, sp, CB: tl.constexpr, CG: tl.constexpr,
                      CB_PAD: tl.constexpr):
    """Out[row, sp] = the sum of [CB_PAD] per-channel ``v`` over each of the block's groups (rows
    row0.., a row SPLIT long). A group at a time, a masked sum each: the one-hot [CB_PAD, GB_PAD]
    fold (_fold) pushed this kernel past its 128 registers (8 bytes spilled at sm_90a, SD's
    Cg = 10 in bf16)."""
    if CG == 1:
        tl.store(Out + rows * SPLIT + sp, v, mask=gmask)
    else:
        grp = tl.arange(0, CB_PAD) // CG
        for g in tl.static_range(CB // CG):
            tl.store(Out + (row0 + g) * SPLIT + sp, tl.sum(tl.where(grp == g, v, 0.0), axis=0))


@triton.jit(do_not_specialize=["NCB", "SPLIT"])
def _pixels_bwd_sums_kernel(
    X, DY, Res, W, B, Stats, Part,  # Part: the fp32 partials (_part_planes)
    P, NCB, HW, C, G, N, CHUNK, SPLIT, PN,
    CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, INT64: tl.constexpr,
    NEED_DX: tl.constexpr = True, NEED_DW: tl.constexpr = False, NEED_DB: tl.constexpr = False,
    PART_ROW: tl.constexpr = 0,  # > 0: Part is the statistics buffer, the partials from its row PART_ROW
):
    """Split regime, stage 1: over one pixel chunk of a block, the per-channel sums u2 = sum
    gz * xhat and u1 = sum gz (stored for the gradients asked for: NEED_DW, NEED_DB) and, for dx,
    their per-group folds with the weight, S2 = sum w_c u2_c and S1 = sum w_c u1_c."""
    if PART_ROW != 0:
        Part += PART_ROW * P
    base, first, chans, cmask, rows, gmask = _block(tl.program_id(0), NCB, HW, C, G, CB, CG, CB_PAD, GB_PAD, INT64)
    sp = tl.program_id(1)
    k_c, mean_c, rstd_c = _stats(Stats, P, rows, gmask, CB, CG, CB_PAD, GB_PAD)
    w0, b0 = _param_bases(W, B, tl.program_id(0), first, NCB, PN, INT64)
    w_c, b_c = _params(w0, b0, chans, cmask, HAS_W, HAS_B)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    u1 = tl.zeros([CB_PAD], dtype=tl.float32)
    u2 = tl.zeros([CB_PAD], dtype=tl.float32)
    for t in range(0, CHUNK, BLOCK_HW):
        hw = start + t + tl.arange(0, BLOCK_HW)
        offs, mask, xhat, gz = _tile(X, DY, Res, base, hw, hw < end, chans, cmask, C, k_c, mean_c, rstd_c,
                                     w_c, b_c, HAS_RES, ACT, INT64)
        u1 += tl.sum(gz, axis=0)
        u2 += tl.sum(gz * xhat, axis=0)
    n = tl.program_id(0) // NCB
    if INT64:
        n = n.to(tl.int64)
    db_plane, groups = _part_planes(Part, SPLIT, N, C, NEED_DW, NEED_DB)
    row = (sp * N + n) * C + first + chans
    if NEED_DW:
        tl.store(Part + row, u2, mask=cmask)
    if NEED_DB:
        tl.store(db_plane + row, u1, mask=cmask)
    if NEED_DX:
        row0 = n * G + (tl.program_id(0) % NCB) * (CB // CG)
        _store_group_sums(groups, w_c * u2, rows, gmask, row0, SPLIT, sp, CB, CG, CB_PAD)
        _store_group_sums(groups + P * SPLIT, w_c * u1, rows, gmask, row0, SPLIT, sp, CB, CG, CB_PAD)


@triton.jit(do_not_specialize=["NCB", "SPLIT", "FIRST_PID", "FIRST_SP", "TILE0"])
def _pixels_bwd_apply_kernel(
    X, DY, Res, W, B, Stats, Part,
    DX, DRes, DW, DB,
    P, NCB, HW, C, G, N, CHUNK, SPLIT, PN,
    FIRST_PID, FIRST_SP, TILE0,  # as pixels._pixels_apply_kernel's (pixels.pixels_order)
    CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr, CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr, WRITE_DRES: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, INT64: tl.constexpr,
    W_NC: tl.constexpr = False, B_NC: tl.constexpr = False, BLOCK_S: tl.constexpr = 16,
    PART_ROW: tl.constexpr = 0,  # as _pixels_bwd_sums_kernel's (Part is Stats)
):
    """Split regime, stage 2: the SPLIT group partials of the block's groups, added in a fixed
    order, give S1, S2 and dx over this program's chunk; the chunk-0 programs finish dweight and
    dbias from the per-channel planes (_finish_plane), each plane read once in all."""
    if PART_ROW != 0:
        Part += PART_ROW * P
    pid = tl.abs(FIRST_PID - tl.program_id(0))
    base, first, chans, cmask, rows, gmask = _block(pid, NCB, HW, C, G, CB, CG, CB_PAD, GB_PAD, INT64)
    sp = tl.abs(FIRST_SP - tl.program_id(1))
    n = pid // NCB
    if INT64:
        n = n.to(tl.int64)
    k_c, mean_c, rstd_c = _stats(Stats, P, rows, gmask, CB, CG, CB_PAD, GB_PAD)
    w0, b0 = _param_bases(W, B, pid, first, NCB, PN, INT64)
    w_c, b_c = _params(w0, b0, chans, cmask, HAS_W, HAS_B)
    db_plane, groups = _part_planes(Part, SPLIT, N, C, NEED_DW, NEED_DB)
    if NEED_DX:
        s1_g, s2_g = _merge_groups(groups, rows, gmask, P, SPLIT, GB_PAD, BLOCK_S)
        s1_c = _spread(s1_g, CB, CG, CB_PAD, GB_PAD)
        s2_c = _spread(s2_g, CB, CG, CB_PAD, GB_PAD)
    else:
        s1_c = tl.zeros([CB_PAD], dtype=tl.float32)
        s2_c = s1_c
    if NEED_DX or WRITE_DRES:
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, HW)
        for t in range(0, CHUNK, BLOCK_HW):
            hw = start + tl.abs(TILE0 - t) + tl.arange(0, BLOCK_HW)
            offs, mask, xhat, gz = _tile(X, DY, Res, base, hw, hw < end, chans, cmask, C, k_c, mean_c, rstd_c,
                                         w_c, b_c, HAS_RES, ACT, INT64)
            _dx_tile(DX, DRes, offs, mask, xhat, gz, w_c, rstd_c, s1_c, s2_c, HW * CG, CENTER, NEED_DX,
                     WRITE_DRES)
    if sp == 0:
        if NEED_DW:
            _finish_plane(Part, DW, n, first, chans, cmask, N, C, SPLIT, W_NC)
        if NEED_DB:
            _finish_plane(db_plane, DB, n, first, chans, cmask, N, C, SPLIT, B_NC)


class PixelsBackward:
    """The backward launches for a pixels.PixelsForward signature and the gradients asked for."""

    def __init__(self, shape, spec, elem_bytes: int, needs, has_w: bool, has_b: bool, has_res: bool, act: int,
                 center: bool, profile, pn: tuple = (0, 0)):
        """``pn``: as PixelsForward's (n strides of a per-(sample, channel) weight and bias); their
        gradients, laid out [N, C], are the per-(sample, channel) sums themselves."""
        from .. import dispatch
        from .. import pixel_plan
        from .backward import _finish_kernel
        from .fastlaunch import Launcher
        need_dx, need_dw, need_db, need_dres = needs
        self.plan = plan = pixel_plan.choose(shape, spec, elem_bytes, profile, op="backward")
        cfg = plan.config
        N, C, HW, G = pixel_plan.geometry(shape, spec)
        cb = cfg["cb"]
        self.N, self.C, self.HW, self.G, self.P = N, C, HW, G, N * G
        self.ncb = C // cb
        self.split = cfg["split"]
        self.chunk = cfg.get("chunk", HW)
        self.write_dres = need_dres and act != 0
        self.need_dx = need_dx
        self.need_dw, self.need_db = need_dw and has_w, need_db and has_b
        self.pn = pn
        w_nc, b_nc = self.need_dw and pn[0] != 0, self.need_db and pn[1] != 0
        # Per-channel gradients are summed over the samples (partials + finish); per-sample ones not.
        self.need_wb = (self.need_dw and not w_nc) or (self.need_db and not b_nc)
        nc = dict(W_NC=w_nc, B_NC=b_nc) if (w_nc or b_nc) else {}
        const = dict(CB=cb, CG=C // G, CB_PAD=dispatch._pow2(cb), GB_PAD=dispatch._pow2(cb // (C // G)),
                     BLOCK_HW=cfg["block_hw"], HAS_W=has_w, HAS_B=has_b, HAS_RES=has_res, ACT=act,
                     INT64=N * C * HW > 2**31 - 1, num_warps=cfg["num_warps"])
        grid = N * self.ncb
        if plan.kernel == "split":
            # One fp32 buffer (_part_planes): a [SPLIT, N, C] plane per parameter gradient asked
            # for, then dx's [2, P, SPLIT] group partials. Nothing needed from the sums (only
            # dresidual): no sums launch.
            self.part_elems = ((self.need_dw + self.need_db) * self.split * N * C
                               + (2 * self.P * self.split if need_dx else 0))
            flags = dict(NEED_DX=need_dx, NEED_DW=self.need_dw, NEED_DB=self.need_db)
            self.sums = Launcher(_pixels_bwd_sums_kernel, (grid, self.split), dict(const, **flags))
            self.apply = Launcher(_pixels_bwd_apply_kernel, (grid, self.split),
                                  dict(const, **nc, **flags, CENTER=center, WRITE_DRES=self.write_dres,
                                       BLOCK_S=dispatch.MERGE_BLOCK))
            self.finish = None
            self.launches = 1 + (self.part_elems > 0)
            # after the sums kernel's sweep (none when only dresidual is asked for)
            self.order = pixels_order(grid, self.split, self.chunk, cfg["block_hw"], self.part_elems > 0)
        else:
            self.sums = None
            self.apply = Launcher(_pixels_bwd_kernel, (grid,),
                                  dict(const, **nc, FUSED=plan.kernel == "fused", CENTER=center, NEED_DX=need_dx,
                                       WRITE_DRES=self.write_dres, NEED_WB=self.need_wb))
            self.finish = Launcher(_finish_kernel, (triton.cdiv(C, 64),),
                                   dict(NEED_DW=self.need_dw and not w_nc, NEED_DB=self.need_db and not b_nc,
                                        BLOCK_C=64, BLOCK_S=dispatch.MERGE_BLOCK))
            self.launches = 1 + self.need_wb
            self.part_elems = 0
        self._room: dict = {}  # pr -> (sums, apply) launchers with the partials in the statistics buffer

    def _roomy(self, pr: int):
        got = self._room[pr] = (self.sums.with_constexprs(PART_ROW=pr), self.apply.with_constexprs(PART_ROW=pr))
        return got

    def __call__(self, x, dy, r, w, b, stats, dx, dres, dw, db, empty, ck=None, pr: int = 0):
        """Launch; ``dx``, ``dres``, ``dw``, ``db`` are the outputs (x where not asked for).
        ``ck``: the call key of fastlaunch.Launcher.keyed; ``pr``: the row of ``stats`` the
        split partials start at (launch.part_row; 0: allocated apart)."""
        if self.sums is not None:
            fixed = (self.P, self.ncb, self.HW, self.C, self.G, self.N, self.chunk, self.split, self.pn)
            part = x
            sums, apply = self.sums, self.apply
            if self.part_elems:
                if pr:
                    part = stats
                    sums, apply = self._room.get(pr) or self._roomy(pr)
                else:
                    part = empty((self.part_elems,), x.device)
                sums.keyed(ck, x, dy, r, w, b, stats, part, *fixed)
            apply.keyed(ck, x, dy, r, w, b, stats, part, dx, dres, dw, db, *fixed, *self.order)
            return
        part = empty((2, self.N, self.C), x.device) if self.need_wb else x
        self.apply.keyed(ck, x, dy, r, w, b, stats, dx, dres, part, dw, db, self.P, self.ncb, self.HW, self.C,
                         self.G, self.N, self.pn)
        if self.need_wb:
            self.finish.keyed(ck, part, dw, db, self.C, self.N)
