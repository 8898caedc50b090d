"""Launch plans: everything about a call that depends only on its signature, built once.

A call's signature is (shape, strides and dtype of x, the scope, which of weight/bias/residual/
running statistics are present and their layouts, the activation, centring, the mode). For a
signature the plan fixes the strided views, the dispatcher's regime and block sizes, the grids,
the geometry tuples and the constexpr flags. Calling a plan then only allocates the outputs and
launches: no view building, no dispatch, no torch ops between kernels.

    ForwardPlan(...)(x, weight, bias, residual, run_mean, run_var, eps, momentum)
        -> (y, stats)           stats: [5, P] fp32 (pivot, shifted mean, rstd, var, mean)
    plan.backward(needs)(dy, x, weight, bias, residual, stats)
        -> (dx, dweight, dbias, dresidual)   (None where not asked for)

Launchers return tensors only. Plans are cached by ``tritonorm.core``; ``clear()`` forgets them
(the dispatcher calls it when the tuning cache changes).
"""

from __future__ import annotations

import math

import torch
import triton

from .. import dispatch, pixel_plan, planes_plan, reference
from ..scope import Spec
from . import backward as bk
from . import forward as fk
from . import native, pixels, planes
from .fastlaunch import Launcher, call_key
from .pixels_backward import PixelsBackward
from .layout import (TooManyDims, batch_segments, channel_per_col, channel_per_row, channel_view, match_strides,
                     sample_rows, sample_segments, segments, stat_view)

_MAX_GRID_1 = dispatch.MAX_GRID_1

# Tests set this to fill every buffer a kernel must write with NaN first, so a kernel that
# skips an element cannot pass by leaving zeros or stale memory behind.
POISON = False

MERGE_BLOCK = dispatch.MERGE_BLOCK

# Running-statistics modes of the forward kernels (their RUNNING flag).
NO_RUNNING, RUNNING_VAR, RUNNING_BOTH = 0, 1, 2


# The most the backward's partials may add to the saved statistics, as a fraction of x's bytes
# (part_row); larger ones are allocated by the backward. Tests set it to exercise the room.
ROOM_FRACTION = 1 / 32


def part_row(lean: bool) -> int:
    """Where the row kernels' split partials start in a statistics buffer that holds them too
    (the kernels' PART_ROW): past its 5 rows (lean: 2), at a 16-byte boundary whatever P is.

    An eager call whose backward will have partials passes ``room`` (the rows they take): the
    forward then allocates one [PART_ROW + max(forward's, room), P] buffer for its statistics and
    its own partials, saved for the backward, whose partials go in the same rows (the forward's
    are dead by then). Each allocation a call saves is ~2-6 us of host time (docs/benchmarks.md);
    the rows are saved memory from the forward on: the backward's partials, kept only where
    they are at most ROOM_FRACTION of x's bytes (0.05-0.8% on the suites' split cases;
    ``tritonorm bench --memory`` counts them)."""
    return 4 if lean else 8


def profile_for(device: torch.device) -> dispatch.DeviceProfile:
    return dispatch.profile_for_device(device)


def _pow2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


def _chunk(M: int, block_m: int, split: int) -> int:
    return triton.cdiv(triton.cdiv(M, split), block_m) * block_m


def tile_order(col_progs: int, tiles: int, after_sweep: bool, reverse: bool | None = None) -> tuple[int, int, int]:
    """The apply kernels' (TILE_STEP, TILES_PER_PROG, FIRST_TILE) (common.strided_tiles): the
    tiles last to first when the pass follows a sweep of the same data and ``reverse`` (default
    dispatch.APPLY_REVERSE), else first to last."""
    if after_sweep and (dispatch.APPLY_REVERSE if reverse is None else reverse):
        return -col_progs, tiles, col_progs * tiles - 1
    return col_progs, tiles, 0


def _apply_grid(P: int, M: int, bp: int, bm: int, one_program_per_row: bool = False, fill: int | None = None):
    """dispatch.apply_grid: the apply kernels' grid and column tiles per program."""
    return dispatch.apply_grid(P, M, bp, bm, one_program_per_row, fill)


def _chan_mode(view) -> int:
    """Which sides the channel index depends on (the kernels' CHAN flag)."""
    rows, cols = view.rows.chan[2] != 0, view.cols.chan[2] != 0
    return {(True, True): 0, (False, True): 1, (True, False): 2, (False, False): 3}[(rows, cols)]


def wide_suits(need_wb: bool, dx_pass: bool, given: bool, seg, param_full: bool, nc, rows_nc: bool,
               row_channel: bool, view, shape) -> bool:
    """Whether a backward can run the WIDE fused kernel (dispatch.wide_plan): a dx pass from the
    rows' own sums (not the running statistics'), and dweight/dbias, when asked for, as
    per-column sums (LayerNorm rows), not per-segment, per-row or per-element ones."""
    return (dx_pass and not given and seg is None and not param_full and nc is None and not rows_nc
            and not row_channel and (not need_wb or channel_per_col(view, shape[1])))


def _problem(op: str, view, x: torch.Tensor, spec: Spec | None = None, flags: str = "",
             fused_m: int = 0) -> dispatch.Problem:
    return dispatch.problem_from_view(op, view, x.element_size(), spec=spec,
                                      dtype=str(x.dtype).replace("torch.", ""), flags=flags, fused_m=fused_m)


def _empty(shape, device, dtype=torch.float32) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON else t


def _dense_strides(x: torch.Tensor) -> tuple[int, ...]:
    """The strides ``torch.empty_like(x, memory_format=torch.preserve_format)`` would give."""
    return torch.empty_like(x, memory_format=torch.preserve_format, device="meta").stride()


class _Common:
    """What forward and backward plans share: the views and the flags of one signature."""

    def __init__(self, x: torch.Tensor, spec: Spec, has_w: bool, has_b: bool, has_res: bool, act: int,
                 center: bool, channel: bool):
        self.shape = tuple(x.shape)
        self.dtype = x.dtype
        self.spec = spec
        self.out_stride = _dense_strides(x)
        self.x_stride = tuple(x.stride())
        self.stat_shape = spec.stat_shape(self.shape)
        self.n_stats = 1
        for s in self.stat_shape:
            self.n_stats *= s
        # The view of x read in place; when its strides are too irregular, x is first copied
        # into the output's dense layout; when even that needs too many dims, into a contiguous
        # one (then ``contiguous`` is set and the outputs are restrided after).
        self.copy_x = False
        self.contiguous = False
        try:
            self.view = stat_view(self.shape, spec, self.x_stride, self.out_stride)
            self.cview = channel_view(self.shape, spec, self.x_stride, self.out_stride) if channel else None
        except TooManyDims:
            try:
                self.view = stat_view(self.shape, spec, self.out_stride, self.out_stride)
                self.cview = (channel_view(self.shape, spec, self.out_stride, self.out_stride)
                              if channel else None)
                self.copy_x = self.x_stride != self.out_stride
            except TooManyDims:
                self.contiguous = True
        self.flags = dict(HAS_W=has_w, HAS_B=has_b, HAS_RES=has_res, ACT=act)
        self.center = center
        self.fkey = dispatch.flags_key(has_w, has_b, has_res, act, center)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.out_stride, dtype=self.dtype, device=x.device)
        return t.fill_(float("nan")) if POISON else t

    def full_param(self, t, x):
        """A broadcast weight or bias (or a (C,) one beside it) expanded to x's shape in the
        output's layout, differentiably (autograd sums the gradient back over the broadcast axes)."""
        if t is None or (tuple(t.shape) == self.shape and t.stride() == self.out_stride):
            return t
        if tuple(t.shape) == (self.shape[1],):
            t = t.view(1, -1, *([1] * (len(self.shape) - 2)))
        out = torch.empty_strided(self.shape, self.out_stride, dtype=t.dtype, device=x.device)
        return out.copy_(t.expand(self.shape))

    def prepare(self, x, residual):
        if self.copy_x:
            x = match_strides(x, self.out(x))
        if residual is not None and residual.stride() != self.out_stride:
            residual = match_strides(residual, self.out(x))
        return x, residual


def _nc_chan(view) -> int:
    """The CHAN flag of per-(sample, channel) parameters: the rows always vary (the sample), the
    columns when they span several channels (GroupNorm)."""
    return 0 if view.cols.chan[2] != 0 else 2


def _nc_segments(c: "_Common", spec: Spec):
    """The per-(sample, channel) segments of the statistic view when per-sample weight/bias can be
    read in place (rows (n, g) with g fastest, columns' channel digit one channel wide: see
    common.param_offsets) and their gradients come from the dx pass in every regime (a
    (channel, position) tile for the fused one): dense GroupNorm/InstanceNorm. Else None."""
    if c.contiguous:
        return None
    seg = segments(c.view, c.shape, spec, c.out_stride if c.copy_x else c.x_stride, c.out_stride)
    return seg if seg is not None and seg.order else None


def _bn_segments(c: "_Common", spec: Spec):
    """Conditional BatchNorm: the (channel, sample) segments (layout.sample_segments) under which
    plain BatchNorm's kernels read a per-(sample, channel) weight/bias in place (PARAM_NC == 3)
    and take its gradients from the dx pass's segment partials, in every regime; else None."""
    if c.contiguous:
        return None
    return sample_segments(c.view, c.shape, spec, c.out_stride if c.copy_x else c.x_stride, c.out_stride)


def row_samples(nc) -> bool:
    """Whether a param_nc tuple is adaLN's per-(sample, column) kind (core._row_affine: kinds
    "nd" (N, 1, ..., D) and "d" (1, ..., 1, D)) rather than per (sample, channel)."""
    return nc is not None and ("nd" in nc[:2] or "d" in nc[:2])


def _row_samples_plan(c: "_Common", spec: Spec, profile):
    """The backward plan under which adaLN's (N, 1, D) weight/bias are read in place (PARAM_NC
    == 2), or None (then they are expanded): the view must allow it (layout.sample_rows). Fused,
    the dx pass sums each sample's rows per program (a (J, N) grid); looped/split, the first
    stage (_bwd_col_sums_kernel) does, on an (R, column tiles, N) grid."""
    if c.contiguous or not sample_rows(c.view, c.shape):
        return None
    xs = c.out_stride if c.copy_x else c.x_stride
    x_meta = torch.empty_strided(c.shape, xs, dtype=c.dtype, device="meta")
    bproblem = _problem("backward", c.view, x_meta, spec, c.fkey)
    plan = dispatch.plan_for(bproblem, profile)
    if plan.kernel == dispatch.NATIVE:  # the torch regime takes (C,) parameters only
        plan = dispatch.choose(bproblem, profile)
    return plan if plan.kernel in ("fused", "looped", "split") else None


def _params(weight, bias, full: bool, x):
    """The weight and bias pointers the kernels take (x stands in for a missing one): per channel,
    unit stride; or (``full``) as given, already laid out like the output."""
    if full:
        return (x if weight is None else weight), (x if bias is None else bias)
    w = x if weight is None else (weight if weight.is_contiguous() else weight.contiguous())
    b = x if bias is None else (bias if bias.is_contiguous() else bias.contiguous())
    return w, b


def _empty_like_out(c, dtype, device) -> torch.Tensor:
    t = torch.empty_strided(c.shape, c.out_stride, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON else t


def _restride(t: torch.Tensor | None, shape, stride) -> torch.Tensor | None:
    if t is None or t.numel() == 0 or t.stride() == stride:
        return t
    out = torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device)
    return out.copy_(t)


class ForwardPlan:
    """The forward launch of one call signature.

    ``mode``: "train" (batch statistics; ``running`` says which running buffers are blended in),
    "given" (normalize with the running statistics: eval) or "stats" (statistics only, no y).
    """

    def __init__(self, x: torch.Tensor, spec: Spec, has_w: bool, has_b: bool, has_res: bool, act: int,
                 center: bool, mode: str, running: int, profile: dispatch.DeviceProfile, pre_add: bool = False,
                 param_full: bool = False, param_nc: tuple | None = None):
        self.c = c = _Common(x, spec, has_w, has_b, has_res, act, center,
                             channel=False)
        self.mode, self.running, self.profile = mode, running, profile
        # pre_add (tritonorm.add_norm): the kernels normalize h = x + residual and store h; the
        # residual then travels in the residual slot with HAS_RES off (see ``add``).
        self.pre_add = pre_add
        pre = dict(PRE_ADD=True) if pre_add else {}
        # param_full (broadcast affine): weight and bias come expanded to x's shape in the output's
        # layout and are read at the output offsets (CHAN=0: both sides vary).
        # param_nc (core._nc_affine: (weight kind, bias kind, (weight's n, c strides, bias's))):
        # broadcast weight/bias that are per (sample, channel) — (N, C, 1, ...), or (C,) beside one
        # — read in place by GroupNorm/InstanceNorm kernels (PARAM_NC), their gradients from the
        # backward's per-(sample, channel) partials. ``self.nc`` is that tuple when it applies,
        # else None and param_full's expansion runs.
        # Row kind (row_samples: adaLN's (N, 1, D)): ``row_bplan`` is the fused backward plan
        # that reads them in place too (_row_samples_plan), else they are expanded.
        # Conditional BatchNorm (plain BatchNorm's rows are channels, a sample's elements spread
        # over the columns): the same kinds read with the sample taken from the output offset
        # (PARAM_NC == 3, _bn_segments), in training and eval.
        # pre_add (add_norm) takes all three: its kernels are these row/column kernels (never the
        # pixels/planes ones), the parameters read at the output offsets of h's tile.
        self.nc = self.row_bplan = None
        self.nc_flag = 0  # the kernels' PARAM_NC
        if param_nc is not None and mode == "train":
            if row_samples(param_nc):
                self.row_bplan = _row_samples_plan(c, spec, profile)
                if self.row_bplan is not None:
                    self.nc, self.nc_flag = param_nc, 2
            elif _nc_segments(c, spec) is not None:
                self.nc, self.nc_flag = param_nc, 1
        if (param_nc is not None and mode in ("train", "given") and not row_samples(param_nc)
                and self.nc is None and _bn_segments(c, spec) is not None):
            self.nc, self.nc_flag = param_nc, 3
        if self.nc is not None:
            param_full = False
        self.param_full = param_full
        if param_full:
            pre["PARAM_FULL"] = True
        # The kernels' PARAM_NC and PS (PG: rows a sample, or conditional BN's output N stride),
        # the backward's as well.
        self.nc_kw = {}
        if self.nc is not None and not param_full:
            pg = c.out_stride[0] if self.nc_flag == 3 else c.view.P // c.shape[0]
            self.nc_kw = dict(PARAM_NC=True if self.nc_flag == 1 else self.nc_flag, PS=(pg, *param_nc[2]))
            pre.update(self.nc_kw)
        self.has_w, self.has_b, self.has_res, self.act = has_w, has_b, has_res, act
        self._backward: dict = {}
        self._lean: dict = {}
        self.part_rows = 0  # see below (the row kernels' split regime)
        self._room: dict = {}  # lean -> (partial, apply) launchers with the partials in Stats
        self.pixels = self.planes = None
        # lean_ok: the kernels can keep only what a backward reads (common.store_stats LEAN):
        # the row/column kernels of a training call.
        self.lean_ok = False
        if c.contiguous:
            inner = x.contiguous()
            self.inner = ForwardPlan(inner, spec, has_w, has_b, has_res, act, center, mode, running, profile,
                                     pre_add, param_full, param_nc)
            self.nc, self.param_full, self.nc_flag = self.inner.nc, self.inner.param_full, self.inner.nc_flag
            self.row_bplan = self.inner.row_bplan
            self.plan = self.inner.plan
            self.lean_ok = self.inner.lean_ok
            return
        self.inner = None
        view = c.view
        self.P, self.M = view.P, view.M
        self.plan = dispatch.plan_for(_problem("forward", view, x, spec, c.fkey), profile)
        self.native = self.plan.kernel == dispatch.NATIVE
        if self.native:
            return
        # channels_last GroupNorm/InstanceNorm with groups that are not 16-byte runs: whole-pixel
        # tiles (pixels.py) instead of the row/column kernels' element-wise reads.
        # Per-(sample, channel) weight/bias (``nc``) too, read with their n strides, when their
        # channels are unit-stride.
        pn = (0, 0)
        if self.nc is not None:
            w_sn, w_sc, b_sn, b_sc = self.nc[2]
            pn = (w_sn, b_sn) if w_sc in (0, 1) and b_sc in (0, 1) and self.nc_flag == 1 else None
        if (mode == "train" and not running and not pre_add and not param_full and pn is not None and not c.copy_x
                and pixel_plan.applies(c.shape, c.x_stride, c.out_stride, spec, x.element_size())):
            self.pixels = pixels.PixelsForward(c.shape, spec, x.element_size(), has_w, has_b, has_res, act,
                                               center, profile, pn)
            self.plan = self.pixels.plan
            self.launches = self.pixels.launches
            return
        # Dense NCHW BatchNorm with planes of other than 16k elements: flat channel-block tiles
        # (planes.py) instead of the row/column kernels' element-wise reads. Ghost BatchNorm (S
        # sample groups) too, training: its running statistics are blended by the caller (core).
        groups = spec.sample_groups
        # (Not with per-sample weight/bias: the planes kernels read per-channel ones only.)
        if (mode in ("train", "given") and not pre_add and not param_full and self.nc is None and not c.copy_x
                and (groups == 1 or (mode == "train" and not running))
                and planes_plan.applies(c.shape, c.x_stride, c.out_stride, spec, x.element_size(), profile)):
            self.planes = planes.PlanesForward(c.shape, x.element_size(), has_w, has_b, has_res, act, center, mode,
                                               running, profile, groups)
            self.plan = self.planes.plan
            self.launches = self.planes.launches
            return
        cfg = self.plan.config
        bp, bm, nw = cfg["block_p"], cfg["block_m"], cfg["num_warps"]
        chan = 0 if param_full or self.nc_flag in (2, 3) else (
            _nc_chan(view) if self.nc is not None else _chan_mode(view))
        flags = dict(c.flags, CHAN=chan, INT64=view.int64)
        rg, cg = view.geometry()
        kernel = self.plan.kernel
        if mode == "given" or kernel == "split":
            if mode == "given":
                bm = min(bm, profile.tile)  # the apply kernel loops over tiles
            merges = kernel == "split" and mode != "given"
            grid, tiles = _apply_grid(self.P, self.M, bp, bm, fill=dispatch._fill(nw, profile) if merges else None)
            if mode == "stats":
                grid, tiles = (grid[0], 1), 0
            split = cfg.get("split", 1) if kernel == "split" and mode != "given" else 1
            self.split = split
            self.chunk = _chunk(self.M, bm, split)
            if mode != "given":
                self.partial = Launcher(fk._fwd_partial_kernel, (triton.cdiv(self.P, bp), split),
                                        dict({k: v for k, v in pre.items() if k == "PRE_ADD"}, CENTER=center,
                                             INT64=view.int64, BLOCK_P=bp, BLOCK_M=bm, num_warps=nw))
            else:
                self.partial = None
            self.kernel = fk._fwd_apply_kernel
            self.grid = grid
            self.tail = (self.P, self.M, self.chunk, split)
            self.geo = (rg, cg)  # the partial kernel's last arguments
            self.mid = (*tile_order(grid[1], tiles, merges), rg, cg)
            self.constexprs = dict(flags, **pre, SOURCE=1 if mode == "given" else 0, CENTER=center, BLOCK_P=bp,
                                   BLOCK_M=bm, BLOCK_S=MERGE_BLOCK,
                                   RUNNING=running if mode == "train" else NO_RUNNING, num_warps=nw,
                                   **dispatch.second_pass_kw(merges, (1 + (has_res or pre_add)) * x.nbytes, profile))
        else:
            self.partial = None
            self.kernel = fk._fwd_fused_kernel if kernel == "fused" else fk._fwd_looped_kernel
            self.grid = (triton.cdiv(self.P, bp),)
            self.constexprs = dict(flags, **pre, CENTER=center, BLOCK_P=bp, BLOCK_M=bm, STORE_Y=mode != "stats",
                                   RUNNING=running if mode == "train" else NO_RUNNING, num_warps=nw,
                                   **dispatch.second_pass_kw(kernel != "fused" and mode != "stats",
                                                             (1 + (has_res or pre_add)) * x.nbytes, profile))
            # The looped kernel's y sweep follows its moments sweep over the same row block: its
            # column tiles last to first (M_BACK, dispatch.sweep_back), the re-read beginning
            # with what the L2 got last.
            self.mid = (rg, cg) if kernel == "fused" else (rg, cg, dispatch.sweep_back(self.M, bm))
        self.launch = Launcher(self.kernel, self.grid, self.constexprs)
        self.lean_ok = mode == "train"
        self.lean_rows = 1 + bool(center)  # rstd (and the shifted mean)
        self.lean_launch = self.launch.with_constexprs(LEAN=self.lean_rows) if self.lean_ok else None
        self.launches = 1 + (self.partial is not None)
        # Rows of width P the split partials [2, P, SPLIT] take in a statistics buffer (part_row).
        self.part_rows = 2 * self.split if self.partial is not None else 0
        # The unbiased variance for the running estimate; without centring it tracks the mean square.
        self.unbias = self.M / (self.M - 1) if self.M > 1 and center else 1.0
        self.blends = bool(running) and mode == "train"  # whether the kernel reads momentum

    def _roomy(self, lean: bool) -> tuple[Launcher, Launcher]:
        """The partial and apply launchers with the partials in the statistics buffer from row
        part_row(lean) on (the kernels' PART_ROW)."""
        pr = part_row(lean)
        launch = self.lean_launch if lean else self.launch
        got = self._room[lean] = (self.partial.with_constexprs(PART_ROW=pr), launch.with_constexprs(PART_ROW=pr))
        return got

    def lean_for(self, needs) -> bool:
        """Whether a training call whose backward asks for ``needs`` can keep lean statistics:
        the forward's and that backward's kernels all read the plain row view (no segment view,
        no channel-view sweep, no torch regime)."""
        ok = self._lean.get(needs)
        if ok is None:
            ok = self._lean[needs] = self.lean_ok and self.backward(needs).lean_ok
        return ok

    def add(self, x, residual, weight, bias, run_mean, run_var, eps: float, momentum: float, h_dtype,
            lean: bool = False):
        """The pre_add forward: (y, stats, h) with h = x + residual in ``h_dtype`` (output layout).
        The caller falls back to torch ops where ``fusable_add`` is False."""
        c = self.c
        h = torch.empty_strided(c.shape, c.out_stride, dtype=h_dtype, device=x.device)
        if POISON:
            h.fill_(float("nan"))
        y, stats = self(x, weight, bias, residual, run_mean, run_var, eps, momentum, lean, h=h)
        return y, stats, h

    @property
    def fusable_full(self) -> bool:
        """Whether broadcast weight/bias run in the kernels (else the caller composes torch ops)."""
        return self.inner is None and not self.native

    @property
    def fusable_add(self) -> bool:
        """Whether ``add`` runs in the kernels (not the torch regime, not a restrided copy)."""
        return self.inner is None and not self.native and not self.c.copy_x

    def __call__(self, x, weight, bias, residual, run_mean, run_var, eps: float, momentum: float = 0.0,
                 lean: bool = False, room: int | None = None, h=None):
        """``lean`` (only where ``lean_for`` said so): the statistics come back as the [1 or 2, P]
        buffer that only the backward reads (common.store_stats), not the [5, P] one. ``room``
        (eager calls whose backward will run; see ``part_row``): the rows the backward's
        partials take, kept in the statistics buffer with the forward's own; 0 or None (nothing
        to keep for the backward, so nothing more is saved): a [5, P] (or lean) buffer and the
        forward's partials apart. ``h``: add_norm's output buffer (``add``)."""
        c = self.c
        if self.inner is not None:
            y, stats = self.inner(x.contiguous(), weight, bias,
                                  None if residual is None else residual.contiguous(), run_mean, run_var,
                                  eps, momentum, lean, room)
            return _restride(y, c.shape, c.out_stride), stats
        x, residual = c.prepare(x, residual)
        if self.native:
            return self._native(x, weight, bias, residual, run_mean, run_var, eps, momentum)
        y = x.new_empty(0) if self.mode == "stats" else c.out(x)
        pr = 0  # the partials' first row in the statistics buffer (0: apart)
        if room and self.planes is None:
            pr = part_row(lean)
            # The forward's own partials: rows of the P statistics (the whole-pixel kernels': N*G).
            own = (self.pixels.part_rows * self.pixels.P if self.pixels is not None
                   else self.part_rows * self.P)
            stats = _empty((pr + max(room, -(-own // c.n_stats)), c.n_stats), x.device)
        else:
            stats = _empty((self.lean_rows if lean else 5, c.n_stats), x.device)
        # Kernels index weight and bias by channel with unit stride (param_full: the caller laid
        # them out like y; nc: read with their own strides).
        w, b = _params(weight, bias, self.param_full or self.nc is not None, x)
        # Every other tensor the launches take is this call's own buffer or a stand-in for one of
        # these (fastlaunch.call_key).
        ck = call_key(x, residual, weight, bias, run_mean, run_var, h)
        if self.pixels is not None:
            return self.pixels(x, y, residual, w, b, stats, float(eps), _empty, ck, pr)
        if self.planes is not None:
            return self.planes(x, y, residual, w, b, stats, run_mean, run_var, float(eps), momentum, ck)
        r = x if residual is None else residual
        rm = x if run_mean is None else run_mean
        rv = x if run_var is None else run_var
        unbias = self.unbias
        # Floats for the kernels' fp32 arguments whatever the caller passed (eps=1 is an int), and
        # momentum only where it is read.
        eps = float(eps)
        momentum = float(momentum) if self.blends else 0.0
        yp = x if self.mode == "stats" else y
        hk = {} if h is None else dict(H=h)
        if self.partial is not None:
            partial_kw = {} if h is None else dict(Res=r, H=h)
            launch = self.lean_launch if lean else self.launch
            if pr:
                part = stats
                partial, launch = self._room.get(lean) or self._roomy(lean)
            else:
                part = _empty((2, self.P, self.split), x.device)
                partial = self.partial
            partial.keyed(ck, x, part, *self.tail, *self.geo, **partial_kw)
            launch.keyed(ck, x, yp, r, w, b, stats, rm, rv, part, *self.tail, eps, momentum, unbias, *self.mid,
                         **hk)
        elif self.mode == "given":
            self.launch.keyed(ck, x, y, r, w, b, stats, rm, rv, x, *self.tail, eps, momentum, unbias, *self.mid,
                              **hk)
        else:
            launch = self.lean_launch if lean else self.launch
            launch.keyed(ck, x, yp, r, w, b, stats, rm, rv, self.P, self.M, eps, momentum, unbias, *self.mid, **hk)
        return y, stats

    def _native(self, x, weight, bias, residual, run_mean, run_var, eps, momentum):
        """The torch regime (a tuned table's choice for tiny shapes): ATen ops, same outputs."""
        c = self.c
        given = None
        if self.mode == "given":
            rstd = torch.rsqrt(run_var.float() + eps)
            given = (run_mean.float() if run_mean is not None else torch.zeros_like(rstd), rstd)
        if self.mode == "stats":
            mean, var = (t.float() for t in native.moments(x, c.spec, c.center))
            y, rstd = x.new_empty(0), torch.rsqrt(var + eps)
        else:
            y, mean, rstd, var = native.forward(x, c.spec, weight, bias, residual, eps, c.center, self.act,
                                                given)
        mean = mean.reshape(-1)
        stats = torch.stack([torch.zeros_like(mean), mean, rstd.reshape(-1), var.reshape(-1), mean])
        if self.mode == "train" and self.running:
            reference.update_running(c.spec, c.shape, stats[4] if c.center else None, stats[3], run_mean, run_var,
                                     momentum)
        return y, stats

    def backward(self, needs: tuple[bool, bool, bool, bool], add_dh: bool = False,
                 dx_twice: bool = False, lean: bool = False) -> "BackwardPlan":
        """``add_dh``, ``dx_twice``: add_norm's backward (see BackwardPlan); ``lean``: the
        forward kept lean statistics (``lean_for``)."""
        key = (needs, add_dh, dx_twice, lean, dispatch.forced_state())
        plan = self._backward.get(key)
        if plan is None:
            if lean and not self.backward(needs, add_dh, dx_twice).lean_ok:
                # The plan changed since the forward chose lean statistics (a regime forced or
                # tuned in between): rebuild the [5, P] buffer first.
                plan = _Relean(self, self.backward(needs, add_dh, dx_twice))
            else:
                plan = BackwardPlan(self, needs, add_dh, dx_twice, lean)
            self._backward[key] = plan
        return plan


class _Relean:
    """A backward plan that reads the [5, P] statistics, given lean ones: the pivot and shifted
    mean are taken again from x by a statistics-only launch (the same pivot rule, so the same
    pivot) and the forward's rstd is copied in. Only when the plan changed between a forward and
    its backward."""

    def __init__(self, fwd: ForwardPlan, plan: "BackwardPlan"):
        self.fwd, self.plan = fwd, plan
        self.lean_ok = False
        self.room_rows = 0

    @property
    def launches(self) -> int:
        return self.plan.launches + 2

    def __call__(self, dy, x, weight, bias, residual, stats, dh=None, dres_dtype=None):
        c = self.fwd.c
        moments = forward_plan(x, c.spec, False, False, False, 0, c.center, "stats", NO_RUNNING)
        _, full = moments(x, None, None, None, None, None, 1.0)
        full[2].copy_(stats[0])
        return self.plan(dy, x, weight, bias, residual, full, dh, dres_dtype)


class BackwardPlan:
    """The backward launches for a forward plan and the gradients asked for
    (dx, dweight, dbias, dresidual)."""

    def __init__(self, fwd: ForwardPlan, needs, add_dh: bool = False, dx_twice: bool = False,
                 lean: bool = False):
        # add_norm (a pre_add forward): ``x`` is the saved h, dx gets the incoming gradient of h
        # added (add_dh) and, when the residual's dtype differs from x's, is stored a second time
        # in the residual's dtype (dx_twice).
        self.fwd = fwd
        need_dx, need_dw, need_db, need_dres = needs
        self.needs = needs
        self.add_dh, self.dx_twice = add_dh, dx_twice
        self.param_full = fwd.param_full
        nc = self.nc = fwd.nc
        addk = dict(ADD_DH=add_dh, DX_TWICE=dx_twice) if (add_dh or dx_twice) else {}
        if fwd.param_full:
            addk["PARAM_FULL"] = True
        c = fwd.c
        act = fwd.act
        self.write_dres = need_dres and act != 0
        self.given = fwd.mode == "given"
        self.inner = None
        self.lean_ok = False  # see ForwardPlan.lean_for; set below where it holds
        # Rows of the statistics buffer's width the split partials take (part_row): the room an
        # eager forward leaves for them; 0: none, or kept apart.
        self.room_rows = 0
        self.part_row = part_row(lean)
        if c.contiguous:
            self.inner = fwd.inner.backward(needs, lean=lean)
            self.lean_ok = self.inner.lean_ok
            self.room_rows = self.inner.room_rows
            return
        if fwd.native:
            return
        self.pixels = self.planes = None
        if fwd.planes is not None:  # the flat channel-block kernels of the forward (planes.py)
            self.planes = planes.PlanesBackward(c.shape, torch.empty((), dtype=c.dtype).element_size(), needs,
                                                fwd.has_w, fwd.has_b, fwd.has_res, act, c.center, self.given,
                                                fwd.profile, c.spec.sample_groups, MERGE_BLOCK)
            self.native = False
            return
        if fwd.pixels is not None:  # the whole-pixel kernels of the forward (pixels_backward.py)
            elem = torch.empty((), dtype=c.dtype).element_size()
            self.pixels = PixelsBackward(c.shape, c.spec, elem, needs, fwd.has_w, fwd.has_b, fwd.has_res, act,
                                         c.center, fwd.profile, fwd.pixels.pn)
            self.native = False
            self._room_for(self.pixels.part_elems, c, elem)
            return
        spec = c.spec
        view = c.view
        P, M = view.P, view.M
        profile = fwd.profile
        xs = c.out_stride if c.copy_x else c.x_stride
        x_meta = torch.empty_strided(c.shape, xs, dtype=c.dtype, device="meta")
        need_wb = need_dw or need_db
        self.param_full = param_full = fwd.param_full
        # param_full: the dx kernels store the per-element weight/bias gradients themselves; nc:
        # the dx pass's per-(sample, channel) partials are the gradients.
        dx_pass = need_dx or self.write_dres or ((param_full or nc is not None) and need_wb)
        # Each statistic one channel (BatchNorm's scope): the dx kernels' row sums are dweight and
        # dbias, so the channel-view sweep is skipped.
        # (Not with a per-sample weight/bias: conditional BatchNorm's gradients are segment sums.)
        bn_nc = fwd.nc_flag == 3
        row_channel = (need_wb and dx_pass and not self.given and not param_full and not bn_nc
                       and channel_per_row(spec))
        # Each statistic a run of (sample, channel) segments (GroupNorm, InstanceNorm): the dx
        # pass stores per-segment partials (its fused tile is then (channel, position), padded).
        # adaLN's per-(sample, column) weight/bias (row_samples): the forward plan's fused backward
        # plan (it decided the parameters are read in place under it), its dx pass summing each
        # sample's rows per program ([2, N*J, M] partials) and _finish_samples_kernel adding them.
        rows_nc = fwd.row_bplan is not None
        # Ghost BatchNorm and batch_group: (sample group, channel) segments, the same partials.
        # Conditional BatchNorm: (channel, sample) segments (layout.sample_segments), also in eval.
        seg = None
        if need_wb and bn_nc:
            seg = sample_segments(view, c.shape, spec, xs, c.out_stride)
            if seg is None:  # the forward plan checked the same view: never
                raise RuntimeError("tritonorm internal: conditional BatchNorm without its segments")
        elif need_wb and dx_pass and not row_channel and not param_full and not rows_nc:
            seg = segments(view, c.shape, spec, xs, c.out_stride)
            if seg is None and not self.given:
                seg = batch_segments(view, c.shape, spec, xs, c.out_stride)
        bproblem = _problem("backward", view, x_meta, spec, c.fkey, fused_m=seg.fused_cols if seg else 0)
        self.plan = plan = fwd.row_bplan if rows_nc else dispatch.plan_for(bproblem, profile)
        if (nc is not None or param_full) and plan.kernel == dispatch.NATIVE:
            # The torch regime takes (C,) parameters only (a backward-only torch entry of a tuned
            # table, or one forced, with broadcast ones): the heuristic's kernels instead.
            self.plan = plan = dispatch.choose(bproblem, profile)
        # Rows too long to fuse, one pass over x and dy (dispatch.wide_plan): where the
        # gradients need nothing but the rows' sums and, for dweight/dbias, per-column ones.
        self.plan = plan = dispatch.backward_wide(plan, bproblem, profile, wide_suits(
            need_wb, dx_pass, self.given, seg, param_full, nc, rows_nc, row_channel, view, c.shape))
        self.native = plan.kernel == dispatch.NATIVE
        if self.native:
            return
        if seg is not None and not bn_nc and ((plan.kernel == "fused" and not seg.order)
                                              or (plan.kernel != "fused" and self.given)):
            seg = None  # no (channel, position) tile, or no sums kernel: the channel-view sweep
        self.seg = seg
        cfg = plan.config
        bp, bm, nw = cfg["block_p"], cfg["block_m"], cfg["num_warps"]
        chan = 0 if fwd.param_full or fwd.nc_flag in (2, 3) else (
            _nc_chan(view) if nc is not None else _chan_mode(view))
        flags = dict(c.flags, CHAN=chan, INT64=view.int64)
        rg, cg = view.geometry()
        # nc: which gradients the segment partials give directly (a per-(sample, channel)
        # parameter: W_NC/B_NC) and which are summed over the samples (a (C,) one beside it);
        # dx is stored only when asked for.
        self.w_nc = self.b_nc = False
        self.store_dx = True
        nck = {}
        self.rows_nc = rows_nc and need_wb
        if nc is not None:
            self.w_nc, self.b_nc = need_dw and nc[0] == "nc", need_db and nc[1] == "nc"
            self.store_dx = need_dx or self.write_dres
            nck = dict(fwd.nc_kw)
            addk.update(nck)
            if seg is not None:
                addk.update(W_NC=self.w_nc, B_NC=self.b_nc)
        # Each column one channel (LayerNorm rows, positional scope) in the fused regime: a
        # persistent grid accumulates dweight and dbias per program.
        # adaLN's per-sample weight/bias (rows_nc): the same per-program column sums, per sample.
        col_channel = self.rows_nc or (need_wb and dx_pass and plan.kernel == "fused" and not param_full
                                       and nc is None and channel_per_col(view, c.shape[1]))
        self.row_channel, self.col_channel = row_channel, col_channel
        self.P, self.M = P, M
        common = dict(flags, BLOCK_P=bp, BLOCK_M=bm, num_warps=nw)
        self.dx_kind = None
        if dx_pass:
            if plan.kernel == "fused":
                row_blocks = triton.cdiv(P, bp)
                progs = row_blocks
                grid = None
                if self.rows_nc:  # J programs a sample, each over that sample's blocks j, j+J, ...
                    N = c.shape[0]
                    row_blocks = triton.cdiv(P // N, bp)
                    J = dispatch.sample_programs(N, P // N, bp, profile.sm_count)
                    progs, grid = N * J, (J, N)
                elif "wide" in cfg:  # (R, TILES), all at once (dispatch.wide_programs)
                    progs = dispatch.wide_programs(row_blocks, cfg["wide"], profile.sm_count)
                    grid = (progs, cfg["wide"])
                    addk["WIDE"] = cfg["block_a"]
                elif col_channel:
                    progs = dispatch.col_channel_programs(row_blocks, profile.sm_count)
                # One row (decoding, a batch of one): the one program's column sums are dweight
                # and dbias, stored by the dx kernel itself, no finish launch. Only at P == 1,
                # which Triton compiles as its own variant anyway (P specialized as == 1): a
                # few rows more would add a variant per layer as the batch changes.
                self.col_direct = col_channel and not self.rows_nc and P == 1
                if self.col_direct:
                    addk["COL_DIRECT"] = True
                self.progs = progs
                self.dx_kind = "fused"
                segk = {}
                if seg is not None:
                    hm_b, hd_b = _pow2(seg.hm), _pow2(seg.H)
                    segk = dict(SEG=seg.order, HM_B=hm_b, HD_B=hd_b, BLOCK_M=hm_b * hd_b)
                    if bn_nc:
                        # The (sample, position) tile reads hm = N segments of H = div columns from
                        # the columns' channel digit, which BatchNorm's columns lack: one with
                        # multiplier 0 (no channel) carries them; the partials are stored n*C + c.
                        cg = (*cg[:-3], seg.H, seg.hm, 0)
                        segk["SEG_T"] = True
                if not self.store_dx:
                    segk["STORE_DX"] = False
                self.dx = (bk._bwd_fused_kernel, grid or (progs,), (P, M, row_blocks, rg, cg),
                           dict(common, **addk, **segk, CENTER=c.center, GIVEN=self.given,
                                WRITE_DRES=self.write_dres, ROW_CHANNEL=row_channel, COL_CHANNEL=col_channel,
                                NEED_DW=need_dw, NEED_DB=need_db))
            else:
                split = cfg.get("split", 1)
                self.split = split
                chunk = _chunk(M, bm, split)
                self.dx_kind = "two-stage"
                self.sums = None
                fin = {}
                # Each column one channel (LayerNorm rows) outside the fused regime: the first
                # stage keeps per-column dweight/dbias sums of its column tile over its rows
                # (_bwd_col_sums_kernel), each row's S1, S2 split over the column tiles.
                # adaLN's per-sample weight/bias (rows_nc): the same, each program over one
                # sample's row blocks ([2, N*R, M] partials, added per sample by the apply kernel).
                self.col_two = (need_wb and not self.given and seg is None and not param_full
                                and (self.rows_nc or (nc is None and channel_per_col(view, c.shape[1]))))
                if self.col_two:
                    tiles_m = triton.cdiv(M, bm)
                    self.split = split = tiles_m
                    if self.rows_nc:
                        N = c.shape[0]
                        row_blocks = triton.cdiv(P // N, bp)
                        per = dispatch.sample_tile_programs(N, P // N, bp, tiles_m, nw, profile)
                        self.progs, grid = N * per, (per, tiles_m, N)
                        # The apply kernel adds each sample's sums (as _finish_samples_kernel).
                        fin = dict(FINISH_SAMPLES=True, FIN_N=N, FIN_S=per, W_SAMPLE=nc[0] == "nd",
                                   B_SAMPLE=nc[1] == "nd")
                    else:  # the apply kernel adds the programs' sums (FINISH_COLS): 2 launches
                        row_blocks = triton.cdiv(P, bp)
                        self.progs = dispatch.col_tile_programs(row_blocks, tiles_m, nw, profile)
                        grid = (self.progs, tiles_m)
                        fin = dict(FINISH_COLS=True, FIN_S=self.progs)
                    self.sums = (bk._bwd_col_sums_kernel, grid, (P, M, tiles_m, row_blocks, rg, cg),
                                 dict(common, **nck))
                elif seg is not None:
                    # The sums kernel on the segment view (its own plan: N*C rows of H), storing
                    # S1, S2, dweight, dbias partials [4, N*C, split]; the apply kernel adds a
                    # statistic's hm*split of S1, S2 and finishes dweight/dbias.
                    sv = seg.view
                    splan = dispatch.plan_for(_problem("dwdb", sv, x_meta, spec, c.fkey), profile)
                    if splan.kernel not in ("looped", "split"):
                        splan = dispatch.choose(_problem("dwdb", sv, x_meta, spec, c.fkey), profile)
                    scfg = splan.config
                    sbm = scfg["block_m"]
                    self.seg_split = sp = scfg.get("split", 1) if splan.kernel == "split" else 1
                    srg, scg = sv.geometry()
                    snck = {}
                    if bn_nc:  # segment rows n*C + c, statistic c: the sample from the output offset
                        snck = dict(PARAM_NC=3, PS=(c.out_stride[0], *nc[2]))
                    elif nc is not None:  # segment rows n*C + c: C rows a sample
                        snck = dict(PARAM_NC=True, PS=(c.shape[1], *nc[2]))
                    self.sums = (bk._bwd_sums_kernel, (triton.cdiv(sv.P, scfg["block_p"]), sp),
                                 (sv.P, sv.M, _chunk(sv.M, sbm, sp), sp, P, 1 if bn_nc else seg.hm, srg, scg),
                                 dict(c.flags, CHAN=_nc_chan(sv) if nc is not None else _chan_mode(sv),
                                      INT64=sv.int64, BLOCK_P=scfg["block_p"], BLOCK_M=sbm,
                                      num_warps=scfg["num_warps"], ROW_CHANNEL=True, **snck))
                    split = seg.hm * sp
                    fin = dict(FINISH=True, FIN_N=sv.P // c.shape[1], FIN_C=c.shape[1], FIN_S=sp)
                    if bn_nc:
                        fin["PART_N"] = True
                elif not self.given:
                    self.sums = (bk._bwd_sums_kernel, (triton.cdiv(P, bp), split),
                                 (P, M, chunk, split, P, 1, rg, cg),
                                 dict(common, ROW_CHANNEL=row_channel, **nck,
                                      **({"PARAM_FULL": True} if fwd.param_full else {})))
                self.part_rows = seg.view.P if seg is not None else P
                self.part_split = self.seg_split if seg is not None else split
                grid, tiles = _apply_grid(P, M, bp, bm, one_program_per_row=plan.kernel == "looped",
                                          fill=dispatch._fill(nw, profile) if split > 1 else None)
                if not self.store_dx:  # nc, dweight/dbias only: the finish, no sweep
                    grid, tiles = (grid[0], 1), 0
                # after the sums kernel's sweep of x and dy (GIVEN: none) the tiles go last to first
                order = tile_order(grid[1], tiles, not self.given)
                self.apply = (bk._bwd_apply_kernel, grid, (P, M, split, *order, rg, cg),
                              dict(common, **addk, **fin, CENTER=c.center, GIVEN=self.given,
                                   WRITE_DRES=self.write_dres, BLOCK_S=MERGE_BLOCK, ROW_CHANNEL=row_channel,
                                   NEED_DW=need_dw, NEED_DB=need_db,
                                   **dispatch.second_pass_kw(not self.given and self.store_dx,
                                                             (2 + (fwd.has_res and fwd.act != 0)) * x_meta.nbytes,
                                                             profile)))
        self.dwdb = None
        self.finish_cols = None
        col_two = self.dx_kind == "two-stage" and self.col_two
        # A finish launch adds the column sums of the fused dx pass (one program: none); those of
        # the looped/split first stage (adaLN's per sample too), the apply kernel adds.
        if need_wb and col_channel and not col_two and not getattr(self, "col_direct", False):
            self.finish_cols = M
        # nc: only a (C,) parameter's partials are added over N (per-sample ones are stored whole)
        fin_w, fin_b = need_dw and not self.w_nc, need_db and not self.b_nc
        if need_wb and seg is not None and self.dx_kind == "fused" and (fin_w or fin_b):
            self.finish_cols = c.shape[1]  # [2, N, C] partials, added over N (Ghost BN: [2, S, C])
            self.seg_blocks = seg.view.P // c.shape[1]
        if need_wb and not (row_channel or col_channel or col_two or param_full or seg is not None):
            if c.cview is None:
                try:
                    c.cview = channel_view(c.shape, spec, c.out_stride if c.copy_x else c.x_stride, c.out_stride)
                except TooManyDims:
                    # Sample groups with a 5-D scope alternating kept and reduced spatial axes: the
                    # channel view needs more than MAX_DIMS dims a side. The torch regime runs.
                    self.native = True
                    return
            cview = c.cview
            C = cview.P
            cplan = dispatch.plan_for(_problem("dwdb", cview, x_meta, spec, c.fkey), profile)
            cbp = cplan.config["block_p"]
            cbm = min(cplan.config["block_m"], profile.tile)  # the dwdb kernel loops over tiles
            split = max(1, cplan.config.get("split", 1))
            chunk = _chunk(cview.M, cbm, split)
            crg, ccg = cview.geometry()
            self.dwdb_split = split
            self.dwdb = (bk._dwdb_kernel, (triton.cdiv(C, cbp), split), (C, cview.M, c.n_stats, chunk, split,
                                                                          crg, ccg),
                         dict(c.flags, CHAN=_chan_mode(cview), INT64=cview.int64, BLOCK_P=cbp, BLOCK_M=cbm,
                              DIRECT=split == 1, NEED_DW=need_dw, NEED_DB=need_db,
                              num_warps=cplan.config["num_warps"]))
            self.C = C
        # Lean statistics (ForwardPlan.lean_for): every kernel here reads the plain row view, whose
        # rows' first elements are the pivots.
        self.lean_ok = fwd.lean_ok and self.dx_kind is not None and seg is None and self.dwdb is None
        if lean:
            if not self.lean_ok:
                raise RuntimeError("tritonorm internal: lean statistics for a backward that cannot read them")
            for name in ("dx", "sums", "apply"):
                step = getattr(self, name, None)
                if step is not None:
                    step[3]["LEAN"] = 1 + bool(c.center)
        # The S1/S2 (dweight/dbias) partials of the sums kernel may sit in the statistics buffer.
        if self.dx_kind == "two-stage" and self.sums is not None and not self.col_two:
            self._room_for(4 * self.part_rows * self.part_split, c, x_meta.element_size())
        # Launchers bound to this plan's grids and constexprs (fastlaunch.py); sums and apply also
        # with the partials in the statistics buffer (roomy).
        for name in ("dx", "sums", "apply", "dwdb"):
            step = getattr(self, name, None)
            if step is not None:
                kernel, grid, fixed, kw = step
                launcher = Launcher(kernel, grid, kw)
                setattr(self, name, (launcher, fixed))
                if self.room_rows and name in ("sums", "apply"):
                    setattr(self, name + "_room", (launcher.with_constexprs(PART_ROW=self.part_row), fixed))
        reduced = self.finish_cols if self.finish_cols is not None else getattr(self, "C", 1)
        self.finish = Launcher(bk._finish_kernel, (triton.cdiv(reduced, 64),),
                               dict(NEED_DW=fin_w, NEED_DB=fin_b, BLOCK_C=64, BLOCK_S=MERGE_BLOCK))
        if self.rows_nc:
            # Per-sample sums of the [2, N*J, M] partials (a (1, ..., D) parameter beside: all of
            # them, by the programs of sample 0 on a (column blocks, 1) grid).
            ws, bs = nc[0] == "nd", nc[1] == "nd"
            per_sample_only = (ws or not need_dw) and (bs or not need_db)
            self.finish = Launcher(bk._finish_samples_kernel,
                                   (triton.cdiv(M, 64), c.shape[0] if per_sample_only else 1),
                                   dict(NEED_DW=need_dw, NEED_DB=need_db, W_SAMPLE=ws, B_SAMPLE=bs, BLOCK_C=64,
                                        BLOCK_S=MERGE_BLOCK))

    def _room_in(self, stats) -> int:
        """The row of ``stats`` the split partials start at when the forward left room for them
        (part_row), else 0 (allocated apart)."""
        return self.part_row if self.room_rows and stats.shape[0] >= self.part_row + self.room_rows else 0

    def _room_for(self, elems: int, c, elem_bytes: int) -> None:
        """room_rows for ``elems`` fp32 partials: only where they are small beside x
        (ROOM_FRACTION), since they are saved memory from the forward on."""
        rows = -(-elems // c.n_stats)
        if elems and rows * c.n_stats * 4 <= ROOM_FRACTION * math.prod(c.shape) * elem_bytes:
            self.room_rows = rows

    @property
    def launches(self) -> int:
        if self.inner is not None:
            return self.inner.launches
        if getattr(self, "native", False) or self.fwd.native:
            return 0
        if self.pixels is not None:
            return self.pixels.launches
        if self.planes is not None:
            return self.planes.launches
        n = 0
        if self.dx_kind == "fused":
            n += 1
        elif self.dx_kind == "two-stage":
            n += 1 + (self.sums is not None)
        if self.finish_cols is not None:
            n += 1
        if self.dwdb is not None:
            n += 1 + (self.dwdb_split > 1)
        return n

    def __call__(self, dy, x, weight, bias, residual, stats, dh=None, dres_dtype=None):
        """``dh``, ``dres_dtype``: add_norm's incoming gradient of h and the residual's dtype
        (then the returned dresidual is dx, stored a second time in that dtype)."""
        fwd = self.fwd
        c = fwd.c
        need_dx, need_dw, need_db, need_dres = self.needs
        if self.inner is not None:
            dx, dw, db, dres = self.inner(dy.contiguous(), x.contiguous(), weight, bias,
                                          None if residual is None else residual.contiguous(), stats)
            return _restride(dx, c.shape, c.out_stride), dw, db, _restride(dres, c.shape, c.out_stride)
        x, residual = c.prepare(x, residual)
        if dy.stride() != c.out_stride:
            dy = match_strides(dy, c.out(x))
        if dh is not None and dh.stride() != c.out_stride:
            dh = match_strides(dh, c.out(x))
        if fwd.native or self.native:
            dx, dw, db, dres = native.backward(dy, x, c.spec, weight, bias, residual,
                                               stats[4].reshape(c.stat_shape), stats[2].reshape(c.stat_shape),
                                               c.center, fwd.act, self.given, need_dx, need_dw, need_db,
                                               need_dres)
            if self.add_dh:
                dx = dx + dh
            if fwd.pre_add:
                dres = dx.to(dres_dtype) if self.dx_twice else dx
            return dx, dw, db, dres
        w, b = _params(weight, bias, self.param_full or self.nc is not None, x)
        r = x if residual is None else residual
        if self.pixels is not None:
            return self._pixels(dy, x, w, b, r, weight, bias, stats)
        if self.planes is not None:
            return self._planes(dy, x, w, b, r, weight, bias, stats)
        dx = c.out(x) if self.dx_kind is not None and self.store_dx else None
        dres = c.out(x) if self.write_dres else None
        if self.dx_twice:
            dres = torch.empty_strided(c.shape, c.out_stride, dtype=dres_dtype, device=x.device)
            if POISON:
                dres.fill_(float("nan"))
        dr = x if dres is None else dres
        dhk = dict(DH=dh) if self.add_dh else {}
        if self.param_full:  # per-element gradients, laid out like y; autograd sums them
            dw = _empty_like_out(c, weight.dtype, x.device) if need_dw else None
            db = _empty_like_out(c, bias.dtype, x.device) if need_db else None
        else:  # per channel; nc: contiguous, element n*C + c of a per-sample one
            dw = _empty(weight.shape, x.device, weight.dtype) if need_dw else None
            db = _empty(bias.shape, x.device, bias.dtype) if need_db else None
        dwp = x if dw is None else dw
        dbp = x if db is None else db
        dxp = x if dx is None else dx
        # Every other tensor here is this call's own buffer or a stand-in for one of these (the
        # statistics are the forward's own, but a compiled graph may hand over another buffer).
        ck = call_key(dy, x, residual, weight, bias, stats, dh, dres)
        if self.dx_kind == "fused":
            run, fixed = self.dx
            if self.rows_nc:  # adaLN: [2, N*J, M] per-sample partials
                N = c.shape[0]
                part = _empty((2, self.progs, self.M), x.device)
                run.keyed(ck, x, dy, r, w, b, stats, dxp, dr, part, part, *fixed, **dhk)
                self.finish.keyed(ck, part, dwp, dbp, self.M, N, self.progs // N)
            elif self.col_direct:
                run.keyed(ck, x, dy, r, w, b, stats, dxp, dr, dwp, dbp, *fixed, **dhk)
            elif self.col_channel:
                part = _empty((2, self.progs, self.M), x.device)
                run.keyed(ck, x, dy, r, w, b, stats, dx, dr, part, part, *fixed, **dhk)
                self.finish.keyed(ck, part, dwp, dbp, self.M, self.progs)
            elif self.finish_cols is not None:  # segments: [2, N, C] partials (Ghost BN: [2, S, C])
                part = _empty((2, self.seg_blocks, c.shape[1]), x.device)
                run.keyed(ck, x, dy, r, w, b, stats, dxp, dr, dwp if self.w_nc else part,
                          dbp if self.b_nc else part, *fixed, **dhk)
                self.finish.keyed(ck, part, dwp, dbp, c.shape[1], self.seg_blocks)
            else:
                run.keyed(ck, x, dy, r, w, b, stats, dxp, dr, dwp, dbp, *fixed, **dhk)
        elif self.dx_kind == "two-stage":
            part = x
            apply = self.apply
            if self.col_two:  # S1, S2 [2, P, tiles]; dweight/dbias sums [2, programs, M]
                run, fixed = self.sums
                part = _empty((2, self.P, self.split), x.device)
                cols = _empty((2, self.progs, self.M), x.device)
                run.keyed(ck, x, dy, r, w, b, stats, part, cols, *fixed)
            elif self.sums is not None:
                run, fixed = self.sums
                if self._room_in(stats):
                    part = stats  # the forward left room (part_row): no allocation
                    (run, fixed), apply = self.sums_room, self.apply_room
                else:
                    part = _empty((4, self.part_rows, self.part_split), x.device)
                run.keyed(ck, x, dy, r, w, b, stats, part, *fixed)
            run, fixed = apply
            if self.col_two:  # the apply kernel also adds the column sums (adaLN's per sample)
                run.keyed(ck, x, dy, r, w, b, stats, part, dxp, dr, dwp, dbp, *fixed, ColPart=cols, **dhk)
            else:
                run.keyed(ck, x, dy, r, w, b, stats, part, dxp, dr, dwp, dbp, *fixed, **dhk)
        if self.dwdb is not None:
            run, fixed = self.dwdb
            if self.dwdb_split == 1:
                run.keyed(ck, x, dy, r, w, b, stats, dwp, dbp, *fixed)
            else:
                part = _empty((2, self.dwdb_split, self.C), x.device)
                run.keyed(ck, x, dy, r, w, b, stats, part, part, *fixed)
                self.finish.keyed(ck, part, dwp, dbp, self.C, self.dwdb_split)
        if need_dres and not self.write_dres:
            dres = dy
        if fwd.pre_add:  # add_norm: the residual's gradient is dx
            return dx, dw, db, (dres if self.dx_twice else dx)
        return dx if need_dx else None, dw, db, dres


    def _pixels(self, dy, x, w, b, r, weight, bias, stats):
        return self._own_kernels(self.pixels, dy, x, w, b, r, weight, bias, stats, _empty)


    def _planes(self, dy, x, w, b, r, weight, bias, stats):
        return self._own_kernels(self.planes, dy, x, w, b, r, weight, bias, stats, _empty)

    def _own_kernels(self, impl, dy, x, w, b, r, weight, bias, stats, *extra):
        """A backward of the whole-pixel or planes kernels (``impl``): outputs allocated here,
        x standing in for the ones not asked for."""
        need_dres = self.needs[3]
        dx = self.fwd.c.out(x) if self.needs[0] else None
        dres = self.fwd.c.out(x) if impl.write_dres else None
        dw = _empty(weight.shape, x.device, weight.dtype) if impl.need_dw else None
        db = _empty(bias.shape, x.device, bias.dtype) if impl.need_db else None
        ck = call_key(dy, x, r, weight, bias, stats)  # as __call__'s
        pr = self._room_in(stats)
        impl(x, dy, r, w, b, stats, x if dx is None else dx, x if dres is None else dres,
             x if dw is None else dw, x if db is None else db, *extra, ck, pr)
        if need_dres and dres is None:
            dres = dy
        return dx, dw, db, dres


_PLANS: dict = {}


def clear() -> None:
    """Forget every cached plan (the tuning cache, a shipped table, a switch or the profile
    changed), with the memoized dispatch plans and the call caches that hold launch plans
    (core, prenorm): everything registered with ``dispatch.on_clear``."""
    dispatch.clear_memo()


dispatch.on_clear(_PLANS.clear)


def forward_plan(x: torch.Tensor, spec: Spec, has_w: bool, has_b: bool, has_res: bool, act: int,
                 center: bool, mode: str, running: int, extra=(), pre_add: bool = False,
                 param_full: bool = False, param_nc: tuple | None = None) -> ForwardPlan:
    """The cached plan for this signature (``extra``: layout facts of the other tensors that
    change the plan, e.g. the residual's strides; ``pre_add``: add_norm's plan; ``param_full``,
    ``param_nc``: broadcast weight/bias, see ForwardPlan)."""
    key = (tuple(x.shape), x.stride(), x.dtype, x.device, spec, has_w, has_b, has_res, act, center, mode,
           running, extra, pre_add, param_full, param_nc, dispatch.forced_state())
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = ForwardPlan(x, spec, has_w, has_b, has_res, act, center, mode, running,
                                         profile_for(x.device), pre_add, param_full, param_nc)
    return plan


def forward(x, spec: Spec, weight, bias, residual, eps: float, center: bool, act: int,
            given: tuple | None = None, stats_only: bool = False, running=None, momentum: float = 0.0):
    """One-shot forward (the registered ops and tools): returns (y, stats).

    ``given``: (running_mean or None, running_var) to normalize with (eval); ``running``:
    (running_mean or None, running_var) to blend the batch statistics into (training)."""
    mode = "stats" if stats_only else ("given" if given is not None else "train")
    run = given if given is not None else running
    rm, rv = run if run is not None else (None, None)
    level = NO_RUNNING if rv is None or mode != "train" else (RUNNING_BOTH if rm is not None else RUNNING_VAR)
    plan = forward_plan(x, spec, weight is not None, bias is not None, residual is not None, act, center, mode,
                        level, (None if residual is None else residual.stride(),))
    return plan(x, weight, bias, residual, rm, rv, eps, momentum)
