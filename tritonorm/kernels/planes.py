"""BatchNorm on dense NCHW tensors whose planes (H*W elements) are not a multiple of 16: flat tiles.

BatchNorm's statistic c is the plane (n, c) of every sample: N runs of HW elements, C*HW apart.
With HW = 196 or 49 (ResNet's 14x14 and 7x7 stages) a run starts at an arbitrary 16-byte phase
and the row/column kernels (forward.py), which split the column index by HW at run time, read
it one element at a time. Here a program owns a *channel block*: CB consecutive channels with
CB * HW * element size a multiple of 16 bytes, so for each sample the block is one contiguous,
16-byte aligned run of T = CB * HW elements at (n * NCB + block) * T. A tile is BLOCK_N such runs,
[BLOCK_N, T_PAD] (T_PAD = pow2(T)): every access a 16-byte vector. The channel of a position is
``idx // HW`` with HW constexpr (a multiply, not a division).

Statistics are gathered per *position* of the run first (sums over samples, on the [T_PAD]
axis: no per-element channel work in the sweeps), then folded into channels once per program
with a [T_PAD, CB_PAD] one-hot reduction; per-channel values are spread back to positions the
same way, once. Forward, one launch: per-position (mean, M2) of x - K_c (pivot K_c = x[0, c, 0],
as common.pivot_input), exact per tile and Chan-merged over the sample tiles, folded into channel
moments (equal counts: M2_c = sum M2_p + N sum (mean_p - mean_c)^2); common.store_stats stores
the [5, C] statistics and blends the running statistics; a second sweep writes y (FUSED: all
samples in one tile, x read once). Eval (``GIVEN``): the running statistics, one sweep.
Backward, one launch: the per-channel sums u1 = sum gz, u2 = sum gz * xhat are dbias and dweight
(a statistic is one channel), stored directly, and with S1 = w u1, S2 = w u2 a second sweep
writes dx = rstd (g - S1/M - xhat S2/M). Fixed-order fp32 sums, no atomics.
Ghost BatchNorm (S sample groups, statistic s*C + c over the group's N/S samples): the grid is
(blocks, S), a program sweeps its group's samples only (pivot: the group's first sample's
element) and stores its statistics at s*C + c of the [5, S*C] buffer (no running blend: the
caller blends the S*C statistics into C running values).
Backward, dbias and dweight are sums over every group: the programs store their (s, c) sums as
fp32 partials [2, S, C] and backward._finish_kernel adds them over S (two launches).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .. import dispatch
from ..dispatch import sweep_back
from ..planes_plan import _plane, choose
from .common import activation, chan_merge, finite_pivot, store_stats, tile_grads, tile_moments


@triton.jit
def _fold(v, ch, CB_PAD: tl.constexpr):
    """[T_PAD] per-position values -> [CB_PAD] per-channel sums (ch: each position's channel)."""
    onehot = ch[:, None] == tl.arange(0, CB_PAD)[None, :]
    return tl.sum(tl.where(onehot, v[:, None], 0.0), axis=0)


@triton.jit
def _spread(v, ch, CB_PAD: tl.constexpr):
    """[CB_PAD] per-channel values -> [T_PAD] per-position values."""
    onehot = ch[:, None] == tl.arange(0, CB_PAD)[None, :]
    return tl.sum(tl.where(onehot, v[None, :], 0.0), axis=1)


@triton.jit
def _positions(HW: tl.constexpr, CB: tl.constexpr, T_PAD: tl.constexpr):
    """The run's positions, their mask and their channel within the block."""
    idx = tl.arange(0, T_PAD)
    return idx, idx < CB * HW, idx // HW


@triton.jit
def _program(N, C, HW: tl.constexpr, CB: tl.constexpr, CB_PAD: tl.constexpr, T_PAD: tl.constexpr):
    """Program (channel block, sample group): its block index, the group's first sample, the
    run's positions (offsets, mask, channel of each), the block's channels (and mask), its first
    channel and first statistic (s*C + c)."""
    pid = tl.program_id(0)
    n_lo = tl.program_id(1) * N
    idx, pmask, ch = _positions(HW, CB, T_PAD)
    cl = tl.arange(0, CB_PAD)
    cmask = cl < CB
    first = pid * CB
    stat = tl.program_id(1) * C + first
    return pid, n_lo, idx, pmask, ch, cl, cmask, first, stat


@triton.jit
def _tile(pid, n_lo, n0, N, NCB, idx, pmask, HW: tl.constexpr, CB: tl.constexpr, BLOCK_N: tl.constexpr,
          INT64: tl.constexpr):
    """Offsets and mask of samples n_lo + n0 .. n_lo + n0 + BLOCK_N of the block (its sample
    group's first sample n_lo, N samples in the group): rows 16-byte aligned runs."""
    local = n0 + tl.arange(0, BLOCK_N)
    rmask = local < N
    rows = n_lo + local
    if INT64:
        rows = rows.to(tl.int64)
    offs = ((rows * NCB + pid) * (CB * HW))[:, None] + idx[None, :]
    return offs, rmask[:, None] & pmask[None, :]


@triton.jit
def _params(W, B, first, cl, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    w = tl.full(cl.shape, 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + first + cl, mask=cmask, other=0.0).to(tl.float32)
    b = tl.zeros(cl.shape, dtype=tl.float32)
    if HAS_B:
        b = tl.load(B + first + cl, mask=cmask, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _y_tile(d, Y, Res, offs, mask, mean_e, scale_e, shift_e, HAS_RES: tl.constexpr, ACT: tl.constexpr,
            EV: tl.constexpr):
    """y = act(((x - K) - mean) * rstd * w + b + residual) of one tile (d = x - K); ``EV``: the
    eviction policy of its accesses (common.load2d)."""
    z = (d - mean_e[None, :]) * scale_e[None, :] + shift_e[None, :]
    if HAS_RES:
        z = z + tl.load(Res + offs, mask=mask, other=0.0, eviction_policy=EV).to(tl.float32)
    tl.store(Y + offs, activation(z, ACT).to(Y.dtype.element_ty), mask=mask, eviction_policy=EV)


@triton.jit(do_not_specialize=["N", "N_BACK"])
def _planes_fwd_kernel(
    X, Y, Res, W, B, Stats,   # Stats: [5, P] fp32 out (see forward.py), P = S*C, statistic s*C + c
    RunMean, RunVar,          # running statistics: blended (RUNNING) or read (GIVEN); S = 1 only
    N, NCB, C, P, eps, momentum, unbias,  # N: samples a sample group
    N_BACK,                   # the y sweep's sample tiles: tile |N_BACK - j| (dispatch.sweep_back)
    HW: tl.constexpr, CB: tl.constexpr, CB_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    FUSED: tl.constexpr, GIVEN: tl.constexpr, CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, RUNNING: tl.constexpr, INT64: tl.constexpr,
    EV: tl.constexpr = "",    # the y sweep's eviction policy (dispatch.second_pass_policy)
):
    """One program per (channel block, sample group), sweeping the group's N samples: moments,
    statistics, then y."""
    pid, n_lo, idx, pmask, ch, cl, cmask, first, stat = _program(N, C, HW, CB, CB_PAD, T_PAD)
    k_c = tl.zeros([CB_PAD], dtype=tl.float32)
    if GIVEN:
        var_c = tl.load(RunVar + first + cl, mask=cmask, other=1.0).to(tl.float32)
        mean_c = tl.zeros([CB_PAD], dtype=tl.float32)
        if CENTER:
            mean_c = tl.load(RunMean + first + cl, mask=cmask, other=0.0).to(tl.float32)
    else:
        if CENTER:  # each statistic's first element, 0 if not finite (common.pivot_input)
            base = n_lo
            if INT64:
                base = base.to(tl.int64)
            k_c = finite_pivot(tl.load(X + base * NCB * (CB * HW) + (first + cl) * HW, mask=cmask,
                                       other=0.0).to(tl.float32))
    k_e = _spread(k_c, ch, CB_PAD)
    if not GIVEN:
        # Per-position (mean, M2) over the samples, exact per tile, Chan-merged across tiles.
        mean_p = tl.zeros([T_PAD], dtype=tl.float32)
        m2_p = tl.zeros([T_PAD], dtype=tl.float32)
        if FUSED:
            offs, mask = _tile(pid, n_lo, 0, N, NCB, idx, pmask, HW, CB, BLOCK_N, INT64)
            d = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - k_e[None, :], 0.0)
            mean_p, m2_p = tile_moments(d, mask, N, CENTER, 0)
        else:
            for n0 in range(0, N, BLOCK_N):
                offs, mask = _tile(pid, n_lo, n0, N, NCB, idx, pmask, HW, CB, BLOCK_N, INT64)
                d = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - k_e[None, :], 0.0)
                nt = tl.minimum(N - n0, BLOCK_N).to(tl.float32)
                t_mean, t_m2 = tile_moments(d, mask, nt, CENTER, 0)
                mean_p, m2_p = chan_merge(n0 * 1.0, mean_p, m2_p, nt, t_mean, t_m2)
        # Positions -> channels: HW positions of N samples each.
        if CENTER:
            mean_c = _fold(mean_p, ch, CB_PAD) / HW
            dev_p = tl.where(pmask, mean_p - _spread(mean_c, ch, CB_PAD), 0.0)
            m2_c = _fold(m2_p + dev_p * (dev_p * N), ch, CB_PAD)
        else:
            mean_c = tl.zeros([CB_PAD], dtype=tl.float32)
            m2_c = _fold(m2_p, ch, CB_PAD)
        var_c = m2_c / (N * HW)
    rstd_c = store_stats(Stats, P, stat + cl, cmask, k_c, mean_c, var_c, eps, RunMean, RunVar, momentum, unbias,
                         RUNNING)
    w_c, b_c = _params(W, B, first, cl, cmask, HAS_W, HAS_B)
    mean_e = _spread(mean_c, ch, CB_PAD)
    scale_e = _spread(rstd_c * w_c, ch, CB_PAD)
    shift_e = _spread(b_c, ch, CB_PAD)
    if FUSED and not GIVEN:
        _y_tile(d, Y, Res, offs, mask, mean_e, scale_e, shift_e, HAS_RES, ACT, "")
    else:
        for j in range(0, tl.cdiv(N, BLOCK_N)):
            offs, mask = _tile(pid, n_lo, tl.abs(N_BACK - j) * BLOCK_N, N, NCB, idx, pmask, HW, CB, BLOCK_N, INT64)
            d = tl.load(X + offs, mask=mask, other=0.0, eviction_policy=EV).to(tl.float32) - k_e[None, :]
            _y_tile(d, Y, Res, offs, mask, mean_e, scale_e, shift_e, HAS_RES, ACT, EV)


@triton.jit
def _dx_tile(DX, offs, mask, xhat, gz, w_e, rstd_e, s1_e, s2_e, GIVEN: tl.constexpr, CENTER: tl.constexpr,
             EV: tl.constexpr):
    """dx = rstd (g - S1/M - xhat S2/M) (S1, S2 already over M); with given statistics rstd g.
    ``EV``: the store's eviction policy (common.load2d)."""
    g = gz * w_e[None, :]
    if GIVEN:
        dx = g * rstd_e[None, :]
    elif CENTER:
        dx = (g - s1_e[None, :] - xhat * s2_e[None, :]) * rstd_e[None, :]
    else:
        dx = (g - xhat * s2_e[None, :]) * rstd_e[None, :]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask, eviction_policy=EV)


@triton.jit(do_not_specialize=["N", "N_BACK"])
def _planes_bwd_kernel(
    X, DY, Res, W, B, Stats,  # Stats: the forward's [5, P] statistics, P = S*C
    DX, DRes, DW, DB,         # outputs (x where not asked for); S > 1: DW, DB the fp32 [S, C] partials
    N, NCB, C, P,             # N: samples a sample group
    N_BACK,                   # the dx sweep's sample tiles: tile |N_BACK - j| (dispatch.sweep_back)
    HW: tl.constexpr, CB: tl.constexpr, CB_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    FUSED: tl.constexpr, GIVEN: tl.constexpr, CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr, WRITE_DRES: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, INT64: tl.constexpr,
    EV: tl.constexpr = "",    # the dx sweep's eviction policy (dispatch.second_pass_policy)
):
    """One program per (channel block, sample group): the sums sweep (dweight, dbias,
    dresidual; with given statistics dx too), then the dx sweep (FUSED: from registers). The
    sums are stored at s*C + c: the gradients themselves with one group, else fp32 partials."""
    pid, n_lo, idx, pmask, ch, cl, cmask, first, stat = _program(N, C, HW, CB, CB_PAD, T_PAD)
    k_e = _spread(tl.load(Stats + stat + cl, mask=cmask, other=0.0), ch, CB_PAD)
    mean_e = _spread(tl.load(Stats + P + stat + cl, mask=cmask, other=0.0), ch, CB_PAD)
    rstd_c = tl.load(Stats + 2 * P + stat + cl, mask=cmask, other=0.0)
    rstd_e = _spread(rstd_c, ch, CB_PAD)
    w_c, b_c = _params(W, B, first, cl, cmask, HAS_W, HAS_B)
    w_e = _spread(w_c, ch, CB_PAD)
    b_e = _spread(b_c, ch, CB_PAD)
    zero_e = tl.zeros([T_PAD], dtype=tl.float32)
    acc1 = tl.zeros([T_PAD], dtype=tl.float32)
    acc2 = tl.zeros([T_PAD], dtype=tl.float32)
    if NEED_DX or NEED_DW or NEED_DB or WRITE_DRES:  # with GIVEN, dx needs no sums: stored here
        if FUSED:
            offs, mask = _tile(pid, n_lo, 0, N, NCB, idx, pmask, HW, CB, BLOCK_N, INT64)
            xhat, gz = tile_grads(X, DY, Res, offs, mask, k_e, mean_e, rstd_e, w_e, b_e, HAS_RES, ACT, "")
            acc1 = tl.sum(gz, axis=0)
            acc2 = tl.sum(gz * xhat, axis=0)
            if WRITE_DRES:
                tl.store(DRes + offs, gz.to(DRes.dtype.element_ty), mask=mask)
            if NEED_DX and GIVEN:
                _dx_tile(DX, offs, mask, xhat, gz, w_e, rstd_e, zero_e, zero_e, GIVEN, CENTER, "")
        else:
            for n0 in range(0, N, BLOCK_N):
                offs, mask = _tile(pid, n_lo, n0, N, NCB, idx, pmask, HW, CB, BLOCK_N, INT64)
                xhat, gz = tile_grads(X, DY, Res, offs, mask, k_e, mean_e, rstd_e, w_e, b_e, HAS_RES, ACT, "")
                acc1 += tl.sum(gz, axis=0)
                acc2 += tl.sum(gz * xhat, axis=0)
                if WRITE_DRES:
                    tl.store(DRes + offs, gz.to(DRes.dtype.element_ty), mask=mask)
                if NEED_DX and GIVEN:
                    _dx_tile(DX, offs, mask, xhat, gz, w_e, rstd_e, zero_e, zero_e, GIVEN, CENTER, "")
    u1 = _fold(acc1, ch, CB_PAD)  # dbias (of the group's samples): each statistic is one channel
    u2 = _fold(acc2, ch, CB_PAD)  # dweight
    if NEED_DW:
        tl.store(DW + stat + cl, u2.to(DW.dtype.element_ty), mask=cmask)
    if NEED_DB:
        tl.store(DB + stat + cl, u1.to(DB.dtype.element_ty), mask=cmask)
    if NEED_DX and not GIVEN:
        m = (N * HW) * 1.0
        s1_e = _spread(w_c * u1, ch, CB_PAD) / m
        s2_e = _spread(w_c * u2, ch, CB_PAD) / m
        if FUSED:
            _dx_tile(DX, offs, mask, xhat, gz, w_e, rstd_e, s1_e, s2_e, GIVEN, CENTER, "")
        else:
            for j in range(0, tl.cdiv(N, BLOCK_N)):
                offs, mask = _tile(pid, n_lo, tl.abs(N_BACK - j) * BLOCK_N, N, NCB, idx, pmask, HW, CB, BLOCK_N,
                                   INT64)
                xhat, gz = tile_grads(X, DY, Res, offs, mask, k_e, mean_e, rstd_e, w_e, b_e, HAS_RES, ACT, EV)
                _dx_tile(DX, offs, mask, xhat, gz, w_e, rstd_e, s1_e, s2_e, GIVEN, CENTER, EV)


# --- Planning: tritonorm/planes_plan.py (no Triton import: explain() plans without it) ----------


def _const(shape, elem_bytes, plan):
    N, C, HW = shape[0], shape[1], _plane(shape)
    cb = plan.config["planes"]
    return dict(HW=HW, CB=cb, CB_PAD=dispatch._pow2(cb), T_PAD=dispatch._pow2(cb * HW),
                BLOCK_N=plan.config["block_n"], FUSED=plan.kernel == "fused", INT64=N * C * HW > 2**31 - 1,
                num_warps=plan.config["num_warps"])


class PlanesForward:
    """The forward launch of an ``applies`` signature: mode "train" (``running``: launch.py's
    RUNNING level) or "given" (normalize with the running statistics). ``groups``: the sample
    groups S (Ghost BatchNorm; training without an in-kernel running blend only: the caller
    blends S*C statistics into C running values with torch ops)."""

    def __init__(self, shape, elem_bytes: int, has_w: bool, has_b: bool, has_res: bool, act: int, center: bool,
                 mode: str, running: int, profile: dispatch.DeviceProfile, groups: int = 1):
        from .fastlaunch import Launcher
        given = mode == "given"
        if groups > 1 and (given or running):
            raise RuntimeError("tritonorm internal: the planes kernels blend or read running statistics "
                               "for one sample group only")
        self.plan = choose(shape, elem_bytes, profile, groups=groups)
        N, C, HW = shape[0], shape[1], _plane(shape)
        self.N, self.C, self.S = N // groups, C, groups
        self.ncb = C // self.plan.config["planes"]
        self.blends = bool(running) and not given  # whether the kernel reads momentum
        M = self.N * HW
        self.unbias = M / (M - 1) if M > 1 and center else 1.0
        # The y sweep follows the moments sweep of the same samples: last tile first (what the
        # L2 holds last), unless FUSED (one tile, read once) or given statistics (one sweep).
        self.n_back = 0 if given else sweep_back(self.N, self.plan.config["block_n"])
        const = _const(shape, elem_bytes, self.plan)
        self.launch = Launcher(_planes_fwd_kernel, (self.ncb, groups),
                               dict(const, GIVEN=given, CENTER=center, HAS_W=has_w, HAS_B=has_b, HAS_RES=has_res,
                                    ACT=act, RUNNING=0 if given else running,
                                    **dispatch.second_pass_kw(not (given or const["FUSED"]),
                                                              (1 + has_res) * math.prod(shape) * elem_bytes, profile)))
        self.launches = 1

    def __call__(self, x, y, residual, w, b, stats, run_mean, run_var, eps: float, momentum: float, ck=None):
        """``ck``: the call key of fastlaunch.Launcher.keyed."""
        r = x if residual is None else residual
        rm = x if run_mean is None else run_mean
        rv = x if run_var is None else run_var
        momentum = float(momentum) if self.blends else 0.0
        self.launch.keyed(ck, x, y, r, w, b, stats, rm, rv, self.N, self.ncb, self.C, self.S * self.C, eps,
                          momentum, self.unbias, self.n_back)
        return y, stats


class PlanesBackward:
    """The backward launches for a PlanesForward signature and the gradients asked for: one,
    storing dweight/dbias directly; with S > 1 sample groups and dweight or dbias asked for, the
    kernel stores per-(group, channel) fp32 partials [2, S, C] and backward._finish_kernel adds
    them over the groups (a second launch)."""

    def __init__(self, shape, elem_bytes: int, needs, has_w: bool, has_b: bool, has_res: bool, act: int,
                 center: bool, given: bool, profile: dispatch.DeviceProfile, groups: int = 1,
                 merge_block: int = 16):
        from .backward import _finish_kernel
        from .fastlaunch import Launcher
        if groups > 1 and given:
            raise RuntimeError("tritonorm internal: the planes kernels read running statistics "
                               "for one sample group only")
        need_dx, need_dw, need_db, need_dres = needs
        self.plan = choose(shape, elem_bytes, profile, op="backward", groups=groups)
        self.N, self.C, self.S = shape[0] // groups, shape[1], groups
        self.ncb = self.C // self.plan.config["planes"]
        self.need_dx = need_dx
        self.write_dres = need_dres and act != 0
        self.need_dw, self.need_db = need_dw and has_w, need_db and has_b
        # The dx sweep follows the sums sweep: last sample tile first, as the forward's y sweep.
        self.n_back = 0 if given else sweep_back(self.N, self.plan.config["block_n"])
        const = _const(shape, elem_bytes, self.plan)
        self.launch = Launcher(_planes_bwd_kernel, (self.ncb, groups),
                               dict(const, GIVEN=given, CENTER=center, HAS_W=has_w,
                                    HAS_B=has_b, HAS_RES=has_res, ACT=act, NEED_DX=need_dx,
                                    WRITE_DRES=self.write_dres, NEED_DW=self.need_dw, NEED_DB=self.need_db,
                                    **dispatch.second_pass_kw(need_dx and not (given or const["FUSED"]),
                                                              (2 + (has_res and act != 0)) * math.prod(shape) * elem_bytes,
                                                              profile)))
        self.finish = None
        if groups > 1 and (self.need_dw or self.need_db):
            self.finish = Launcher(_finish_kernel, (triton.cdiv(self.C, 64),),
                                   dict(NEED_DW=self.need_dw, NEED_DB=self.need_db, BLOCK_C=64, BLOCK_S=merge_block))
        self.launches = 1 + (self.finish is not None)

    def __call__(self, x, dy, r, w, b, stats, dx, dres, dw, db, empty, ck=None, pr: int = 0):
        """Launch; ``dx``, ``dres``, ``dw``, ``db`` are the outputs (x where not asked for);
        ``empty(shape, device)`` allocates the fp32 partials (launch._empty: poisoned in tests);
        ``ck``: the call key of fastlaunch.Launcher.keyed (``pr``: unused, no room here)."""
        P = self.S * self.C
        if self.finish is None:
            self.launch.keyed(ck, x, dy, r, w, b, stats, dx, dres, dw, db, self.N, self.ncb, self.C, P, self.n_back)
            return
        part = empty((2, self.S, self.C), x.device)
        self.launch.keyed(ck, x, dy, r, w, b, stats, dx, dres, part[0], part[1], self.N, self.ncb, self.C, P,
                          self.n_back)
        self.finish.keyed(ck, part, dw, db, self.C, self.S)
