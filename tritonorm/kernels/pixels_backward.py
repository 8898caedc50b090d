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
  split         ``_pixels_bwd_sums_kernel`` on SPLIT pixel chunks (partials [2, SPLIT, N, C]),
                then ``_pixels_bwd_apply_kernel``: each program adds its block's SPLIT partials
                for dx, and the programs of sample 0, chunk 0 finish dweight/dbias. 2 launches.
Fixed-order fp32 sums, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import tile_grads
from .pixels import _block, _fold, _param_bases, _pixel_tile, _spread


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
    xhat, gz = tile_grads(X, DY, Res, offs, mask, k_c, mean_c, rstd_c, w_c, b_c, HAS_RES, ACT)
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
    w0, b0 = _param_bases(W, B, first, NCB, PN, INT64)
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


@triton.jit(do_not_specialize=["NCB", "SPLIT"])
def _pixels_bwd_sums_kernel(
    X, DY, Res, W, B, Stats, Part,  # Part: fp32 [2, SPLIT, N, C] per-channel sums of gz*xhat, gz
    P, NCB, HW, C, G, N, CHUNK, SPLIT, PN,
    CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, INT64: tl.constexpr,
):
    """Split regime, stage 1: per-channel sums of one pixel chunk of a block."""
    base, first, chans, cmask, rows, gmask = _block(tl.program_id(0), NCB, HW, C, G, CB, CG, CB_PAD, GB_PAD, INT64)
    sp = tl.program_id(1)
    k_c, mean_c, rstd_c = _stats(Stats, P, rows, gmask, CB, CG, CB_PAD, GB_PAD)
    w0, b0 = _param_bases(W, B, first, NCB, PN, INT64)
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
    row = (sp * N + n) * C + first + chans
    tl.store(Part + row, u2, mask=cmask)
    tl.store(Part + SPLIT * N * C + row, u1, mask=cmask)


@triton.jit(do_not_specialize=["NCB", "SPLIT"])
def _pixels_bwd_apply_kernel(
    X, DY, Res, W, B, Stats, Part,
    DX, DRes, DW, DB,
    P, NCB, HW, C, G, N, CHUNK, SPLIT, PN,
    CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr, CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr, WRITE_DRES: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, INT64: tl.constexpr,
    W_NC: tl.constexpr = False, B_NC: tl.constexpr = False,
):
    """Split regime, stage 2: the block's SPLIT partial sums added in a fixed order give S1, S2
    and dx over this program's chunk; the programs of sample 0, chunk 0 add every sample's and
    chunk's partials of their channels: dweight and dbias, cast once."""
    base, first, chans, cmask, rows, gmask = _block(tl.program_id(0), NCB, HW, C, G, CB, CG, CB_PAD, GB_PAD, INT64)
    sp = tl.program_id(1)
    n = tl.program_id(0) // NCB
    if INT64:
        n = n.to(tl.int64)
    k_c, mean_c, rstd_c = _stats(Stats, P, rows, gmask, CB, CG, CB_PAD, GB_PAD)
    w0, b0 = _param_bases(W, B, first, NCB, PN, INT64)
    w_c, b_c = _params(w0, b0, chans, cmask, HAS_W, HAS_B)
    plane = SPLIT * N * C
    if NEED_DX:
        u1 = tl.zeros([CB_PAD], dtype=tl.float32)
        u2 = tl.zeros([CB_PAD], dtype=tl.float32)
        for s in range(0, SPLIT):
            row = (s * N + n) * C + first + chans
            u2 += tl.load(Part + row, mask=cmask, other=0.0)
            u1 += tl.load(Part + plane + row, mask=cmask, other=0.0)
        s1_c, s2_c = _group_sums(u1, u2, w_c, CB, CG, CB_PAD, GB_PAD)
    else:
        s1_c = tl.zeros([CB_PAD], dtype=tl.float32)
        s2_c = s1_c
    if NEED_DX or WRITE_DRES:
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, HW)
        for t in range(0, CHUNK, BLOCK_HW):
            hw = start + t + tl.arange(0, BLOCK_HW)
            offs, mask, xhat, gz = _tile(X, DY, Res, base, hw, hw < end, chans, cmask, C, k_c, mean_c, rstd_c,
                                         w_c, b_c, HAS_RES, ACT, INT64)
            _dx_tile(DX, DRes, offs, mask, xhat, gz, w_c, rstd_c, s1_c, s2_c, HW * CG, CENTER, NEED_DX,
                     WRITE_DRES)
    if NEED_DW or NEED_DB:
        # Per channel: the programs of sample 0 add every sample's and chunk's partials; per
        # (sample, channel) (W_NC / B_NC): each sample's chunk-0 program adds its own chunks.
        if sp == 0:
            dw = tl.zeros([CB_PAD], dtype=tl.float32)
            db = tl.zeros([CB_PAD], dtype=tl.float32)
            dw_nc = tl.zeros([CB_PAD], dtype=tl.float32)
            db_nc = tl.zeros([CB_PAD], dtype=tl.float32)
            if n == 0:
                for r in range(0, SPLIT * N):
                    dw += tl.load(Part + r * C + first + chans, mask=cmask, other=0.0)
                    db += tl.load(Part + plane + r * C + first + chans, mask=cmask, other=0.0)
            if W_NC or B_NC:
                for s in range(0, SPLIT):
                    row = (s * N + n) * C + first + chans
                    dw_nc += tl.load(Part + row, mask=cmask, other=0.0)
                    db_nc += tl.load(Part + plane + row, mask=cmask, other=0.0)
            if NEED_DW:
                if W_NC:
                    tl.store(DW + n * C + first + chans, dw_nc.to(DW.dtype.element_ty), mask=cmask)
                elif n == 0:
                    tl.store(DW + first + chans, dw.to(DW.dtype.element_ty), mask=cmask)
            if NEED_DB:
                if B_NC:
                    tl.store(DB + n * C + first + chans, db_nc.to(DB.dtype.element_ty), mask=cmask)
                elif n == 0:
                    tl.store(DB + first + chans, db.to(DB.dtype.element_ty), mask=cmask)


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
            self.sums = Launcher(_pixels_bwd_sums_kernel, (grid, self.split), const)
            self.apply = Launcher(_pixels_bwd_apply_kernel, (grid, self.split),
                                  dict(const, **nc, CENTER=center, NEED_DX=need_dx, WRITE_DRES=self.write_dres,
                                       NEED_DW=self.need_dw, NEED_DB=self.need_db))
            self.finish = None
            self.launches = 2
        else:
            self.sums = None
            self.apply = Launcher(_pixels_bwd_kernel, (grid,),
                                  dict(const, **nc, FUSED=plan.kernel == "fused", CENTER=center, NEED_DX=need_dx,
                                       WRITE_DRES=self.write_dres, NEED_WB=self.need_wb))
            self.finish = Launcher(_finish_kernel, (triton.cdiv(C, 64),),
                                   dict(NEED_DW=self.need_dw and not w_nc, NEED_DB=self.need_db and not b_nc,
                                        BLOCK_C=64, BLOCK_S=16))
            self.launches = 1 + self.need_wb

    def __call__(self, x, dy, r, w, b, stats, dx, dres, dw, db, empty):
        """Launch; ``dx``, ``dres``, ``dw``, ``db`` are the outputs (x where not asked for)."""
        if self.sums is not None:
            part = empty((2, self.split, self.N, self.C), x.device)
            fixed = (self.P, self.ncb, self.HW, self.C, self.G, self.N, self.chunk, self.split, self.pn)
            self.sums(x, dy, r, w, b, stats, part, *fixed)
            self.apply(x, dy, r, w, b, stats, part, dx, dres, dw, db, *fixed)
            return
        part = empty((2, self.N, self.C), x.device) if self.need_wb else x
        self.apply(x, dy, r, w, b, stats, dx, dres, part, dw, db, self.P, self.ncb, self.HW, self.C, self.G, self.N,
                   self.pn)
        if self.need_wb:
            self.finish(part, dw, db, self.C, self.N)
