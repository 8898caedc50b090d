"""Forward kernels for channels_last GroupNorm/InstanceNorm that load whole pixels.

In channels_last a GroupNorm statistic (n, g) is Cg channels at every pixel: runs of Cg
elements, C apart. With Cg = 10, 20 or 40 (Stable Diffusion: 320..1280 channels in 32 groups)
those runs sit at arbitrary 16-byte phases, so the row/column kernels (forward.py) read them
one element at a time. These kernels read a *channel block* instead: CB consecutive channels
(GB whole groups, CB * element size a multiple of 16 bytes) at BLOCK_HW pixels, a
[BLOCK_HW, CB_PAD] tile whose rows are 16-byte aligned unit-stride runs, so every access is a
16-byte vector. Statistics are summed over the pixel axis first (per-channel partials), then
folded into groups with a [CB_PAD, GB_PAD] one-hot reduction: CB x GB work per program, not per
element. InstanceNorm is the case Cg = 1.

Same outputs as the row/column kernels: y, and the [5, P] statistics buffer (pivot K = the
statistic's first element, shifted mean, rstd, variance, mean; P = N * G, statistic n * G + g),
so the double backward is unchanged. Regimes (tritonorm/pixel_plan.py ``choose``):
  fused   one program per (sample, channel block) holds all its pixels: x read once, 1 launch.
  looped  the same program sweeps its pixels twice (moments, then y): 1 launch.
  split   SPLIT programs per (sample, channel block) each take a pixel chunk: partial moments,
          then an apply kernel that merges them (forward._merge_partials) and writes y.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import dispatch
from ..pixel_plan import choose, geometry
from .common import activation, chan_merge, finite_pivot, store_stats, tile_moments
from .forward import _merge_partials


@triton.jit
def _fold(v, CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr):
    """[CB_PAD] per-channel values -> [GB_PAD] sums over each group's CG channels."""
    if CG == 1:  # InstanceNorm: a channel is a group
        return v
    cl = tl.arange(0, CB_PAD)
    onehot = ((cl // CG)[:, None] == tl.arange(0, GB_PAD)[None, :]) & (cl < CB)[:, None]
    return tl.sum(tl.where(onehot, v[:, None], 0.0), axis=0)


@triton.jit
def _spread(v, CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr):
    """[GB_PAD] per-group values -> [CB_PAD] per-channel values (0 on padding)."""
    if CG == 1:
        return v
    cl = tl.arange(0, CB_PAD)
    onehot = ((cl // CG)[:, None] == tl.arange(0, GB_PAD)[None, :]) & (cl < CB)[:, None]
    return tl.sum(tl.where(onehot, v[None, :], 0.0), axis=1)


@triton.jit
def _block(pid, NCB, HW, C, G, CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr,
           GB_PAD: tl.constexpr, INT64: tl.constexpr):
    """A program's base offset (its sample and first channel), that first channel, its channels
    from there (offsets and mask), its statistics (indices and mask)."""
    n = pid // NCB
    cb = pid % NCB
    if INT64:
        n = n.to(tl.int64)
    base = n * HW * C
    cl = tl.arange(0, CB_PAD)
    cmask = cl < CB
    gl = tl.arange(0, GB_PAD)
    gmask = gl < CB // CG
    rows = n * G + cb * (CB // CG) + gl
    return base + cb * CB, cb * CB, cl, cmask, rows, gmask


@triton.jit
def _pivot(X, base, chans, gmask, CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr,
           GB_PAD: tl.constexpr, CENTER: tl.constexpr):
    """Each group's pivot (its first element: pixel 0, first channel; 0 if not finite, as
    common.pivot_input) per group and spread to its channels."""
    k = tl.zeros([GB_PAD], dtype=tl.float32)
    if CENTER:
        k = finite_pivot(tl.load(X + base + tl.arange(0, GB_PAD) * CG, mask=gmask, other=0.0).to(tl.float32))
    return k, _spread(k, CB, CG, CB_PAD, GB_PAD)


@triton.jit
def _pixel_tile(base, hw, hmask, chans, cmask, C, INT64: tl.constexpr):
    """Offsets and mask of a [pixels, CB_PAD] tile of the block at ``base`` (pixel stride C)."""
    mask = hmask[:, None] & cmask[None, :]
    if INT64:
        hw = hw.to(tl.int64)
    return base + hw[:, None] * C + chans[None, :], mask


@triton.jit
def _channel_moments(X, base, chans, cmask, k_c, C, start, end, SPAN, CENTER: tl.constexpr,
                     BLOCK_HW: tl.constexpr, INT64: tl.constexpr):
    """Per-channel (mean, M2) of x - K over pixels [start, end), BLOCK_HW pixels a tile, Chan-merged
    (SPAN: a fixed trip count covering end - start; tiles past ``end`` are empty)."""
    mean = tl.zeros(k_c.shape, dtype=tl.float32)
    m2 = tl.zeros(k_c.shape, dtype=tl.float32)
    for t in range(0, SPAN, BLOCK_HW):
        hw = start + t + tl.arange(0, BLOCK_HW)
        if INT64:
            hw = hw.to(tl.int64)
        mask = (hw < end)[:, None] & cmask[None, :]
        x = tl.load(X + base + hw[:, None] * C + chans[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - k_c[None, :], 0.0)
        nt = tl.maximum(tl.minimum(end - start - t, BLOCK_HW), 0).to(tl.float32)
        t_mean, t_m2 = tile_moments(d, mask, tl.maximum(nt, 1.0), CENTER, 0)
        n_before = tl.minimum(end - start, t).to(tl.float32)
        mean, m2 = chan_merge(n_before, mean, m2, nt, t_mean, t_m2)
    return mean, m2


@triton.jit
def _group_moments(mean_c, m2_c, count, CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr,
                   GB_PAD: tl.constexpr):
    """Fold per-channel (mean, M2) over ``count`` pixels each into per-group (mean, M2):
    equal counts, so mean_g = the channels' average and M2_g = sum M2_c + count sum (mean_c - mean_g)^2."""
    mean_g = _fold(mean_c, CB, CG, CB_PAD, GB_PAD) / CG
    dev = mean_c - _spread(mean_g, CB, CG, CB_PAD, GB_PAD)
    m2_g = _fold(m2_c + dev * (dev * count), CB, CG, CB_PAD, GB_PAD)
    return mean_g, m2_g


@triton.jit
def _param_bases(W, B, pid, first, NCB, PN, INT64: tl.constexpr):
    """Where program ``pid``'s weight and bias channels start: its first channel, in its sample's
    row for a per-(sample, channel) parameter (n stride PN[i] > 0; 0 for a per-channel one)."""
    n = pid // NCB
    if INT64:
        n = n.to(tl.int64)
    return W + n * PN[0] + first, B + n * PN[1] + first


@triton.jit
def _affine(W, B, chans, cmask, rstd_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel scale rstd * w and shift b, loaded once per program (W, B start at the
    block's first channel): the epilogue then holds three channel vectors, not five."""
    scale = rstd_c
    if HAS_W:
        scale = scale * tl.load(W + chans, mask=cmask, other=0.0).to(tl.float32)
    shift = tl.zeros_like(rstd_c)
    if HAS_B:
        shift = tl.load(B + chans, mask=cmask, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _epilogue_tile(x, Y, Res, offs, mask, k_c, mean_c, scale_c, shift_c, HAS_RES: tl.constexpr,
                   ACT: tl.constexpr):
    """y = act((x - K - mean) * rstd * w + b + residual) of one tile."""
    z = ((x - k_c[None, :]) - mean_c[None, :]) * scale_c[None, :] + shift_c[None, :]
    if HAS_RES:
        z = z + tl.load(Res + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, activation(z, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_sweep(X, Y, Res, base, chans, cmask, C, start, end, SPAN, k_c, mean_c, scale_c, shift_c,
                    HAS_RES: tl.constexpr, ACT: tl.constexpr, BLOCK_HW: tl.constexpr, INT64: tl.constexpr,
                    TILE0=0):
    """The epilogue over pixels [start, end), BLOCK_HW a tile (SPAN: a fixed trip count); tiles
    from start + |TILE0 - t| (TILE0 = SPAN - BLOCK_HW: last to first)."""
    for t in range(0, SPAN, BLOCK_HW):
        hw = start + tl.abs(TILE0 - t) + tl.arange(0, BLOCK_HW)
        offs, mask = _pixel_tile(base, hw, hw < end, chans, cmask, C, INT64)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        _epilogue_tile(x, Y, Res, offs, mask, k_c, mean_c, scale_c, shift_c, HAS_RES, ACT)


@triton.jit(do_not_specialize=["NCB"])
def _pixels_fwd_kernel(
    X, Y, Res, W, B, Stats,   # Stats: [5, P] fp32 out (see forward.py)
    P, NCB, HW, C, G, eps,    # statistics, channel blocks per sample, pixels, channels, groups
    PN,                       # n strides of weight and bias: 0 per channel, else per (sample, channel)
    CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr, FUSED: tl.constexpr, CENTER: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, INT64: tl.constexpr,
):
    """One program per (sample, channel block). FUSED (BLOCK_HW >= HW): the block's pixels in
    registers, x read once; else looped: a moments sweep, then an epilogue sweep."""
    base, first, chans, cmask, rows, gmask = _block(tl.program_id(0), NCB, HW, C, G, CB, CG, CB_PAD, GB_PAD, INT64)
    k_g, k_c = _pivot(X, base, chans, gmask, CB, CG, CB_PAD, GB_PAD, CENTER)
    if FUSED:
        hw = tl.arange(0, BLOCK_HW)
        offs, mask = _pixel_tile(base, hw, hw < HW, chans, cmask, C, INT64)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean_c, m2_c = tile_moments(tl.where(mask, x - k_c[None, :], 0.0), mask, HW, CENTER, 0)
    else:
        mean_c, m2_c = _channel_moments(X, base, chans, cmask, k_c, C, 0, HW, HW, CENTER, BLOCK_HW, INT64)
    mean_g, m2_g = _group_moments(mean_c, m2_c, HW * 1.0, CB, CG, CB_PAD, GB_PAD)
    rstd_g = store_stats(Stats, P, rows, gmask, k_g, mean_g, m2_g / (HW * CG), eps, X, X, 0.0, 1.0, 0)
    mean_c = _spread(mean_g, CB, CG, CB_PAD, GB_PAD)
    w0, b0 = _param_bases(W, B, tl.program_id(0), first, NCB, PN, INT64)
    scale_c, shift_c = _affine(w0, b0, chans, cmask, _spread(rstd_g, CB, CG, CB_PAD, GB_PAD),
                               HAS_W, HAS_B)
    if FUSED:
        _epilogue_tile(x, Y, Res, offs, mask, k_c, mean_c, scale_c, shift_c, HAS_RES, ACT)
    else:
        _epilogue_sweep(X, Y, Res, base, chans, cmask, C, 0, HW, HW, k_c, mean_c, scale_c, shift_c,
                        HAS_RES, ACT, BLOCK_HW, INT64)


@triton.jit(do_not_specialize=["NCB", "SPLIT"])
def _pixels_partial_kernel(
    X, Part,                  # partial shifted means and M2 out, [2, P, SPLIT] fp32 (as forward.py)
    P, NCB, HW, C, G, CHUNK, SPLIT,  # CHUNK: pixels per split (a multiple of BLOCK_HW)
    CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr, CENTER: tl.constexpr, INT64: tl.constexpr,
    PART_ROW: tl.constexpr = 0,  # > 0: Part is the statistics buffer, the partials from its row PART_ROW
):
    """Split regime, stage 1: the per-group moments of one pixel chunk."""
    if PART_ROW != 0:
        Part += PART_ROW * P
    base, first, chans, cmask, rows, gmask = _block(tl.program_id(0), NCB, HW, C, G, CB, CG, CB_PAD, GB_PAD, INT64)
    sp = tl.program_id(1)
    k_g, k_c = _pivot(X, base, chans, gmask, CB, CG, CB_PAD, GB_PAD, CENTER)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    mean_c, m2_c = _channel_moments(X, base, chans, cmask, k_c, C, start, end, CHUNK, CENTER, BLOCK_HW, INT64)
    mean_g, m2_g = _group_moments(mean_c, m2_c, (end - start) * 1.0, CB, CG, CB_PAD, GB_PAD)
    tl.store(Part + rows * SPLIT + sp, mean_g, mask=gmask)
    tl.store(Part + P * SPLIT + rows * SPLIT + sp, m2_g, mask=gmask)


@triton.jit(do_not_specialize=["NCB", "SPLIT", "FIRST_PID", "FIRST_SP", "TILE0"])
def _pixels_apply_kernel(
    X, Y, Res, W, B, Stats, Part,
    P, NCB, HW, C, G, CHUNK, SPLIT, eps, PN,
    FIRST_PID, FIRST_SP, TILE0,  # program (|FIRST_PID - pid0|, |FIRST_SP - pid1|), tiles from |TILE0 - t|
    CB: tl.constexpr, CG: tl.constexpr, CB_PAD: tl.constexpr, GB_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr, CENTER: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, INT64: tl.constexpr,
    PART_ROW: tl.constexpr = 0,  # as _pixels_partial_kernel's (Part is Stats)
):
    """Split regime, stage 2: merge the SPLIT partials of the block's groups (forward's merge, in
    elements: CHUNK * CG per split, HW * CG per statistic), store the statistics (chunk 0), and
    write y over this program's pixel chunk. Its grid and chunks are the partial kernel's; with
    FIRST_PID, FIRST_SP, TILE0 the last ones (pixels_order) it runs that kernel's sweep backwards,
    so it first re-reads what the L2 got last."""
    if PART_ROW != 0:
        Part += PART_ROW * P
    pid = tl.abs(FIRST_PID - tl.program_id(0))
    base, first, chans, cmask, rows, gmask = _block(pid, NCB, HW, C, G, CB, CG, CB_PAD, GB_PAD, INT64)
    sp = tl.abs(FIRST_SP - tl.program_id(1))
    k_g, k_c = _pivot(X, base, chans, gmask, CB, CG, CB_PAD, GB_PAD, CENTER)
    mean_g, var_g = _merge_partials(Part, rows, gmask, P, HW * CG, CHUNK * CG, SPLIT, GB_PAD, BLOCK_S)
    rstd_g = tl.rsqrt(var_g + eps)
    if sp == 0:
        store_stats(Stats, P, rows, gmask, k_g, mean_g, var_g, eps, X, X, 0.0, 1.0, 0)
    mean_c = _spread(mean_g, CB, CG, CB_PAD, GB_PAD)
    w0, b0 = _param_bases(W, B, pid, first, NCB, PN, INT64)
    scale_c, shift_c = _affine(w0, b0, chans, cmask, _spread(rstd_g, CB, CG, CB_PAD, GB_PAD),
                               HAS_W, HAS_B)
    start = sp * CHUNK
    _epilogue_sweep(X, Y, Res, base, chans, cmask, C, start, tl.minimum(start + CHUNK, HW), CHUNK, k_c, mean_c,
                    scale_c, shift_c, HAS_RES, ACT, BLOCK_HW, INT64, TILE0)


def pixels_order(grid0: int, split: int, chunk: int, block_hw: int, after_sweep: bool,
                 reverse: bool | None = None) -> tuple[int, int, int]:
    """(FIRST_PID, FIRST_SP, TILE0) of the whole-pixel apply kernels: the first stage's sweep
    run backwards (its last program first, each chunk's pixels last to first) when the pass
    follows it and ``reverse`` (default dispatch.APPLY_REVERSE; as launch.tile_order for the row
    kernels), else as that sweep ran."""
    from .. import dispatch

    if after_sweep and (dispatch.APPLY_REVERSE if reverse is None else reverse):
        return grid0 - 1, split - 1, chunk - block_hw
    return 0, 0, 0


# --- Planning: tritonorm/pixel_plan.py (no Triton import: explain() plans without it) -----------

class PixelsForward:
    """The forward launches of an ``applies`` signature (train mode, no running statistics)."""

    def __init__(self, shape, spec, elem_bytes: int, has_w: bool, has_b: bool, has_res: bool, act: int,
                 center: bool, profile: dispatch.DeviceProfile, pn: tuple = (0, 0)):
        """``pn``: the n strides of weight and bias when they are per (sample, channel)
        (launch.ForwardPlan's ``nc``), 0 for per-channel ones."""
        from .fastlaunch import Launcher
        self.plan = plan = choose(shape, spec, elem_bytes, profile)
        cfg = plan.config
        N, C, HW, G = geometry(shape, spec)
        cb = cfg["cb"]
        self.P = N * G
        self.N, self.C, self.HW, self.G = N, C, HW, G
        self.pn = pn
        self.ncb = C // cb
        self.split = cfg["split"]
        self.chunk = cfg.get("chunk", HW)
        const = dict(CB=cb, CG=C // G, CB_PAD=dispatch._pow2(cb), GB_PAD=dispatch._pow2(cb // (C // G)),
                     BLOCK_HW=cfg["block_hw"], CENTER=center, INT64=N * C * HW > 2**31 - 1,
                     num_warps=cfg["num_warps"])
        flags = dict(HAS_W=has_w, HAS_B=has_b, HAS_RES=has_res, ACT=act)
        grid = N * self.ncb
        if plan.kernel == "split":
            self.partial = Launcher(_pixels_partial_kernel, (grid, self.split), const)
            self.apply = Launcher(_pixels_apply_kernel, (grid, self.split), dict(const, **flags, BLOCK_S=dispatch.MERGE_BLOCK))
            self.order = pixels_order(grid, self.split, self.chunk, cfg["block_hw"], True)
            self.launches = 2
        else:
            self.partial = None
            self.apply = Launcher(_pixels_fwd_kernel, (grid,), dict(const, **flags, FUSED=plan.kernel == "fused"))
            self.launches = 1
        # Rows of the [., P] statistics buffer the split partials take when they sit there
        # (launch.part_row); pr -> (partial, apply) launchers reading them there.
        self.part_rows = 2 * self.split if self.partial is not None else 0
        self._room: dict = {}

    def _roomy(self, pr: int):
        got = self._room[pr] = (self.partial.with_constexprs(PART_ROW=pr), self.apply.with_constexprs(PART_ROW=pr))
        return got

    def __call__(self, x, y, residual, w, b, stats, eps: float, empty, ck=None, pr: int = 0):
        """``ck``: the call key of fastlaunch.Launcher.keyed; ``pr``: the row of ``stats`` the
        partials start at (launch.part_row; 0: allocated apart)."""
        r = x if residual is None else residual
        if self.partial is not None:
            if pr:
                part = stats
                partial, apply = self._room.get(pr) or self._roomy(pr)
            else:
                part = empty((2, self.P, self.split), x.device)
                partial, apply = self.partial, self.apply
            partial.keyed(ck, x, part, self.P, self.ncb, self.HW, self.C, self.G, self.chunk, self.split)
            apply.keyed(ck, x, y, r, w, b, stats, part, self.P, self.ncb, self.HW, self.C, self.G, self.chunk,
                        self.split, eps, self.pn, *self.order)
        else:
            self.apply.keyed(ck, x, y, r, w, b, stats, self.P, self.ncb, self.HW, self.C, self.G, eps, self.pn)
        return y, stats
