"""Launchers: build the strided views, pick a plan, run the kernels. They return tensors only."""

from __future__ import annotations

import torch
import triton

from .. import dispatch
from ..scope import Spec
from . import backward as bk
from . import forward as fk
from . import native
from .layout import TooManyDims, alloc_out, channel_view, match_strides, stat_view

_MAX_GRID_1 = 65535  # CUDA's limit on the second grid dimension

# Tests set this to fill every buffer a kernel must write with NaN first, so a kernel that
# skips an element cannot pass by leaving zeros or stale memory behind.
POISON = False


def _empty(shape, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.float32, device=device)
    return t.fill_(float("nan")) if POISON else t


def _out_like(x: torch.Tensor) -> torch.Tensor:
    t = alloc_out(x)
    return t.fill_(float("nan")) if POISON else t


def profile_for(device: torch.device) -> dispatch.DeviceProfile:
    return dispatch.profile_for_device(device)


def _views(x: torch.Tensor, out: torch.Tensor, spec: Spec, channel: bool = False):
    """The statistic view (and the channel view) of x read in place. When x's strides are too
    irregular for MAX_DIMS dims a side, x is copied into out's dense layout; when even that
    layout needs more (some dense permutations), TooManyDims reaches the caller, which then
    runs on contiguous tensors."""
    def build(xs):
        sv = stat_view(x.shape, spec, xs, out.stride())
        return sv, (channel_view(x.shape, spec, xs, out.stride()) if channel else None)

    try:
        return (x, *build(x.stride()))
    except TooManyDims:
        sv, cv = build(out.stride())  # checked before paying for the copy
        return match_strides(x, out), sv, cv


def _restride(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None or t.numel() == 0 else match_strides(t, alloc_out(like))


def _problem(op: str, view, x: torch.Tensor, spec: Spec | None = None, flags: str = "") -> dispatch.Problem:
    return dispatch.problem_from_view(op, view, x.element_size(), spec=spec,
                                      dtype=str(x.dtype).replace("torch.", ""), flags=flags)


def _chunk(M: int, block_m: int, split: int) -> int:
    return triton.cdiv(triton.cdiv(M, split), block_m) * block_m


def _apply_grid(P: int, M: int, bp: int, bm: int, one_program_per_row: bool = False):
    """Grid of the apply kernels: (row blocks, column programs), and column tiles per program."""
    n_tiles = triton.cdiv(M, bm)
    col_progs = 1 if one_program_per_row else min(n_tiles, _MAX_GRID_1)
    return (triton.cdiv(P, bp), col_progs), triton.cdiv(n_tiles, col_progs)


def _chan_mode(view) -> int:
    """Which sides the channel index depends on (the kernels' CHAN flag)."""
    rows, cols = view.rows.chan[2] != 0, view.cols.chan[2] != 0
    return {(True, True): 0, (False, True): 1, (True, False): 2, (False, False): 3}[(rows, cols)]


def _dummy(x: torch.Tensor) -> torch.Tensor:
    return x  # any valid pointer for an argument a constexpr flag turns off


def forward(x, spec: Spec, weight, bias, residual, eps: float, center: bool, act: int,
            given: tuple[torch.Tensor, torch.Tensor] | None = None, stats_only: bool = False):
    """Returns (y, pivot, mean_shifted, rstd, var): fp32 statistics shaped ``spec.stat_shape``.

    The mean is ``pivot + mean_shifted`` (see forward.py); var is the biased variance, or the
    mean square without centring. ``given``: (mean, rstd) to apply instead of computing
    statistics (eval with running stats); the pivot is then 0. ``stats_only``: compute the
    statistics and skip the output (y is then an empty tensor).
    """
    y = x.new_empty(0) if stats_only else _out_like(x)
    try:
        x_in, view, _ = _views(x, x if stats_only else y, spec)
    except TooManyDims:  # a dense permutation that still needs more than MAX_DIMS dims a side
        y, *stats = forward(x.contiguous(), spec, weight, bias,
                            None if residual is None else residual.contiguous(), eps, center, act, given,
                            stats_only)
        return (y if stats_only else _restride(y, x), *stats)
    x = x_in
    if residual is not None:
        residual = match_strides(residual, y)
    stat_shape = spec.stat_shape(x.shape)
    P, M = view.P, view.M
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
                 ACT=act, CHAN=_chan_mode(view), INT64=view.int64)
    # Kernels index weight and bias by channel: give them unit stride (a copy of C values at most).
    w = weight.contiguous() if weight is not None else _dummy(x)
    b = bias.contiguous() if bias is not None else _dummy(x)
    r = residual if residual is not None else _dummy(x)
    args = view.args()
    fkey = dispatch.flags_key(weight is not None, bias is not None, residual is not None, act, center)
    profile = profile_for(x.device)
    plan = dispatch.plan_for(_problem("forward", view, x, spec, fkey), profile)
    if plan.kernel == dispatch.NATIVE:
        if stats_only:
            mean, var = (t.float() for t in native.moments(x, spec, center))
            return y, torch.zeros_like(mean), mean, torch.rsqrt(var + eps), var
        y, mean, rstd, var = native.forward(x, spec, weight, bias, residual, eps, center, act, given)
        return y, torch.zeros_like(mean), mean, rstd, var
    cfg = plan.config
    bp, bm, nw = cfg["block_p"], cfg["block_m"], cfg["num_warps"]
    if given is not None:
        mean = given[0].reshape(stat_shape).to(torch.float32, copy=True).contiguous()
        rstd = given[1].reshape(stat_shape).to(torch.float32, copy=True).contiguous()
        k = torch.zeros_like(mean)
        bm = min(bm, profile.tile)  # the apply kernel loops over tiles
        grid, tiles = _apply_grid(P, M, bp, bm)
        fk._fwd_apply_kernel[grid](x, y, r, w, b, k, mean, rstd, P, M, grid[1], tiles, *args, **flags,
                                   BLOCK_P=bp, BLOCK_M=bm, num_warps=nw)
        return y, k, mean, rstd, rstd.reciprocal().square() - eps
    k = _empty(stat_shape, x.device)
    mean = _empty(stat_shape, x.device)
    rstd = _empty(stat_shape, x.device)
    var = _empty(stat_shape, x.device)
    yp = x if stats_only else y  # any valid pointer when STORE_Y is off
    if plan.kernel == "fused":
        fk._fwd_fused_kernel[(triton.cdiv(P, bp),)](
            x, yp, r, w, b, k, mean, rstd, var, P, M, eps, *args, CENTER=center, **flags,
            BLOCK_P=bp, BLOCK_M=bm, STORE_Y=not stats_only, num_warps=nw)
    elif plan.kernel == "looped":
        fk._fwd_looped_kernel[(triton.cdiv(P, bp),)](
            x, yp, r, w, b, k, mean, rstd, var, P, M, eps, *args, CENTER=center, **flags,
            BLOCK_P=bp, BLOCK_M=bm, STORE_Y=not stats_only, num_warps=nw)
    else:
        split = cfg["split"]
        chunk = _chunk(M, bm, split)
        pmean = _empty((P, split), x.device)
        pm2 = _empty((P, split), x.device)
        fk._fwd_partial_kernel[(triton.cdiv(P, bp), split)](
            x, pmean, pm2, P, M, chunk, split, *args, CENTER=center, INT64=view.int64,
            BLOCK_P=bp, BLOCK_M=bm, num_warps=nw)
        mbp = min(_pow2(P), 64)
        fk._fwd_merge_kernel[(triton.cdiv(P, mbp),)](
            x, pmean, pm2, k, mean, rstd, var, P, M, chunk, split, eps, *view.rows.args(),
            CENTER=center, BLOCK_P=mbp, BLOCK_S=_pow2(split))
        if stats_only:
            return y, k, mean, rstd, var
        grid, tiles = _apply_grid(P, M, bp, bm)
        fk._fwd_apply_kernel[grid](x, y, r, w, b, k, mean, rstd, P, M, grid[1], tiles, *args, **flags,
                                   BLOCK_P=bp, BLOCK_M=bm, num_warps=nw)
    return y, k, mean, rstd, var


def _per_channel(partials: torch.Tensor, side) -> torch.Tensor:
    """Sum [rows, k] partials into one value per channel. ``side`` is None when the rows are
    the channels; else the view side whose channel digit maps each row to its channel: S rows
    per channel with sample groups, in the side's stride order (not necessarily S-major)."""
    sums = partials.sum(dim=1)
    if side is None or side.numel == side.chan[1]:
        return sums
    div, mod, mul = side.chan
    channel = torch.arange(sums.numel(), device=sums.device) // div % mod * mul
    # Every channel owns the same number of rows: group them by a stable sort (a fixed order,
    # so the sum is deterministic) and add them up.
    return sums[channel.argsort(stable=True)].reshape(mod, -1).sum(dim=1)


def _pow2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


def backward(dy, x, spec: Spec, weight, bias, residual, k, mean, rstd, center: bool, act: int,
             given: bool, need_dx: bool, need_dw: bool, need_db: bool, need_dres: bool):
    """Returns (dx, dweight, dbias, dresidual), each None when not needed.

    ``k, mean, rstd``: the forward's pivot, shifted mean and rstd."""
    dx = _out_like(x)
    try:
        x_in, view, cview = _views(x, dx, spec, channel=need_dw or need_db)
    except TooManyDims:  # as in forward: run on contiguous tensors, restride the results
        if x.is_contiguous() and dy.is_contiguous():
            # Even contiguous, the channel view needs more than MAX_DIMS dims (sample groups with
            # a 5-D scope that alternates kept and reduced spatial axes): the torch regime runs.
            return native.backward(dy, x, spec, weight, bias, residual, k + mean, rstd, center, act,
                                   given, need_dx, need_dw, need_db, need_dres)
        dx, dw, db, dres = backward(dy.contiguous(), x.contiguous(), spec, weight, bias,
                                    None if residual is None else residual.contiguous(), k, mean,
                                    rstd, center, act, given, need_dx, need_dw, need_db, need_dres)
        return _restride(dx, x), dw, db, _restride(dres, x)
    x = x_in
    dy = match_strides(dy, dx)
    if residual is not None:
        residual = match_strides(residual, dx)
    P, M = view.P, view.M
    # Kernels index weight and bias by channel: give them unit stride (a copy of C values at most).
    w = weight.contiguous() if weight is not None else _dummy(x)
    b = bias.contiguous() if bias is not None else _dummy(x)
    r = residual if residual is not None else _dummy(x)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
                 ACT=act, CHAN=_chan_mode(view), INT64=view.int64)
    write_dres = need_dres and act != 0
    dres = _out_like(x) if write_dres else None
    dr = dres if dres is not None else _dummy(x)
    args = view.args()
    fkey = dispatch.flags_key(weight is not None, bias is not None, residual is not None, act, center)
    profile = profile_for(x.device)
    plan = dispatch.plan_for(_problem("backward", view, x, spec, fkey), profile)
    if plan.kernel == dispatch.NATIVE:
        return native.backward(dy, x, spec, weight, bias, residual, k + mean, rstd, center, act,
                               given, need_dx, need_dw, need_db, need_dres)
    cfg = plan.config
    bp, bm, nw = cfg["block_p"], cfg["block_m"], cfg["num_warps"]
    # Each statistic one channel (BatchNorm's scope): the dx kernels' row sums are dweight and
    # dbias, so the channel-view sweep is skipped.
    row_channel = ((need_dw or need_db) and (need_dx or write_dres) and not given
                   and spec.allows_running_stats and not spec.reduces_c)
    # Each column one channel (LayerNorm rows, positional scope) and the fused regime: a
    # persistent grid accumulates dweight and dbias per program, no channel-view sweep.
    col_channel = ((need_dw or need_db) and (need_dx or write_dres) and plan.kernel == "fused"
                   and view.cols.chan == (1, view.M, 1) and view.M == x.shape[1])
    pdw = pdb = None
    if need_dx or write_dres:
        if plan.kernel == "fused":
            row_blocks = triton.cdiv(P, bp)
            progs = row_blocks
            if col_channel:  # persistent: partials are [programs, C], so keep the programs few
                progs = max(1, min(row_blocks, profile.programs_per_sm * profile.sm_count))
                pdw, pdb = _empty((progs, M), x.device), _empty((progs, M), x.device)
            elif row_channel:
                pdw, pdb = _empty((P, 1), x.device), _empty((P, 1), x.device)
            bk._bwd_fused_kernel[(progs,)](
                x, dy, r, w, b, k, mean, rstd, dx, dr, x if pdw is None else pdw, x if pdb is None else pdb,
                P, M, row_blocks, *args, CENTER=center, GIVEN=given, WRITE_DRES=write_dres, **flags,
                BLOCK_P=bp, BLOCK_M=bm, ROW_CHANNEL=row_channel, COL_CHANNEL=col_channel, num_warps=nw)
            if col_channel:
                pdw, pdb = pdw.t(), pdb.t()  # [C, programs]: summed over programs below
        else:
            split = cfg.get("split", 1)
            s1 = s2 = mean  # unused when the statistics are given
            if not given:
                chunk = _chunk(M, bm, split)
                ps1 = _empty((P, split), x.device)
                ps2 = _empty((P, split), x.device)
                if row_channel:
                    pdw, pdb = _empty((P, split), x.device), _empty((P, split), x.device)
                bk._bwd_sums_kernel[(triton.cdiv(P, bp), split)](
                    x, dy, r, w, b, k, mean, rstd, ps1, ps2, pdw if row_channel else x,
                    pdb if row_channel else x, P, M, chunk, split, *args, **flags,
                    BLOCK_P=bp, BLOCK_M=bm, ROW_CHANNEL=row_channel, num_warps=nw)
                s1, s2 = ps1.sum(dim=1), ps2.sum(dim=1)
            grid, tiles = _apply_grid(P, M, bp, bm, one_program_per_row=plan.kernel == "looped")
            bk._bwd_apply_kernel[grid](
                x, dy, r, w, b, k, mean, rstd, s1, s2, dx, dr, P, M, grid[1], tiles, *args, CENTER=center,
                GIVEN=given, WRITE_DRES=write_dres, **flags, BLOCK_P=bp, BLOCK_M=bm, num_warps=nw)
    dw = db = None
    if (need_dw or need_db) and not (row_channel or col_channel):
        C = cview.P
        cplan = dispatch.plan_for(_problem("dwdb", cview, x, spec, fkey), profile)
        cbp = cplan.config["block_p"]
        cbm = min(cplan.config["block_m"], profile.tile)  # the dwdb kernel loops over tiles
        split = max(1, cplan.config.get("split", 1))
        chunk = _chunk(cview.M, cbm, split)
        pdw = _empty((C, split), x.device)
        pdb = _empty((C, split), x.device)
        bk._dwdb_kernel[(triton.cdiv(C, cbp), split)](
            x, dy, r, w, b, k, mean, rstd, pdw, pdb, C, cview.M, chunk, split, *cview.args(),
            HAS_W=flags["HAS_W"], HAS_B=flags["HAS_B"], HAS_RES=flags["HAS_RES"], ACT=act,
            CHAN=_chan_mode(cview), INT64=cview.int64, BLOCK_P=cbp, BLOCK_M=cbm, num_warps=cplan.config["num_warps"])
    # Partials are per row of the view whose sweep made them: with sample groups a channel owns
    # S rows (row_channel), which are summed here.
    side = view.rows if row_channel else None
    if need_dw:
        dw = _per_channel(pdw, side).to(weight.dtype)
    if need_db:
        db = _per_channel(pdb, side).to(bias.dtype)
    if not need_dx:
        dx = None
    if need_dres and not write_dres:
        dres = dy
    return dx, dw, db, dres
