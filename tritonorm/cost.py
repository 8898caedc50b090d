"""A cost model of a call: launches, bytes through device memory, and a predicted time.

For a planned call it counts what the launchers do (kernels/launch.py): every kernel launch,
every byte read or written (x, residual, dy, weight, bias, outputs, the [5, P] statistics, the
running buffers, fp32 partials), next to the *ideal* (each input read once, each output written
once). The predicted time is ``launches * launch_us + bytes / bandwidth`` with the profile's
figures: a floor for memory-bound kernels that the first GPU run checks
(``tritonorm bench`` prints it beside measured times; tests check the launch counts against the
launches the real launchers record). Needs neither triton nor a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import dispatch

_STATS_ROWS = 5  # pivot, shifted mean, rstd, var, mean


@dataclass(frozen=True)
class Cost:
    """Launches and bytes of one call (forward or backward) and the time they predict."""

    launches: int
    bytes_read: int
    bytes_written: int
    ideal_read: int
    ideal_written: int
    predicted_us: float
    # Of bytes_read, what the plan is built to take from the L2 (the WIDE backward's tile
    # programs sweeping the same rows together): still in bytes and predicted_us, which count
    # every byte requested at HBM bandwidth, as for every regime (bench --l2 models the rest).
    l2_read: int = 0
    l2_us: float = 0.0  # the part of predicted_us that l2_read accounts for

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def ideal(self) -> int:
        return self.ideal_read + self.ideal_written

    @property
    def ratio(self) -> float:
        """Bytes moved over the ideal (1.0 is the physical minimum)."""
        return self.bytes / max(1, self.ideal)

    def summary(self) -> str:
        text = (f"{self.launches} launch{'es' if self.launches != 1 else ''}, "
                f"{self.bytes / 2**20:.2f} MiB moved ({self.ratio:.2f}x ideal), "
                f"predicted {self.predicted_us:.1f} us")
        if self.l2_read:
            text += (f"; {self.l2_read / 2**20:.2f} MiB of the reads are meant to come from the L2 "
                     f"(without them {(self.bytes - self.l2_read) / max(1, self.ideal):.2f}x ideal, "
                     f"{self.predicted_us - self.l2_us:.1f} us)")
        return text


def _time(profile: dispatch.DeviceProfile, launches: int, nbytes: int) -> float:
    return launches * profile.launch_us + nbytes / (profile.hbm_gbps * 1e3)


def _merges(plan: dispatch.Plan, problem: dispatch.Problem, profile: dispatch.DeviceProfile) -> int:
    """How many times the split regime's partials are read: once by each column program of the
    apply grid (dispatch.apply_grid, as the launchers run it; looped: one program a row)."""
    cfg = plan.config
    if plan.kernel != "split":
        return 1
    if "block_p" not in cfg:  # channels_last whole-pixel tiles: SPLIT apply programs a block
        return cfg.get("split", 1)
    grid, _ = dispatch.apply_grid(problem.P, problem.M, cfg["block_p"], cfg["block_m"],
                                  fill=dispatch._fill(cfg["num_warps"], profile))
    return grid[1]


def forward_cost(plan: dispatch.Plan, problem: dispatch.Problem, profile: dispatch.DeviceProfile, *,
                 elem_bytes: int, channels: int, has_w: bool, has_b: bool, has_res: bool,
                 param_bytes: int, mode: str = "train", running: bool = False,
                 running_bytes: int = 4, pre_add: tuple[int, int] | None = None,
                 param_full: int = 0, param_nc: tuple[int, int] | None = None) -> Cost:
    """The forward as ``ForwardPlan`` runs it. ``mode``: "train", "given" (eval with running
    statistics) or "stats" (statistics only). ``pre_add``: add_norm's (residual bytes, h bytes)
    per element: every sweep reads x and the residual (h = x + residual is recomputed, not read
    back) and the last one also writes h; the torch regime adds h with torch ops first.
    ``param_full``: how many of weight/bias are broadcast (adaptive): each is first expanded to
    x's shape by a torch copy (a launch, an x-sized write) and read x-sized by the kernel.
    ``param_nc``: (their elements, the (C,) ones among them) for per-(sample, channel) weight/bias
    read in place by the GroupNorm/InstanceNorm kernels (or adaLN's per-(sample, column) ones by
    the row kernels): a plain call's launches and bytes, with N*C (N*D) parameters read instead
    of C (D)."""
    P, M = problem.P, problem.M
    n = P * M * elem_bytes
    add_in = add_out = 0
    if pre_add is not None:
        add_in, add_out = P * M * pre_add[0], P * M * pre_add[1]
    params = (has_w + has_b) * channels * param_bytes
    if param_nc is not None:
        params = param_nc[0] * param_bytes
    if param_full:
        # ``channels`` is then the broadcast parameter's own element count: read once by the
        # copy, which writes the x-sized expansion the kernel reads (counted as params below).
        params = (has_w + has_b) * P * M * param_bytes
    ideal_read = n + has_res * n + params + add_in
    ideal_written = (0 if mode == "stats" else n) + add_out
    read, written = params, _STATS_ROWS * P * 4 + add_out
    launches = 1
    if mode == "given":
        read += n + has_res * n + 2 * P * running_bytes + add_in
        written += n
    elif plan.kernel == dispatch.NATIVE:
        read += 2 * n + has_res * n
        written += n if mode != "stats" else 0
        launches = 3
        if pre_add is not None:
            # h by torch ops (x and the residual read, h written), then the torch regime sweeps
            # h twice instead of x.
            launches += 1
            read += (n + add_in) + 2 * (add_out - n)
    else:
        sweeps = 1 if plan.kernel == "fused" else 2
        split = plan.config.get("split", 1) if plan.kernel == "split" else 1
        read += sweeps * (n + add_in)
        if mode != "stats":
            read += has_res * n
            written += n
        if plan.kernel == "split":
            launches = 2
            written += 2 * P * split * 4
            # Each apply program merges its row block's partials before its tiles (statistics
            # only: one program a row block, no tile sweep).
            read += 2 * P * split * 4 * (1 if mode == "stats" else _merges(plan, problem, profile))
            if mode == "stats":
                read -= n
        if running:
            read += 2 * P * running_bytes
            written += 2 * P * running_bytes
    if param_full:
        launches += param_full
        read += param_full * channels * param_bytes
        written += param_full * P * M * param_bytes
        ideal_read += (has_w + has_b) * channels * param_bytes - params
    return Cost(launches, read, written, ideal_read, ideal_written, _time(profile, launches, read + written))


def backward_cost(plan: dispatch.Plan, problem: dispatch.Problem, dwdb_plan: dispatch.Plan | None,
                  profile: dispatch.DeviceProfile, *, elem_bytes: int, channels: int, has_w: bool, has_b: bool,
                  has_res: bool, act: bool, param_bytes: int, row_channel: bool, col_channel: bool,
                  given: bool = False, pre_add: tuple[int, int] | None = None, param_full: int = 0,
                  segments: tuple[int, int] | None = None, param_nc: tuple[int, int] | None = None,
                  sample_programs: int = 0) -> Cost:
    """The backward as ``BackwardPlan`` runs it, every gradient asked for (dx, and dweight,
    dbias, dresidual where those inputs exist). ``pre_add``: add_norm's (residual bytes, h bytes)
    per element: the kernels read the saved h in place of x, the dx pass also reads dh, and dx
    is written a second time in the residual's dtype when that differs from x's. ``param_full``:
    broadcast weight/bias (``channels`` = their element count): re-expanded to x's size by a torch
    copy, read x-sized by the kernels, which write x-sized per-element gradients that a torch
    reduction per parameter sums over the broadcast axes. ``segments``: (N*C, the sums kernel's
    split) when dweight/dbias come from per-(sample, channel) partials of the dx pass
    (GroupNorm, InstanceNorm; layout.Segments), or (S*C, split) from per-(sample group,
    channel) ones (Ghost BatchNorm, batch_group; layout.batch_segments): fused, [2, N*C] partials and a
    finish launch; looped/split, the sums kernel runs on the N*C segment rows and writes
    [4, N*C, split] partials, which the apply kernel reads back (S1, S2 per statistic, and
    dweight/dbias). Two launches either way.
    ``param_nc``: (elements of weight and bias, how many are (C,)) for per-(sample, channel) ones
    (with ``segments``): each is read and its gradient written once, N*C elements; the fused
    dx pass stores a per-sample gradient itself, so only a (C,) one beside it has fp32 partials
    and a finish launch. ``sample_programs``: the programs of the fused dx pass for adaLN's
    per-(sample, column) weight/bias (with ``param_nc``: (their elements, the (1, 1, D) ones)):
    as ``col_channel`` (an fp32 [2, programs, M] partial, a finish launch), each sample's rows
    summed by its own programs."""
    P, M = problem.P, problem.M
    n = P * M * elem_bytes
    C = channels
    need_wb = has_w or has_b
    res_read = n if has_res and act else 0
    dres_written = n if has_res and act else 0
    dh_read = 0
    xin = n  # the tensor normalized: x, or add_norm's saved h
    if pre_add is not None:
        xin = dh_read = P * M * pre_add[1]
        if pre_add[0] != elem_bytes:
            dres_written = P * M * pre_add[0]
    params_in = (has_w + has_b) * C * param_bytes
    if param_nc is not None:
        params_in = param_nc[0] * param_bytes
    params_out = params_in
    ideal_read = n + xin + dh_read + res_read + params_in
    ideal_written = n + dres_written + params_out
    stats = 3 * P * 4
    l2_read = 0
    launches = 0
    read = written = 0
    if plan.kernel == dispatch.NATIVE:
        sweeps = 3
        launches = 4
        read = sweeps * (n + xin + res_read) + params_in + dh_read
        written = n + dres_written + params_out
        return Cost(launches, read, written, ideal_read, ideal_written, _time(profile, launches, read + written))
    if plan.kernel == "fused":
        launches += 1
        # WIDE (rows longer than a program holds): each of a row's ``wide`` tile programs sweeps
        # the whole row before its tile's pass, so x and dy are requested 1 + wide times (the L2
        # serves all but the first: tritonorm.bench.l2 replays it).
        sweeps = 1 + plan.config.get("wide", 0)
        read += sweeps * (n + xin + res_read) + dh_read + stats + params_in
        l2_read = (sweeps - 1) * (n + xin + res_read)
        written += n + dres_written
        if need_wb and row_channel:
            written += params_out
        if need_wb and (col_channel or sample_programs):
            row_blocks = math.ceil(P / plan.config["block_p"])
            if "wide" in plan.config:
                progs = dispatch.wide_programs(row_blocks, plan.config["wide"], profile.sm_count)
            else:
                progs = sample_programs or dispatch.col_channel_programs(row_blocks, profile.sm_count)
            if P == 1 and not sample_programs:  # the dx kernel stores dweight/dbias itself
                written += params_out
            else:
                launches += 1
                written += 2 * M * progs * 4 + params_out
                read += 2 * M * progs * 4
        if need_wb and segments is not None:
            planes = 2 if param_nc is None else param_nc[1]  # fp32 [N*C] partials added over N
            launches += planes > 0
            written += planes * segments[0] * 4 + params_out
            read += planes * segments[0] * 4
    elif need_wb and col_channel and not given:
        # Columns are channels (LayerNorm rows), looped/split: the first stage stores each row's
        # S1, S2 per column tile and each program's per-column dweight/dbias sums; the apply
        # kernel adds a row's tiles and the programs' sums (adaLN's per sample too).
        bp, bm = plan.config["block_p"], plan.config["block_m"]
        tiles = math.ceil(M / bm)
        # adaLN's per-sample weight/bias: each sample's programs ([2, N*R, M] partials).
        progs = sample_programs or dispatch.col_tile_programs(math.ceil(P / bp), tiles, plan.config["num_warps"],
                                                              profile)
        launches += 2
        read += n + xin + res_read + 3 * P * 4 + params_in
        written += 2 * P * tiles * 4 + 2 * M * progs * 4
        read += n + xin + dh_read + res_read + stats + params_in + 2 * P * tiles * 4
        written += n + dres_written
        read += 2 * M * progs * 4
        written += params_out
    else:
        split = plan.config.get("split", 1)
        rows = P
        if segments is not None:
            rows, split = segments
            written += params_out  # by the apply kernel's first programs
        if not given:
            launches += 1
            read += n + xin + res_read + 3 * rows * 4 + params_in
            written += 4 * rows * split * 4
            # Each apply program merges its row block's S1, S2 partials (segments: those of its
            # statistics' segment rows); the dweight/dbias planes are read once.
            read += 4 * rows * split * 4 + 2 * rows * split * 4 * (_merges(plan, problem, profile) - 1)
        launches += 1
        read += n + xin + dh_read + res_read + stats + params_in
        written += n + dres_written
        if need_wb and row_channel:
            written += params_out
    if need_wb and not (row_channel or col_channel or param_full or segments is not None or sample_programs):
        split = max(1, dwdb_plan.config.get("split", 1)) if dwdb_plan is not None else 1
        launches += 1 + (split > 1)
        # The channel-view sweep re-reads x and dy and gathers the statistics per element.
        read += n + xin + res_read + stats + params_in
        written += params_out
        if split > 1:
            written += 2 * C * split * 4
            read += 2 * C * split * 4
    if param_full:
        # No channel sweep: each broadcast parameter is expanded again (a torch copy; only the
        # unexpanded one is saved), the dx kernels write per-element gradients, torch sums each.
        full = P * M * param_bytes
        launches += 2 * param_full
        written += param_full * full
        read += param_full * full + (has_w + has_b) * (full - C * param_bytes) * (1 if plan.kernel == "fused" else 2)
        written += param_full * full
        read += param_full * full  # the reductions read them back
    return Cost(launches, read, written, ideal_read, ideal_written, _time(profile, launches, read + written),
                l2_read, l2_read / (profile.hbm_gbps * 1e3))



def pixels_backward_cost(plan: dispatch.Plan, problem: dispatch.Problem, profile: dispatch.DeviceProfile, *,
                         samples: int, elem_bytes: int, channels: int, has_w: bool, has_b: bool, has_res: bool,
                         act: bool, param_bytes: int, param_nc: tuple | None = None, **_) -> Cost:
    """The backward of channels_last GroupNorm/InstanceNorm on whole-pixel tiles
    (kernels/pixels_backward.py), every gradient asked for: the dweight/dbias partials come out
    of the pass over x and dy. Fused/looped: [2, N, C] fp32, added by a finish kernel. Split: a
    [SPLIT, N, C] plane per parameter, written once and read once by the apply kernel's chunk-0
    programs, and dx's per-group S2, S1 partials [2, P, SPLIT], written once and read by each of
    a block's SPLIT apply programs. ``param_nc`` (explain's (parameter elements, per-channel ones
    among them)): per-(sample, channel) weight/bias, whose gradients are the partials themselves
    (fused/looped: no finish for them)."""
    P, M = problem.P, problem.M
    n = P * M * elem_bytes
    C, N = channels, samples
    need_wb = has_w or has_b
    res = n if has_res and act else 0
    params = (has_w + has_b) * C * param_bytes
    if param_nc is not None:
        params = param_nc[0] * param_bytes
        need_wb = param_nc[1] > 0  # a per-channel one beside: summed over the samples
    ideal_read = 2 * n + res + params
    ideal_written = n + res + params
    split = plan.config.get("split", 1)
    sweeps = 1 if plan.kernel == "fused" else 2
    read = sweeps * (2 * n + res) + 3 * P * 4 + params
    written = n + res + params
    if plan.kernel == "split":
        launches = 2
        planes = (has_w + has_b) * split * N * C * 4
        groups = 2 * P * split * 4
        written += planes + groups
        read += planes + groups * split
    else:
        launches = 1 + need_wb
        partials = 2 * N * C * 4 if need_wb else 0
        written += partials
        read += partials
    return Cost(launches, read, written, ideal_read, ideal_written, _time(profile, launches, read + written))


def planes_backward_cost(plan: dispatch.Plan, problem: dispatch.Problem, profile: dispatch.DeviceProfile, *,
                         elem_bytes: int, channels: int, has_w: bool, has_b: bool, has_res: bool, act: bool,
                         param_bytes: int, given: bool = False, groups: int = 1, **_) -> Cost:
    """The backward of NCHW BatchNorm on flat channel-block tiles (kernels/planes.py), every
    gradient asked for: one launch; dweight and dbias come out of the sums sweep and are stored
    directly (no partials). Looped, dx needs a second sweep over x and dy (and the residual
    with an activation); fused, or with given statistics (dx needs no sums), one sweep. Ghost
    BatchNorm (``groups`` S > 1 sample groups) with weight or bias: the sums are fp32 partials
    [2, S, C] (written, then read back by a finish launch that writes dweight/dbias)."""
    P, M = problem.P, problem.M
    n = P * M * elem_bytes
    res = n if has_res and act else 0
    params = (has_w + has_b) * channels * param_bytes
    ideal_read = 2 * n + res + params
    ideal_written = n + res + params
    sweeps = 1 if plan.kernel == "fused" or given else 2
    read = sweeps * (2 * n + res) + 3 * P * 4 + params
    written = n + res + params
    launches = 1
    if groups > 1 and (has_w or has_b):
        partials = (has_w + has_b) * groups * channels * 4
        launches, read, written = 2, read + partials, written + partials
    return Cost(launches, read, written, ideal_read, ideal_written, _time(profile, launches, read + written))
