"""Choosing a kernel regime and launch configuration for a problem.

A *problem* is what the kernels see once layout.py has made any scope a rows x cols strided view:
P statistics (rows) of M elements (columns), the element size, which side is unit-stride, plus
the descriptive key fields (op, scope, dtype, layout, flags) the tuning cache is keyed by.

``plan_for`` is the one entry point the launchers use. In order it returns:
  1. a plan forced by ``forced(...)`` (tests and the tuner),
  2. the user's tuning cache (measured on this GPU by ``tritonorm tune``; live devices only),
  3. the table shipped for the profile (tritonorm/tables/<name>.json),
  4. the analytic heuristic ``choose``.
Everything here is a pure function of (problem, profile), so plans for a GPU can be made and
tested on any machine. The thresholds are first heuristics from the kernels' register budgets
and occupancy arithmetic; docs/dispatch.md says which have been measured (none yet).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field, replace

# Triton kernel regimes (tests iterate over these).
REGIMES = ("fused", "looped", "split")
# The torch native op: selectable by a tuned table or cache entry, or forced; never chosen by the
# heuristic, because no measurement yet shows where it wins.
NATIVE = "torch"
KERNELS = REGIMES + (NATIVE,)

# The merge stage holds BLOCK_P x split partials in registers, and ``split`` is a power of two so
# the merge kernel's BLOCK_S takes few values (one compile each).
MAX_SPLIT = 256


@dataclass(frozen=True)
class DeviceProfile:
    """What the dispatcher needs to know about a device.

    ``fused_max``: largest statistic (elements) one program holds in registers, per element size
    in bytes, forward; the backward holds x and dy, so it gets half for fp32. Given as a dict,
    stored as sorted pairs so the profile stays hashable.
    """

    name: str
    sm_count: int
    fused_max: tuple = ((2, 16384), (4, 16384))
    # The backward holds x and dy: at 16 384 elements (32 of each per thread at 16 warps) every
    # suite case spilled at sm_90a (up to 4 KB per thread; `python -m tritonorm.aot`).
    fused_max_backward: tuple = ((2, 8192), (4, 8192))
    # Statistics whose columns are not one contiguous run (BatchNorm NCHW: N runs of H*W;
    # channels_last GroupNorm: runs of Cg channels) are indexed element by element, with an
    # address per element and no vector loads: they get this fraction of the fused limits
    # (BatchNorm 2048x7^2 and channels_last GroupNorm 1280x16^2 spilled at the full limits).
    strided_fused_div: int = 2
    # Elements one program should touch per tile (looped/split) or per launch block (fused).
    tile: int = 4096
    max_warps: int = 16
    # fp32 values of one tile each thread holds; num_warps follows the tile size. 16 keeps
    # programs at <= 8 warps for a 4096-element tile: at 16 warps (512 threads, 128 registers a
    # thread) the channels_last BatchNorm sums kernel spilled, at 8 warps it did not.
    values_per_thread: int = 16
    # (rows, columns) of a forward looped/split 16-bit tile when the statistics run along the
    # contiguous axis (channels_last BatchNorm; 8 warps; fp32 and the backward take half the
    # columns): see choose().
    strided_rows_block: tuple = (16, 1024)
    # Programs per SM the regimes aim for: ~4 resident programs of 8-16 warps fill an SM's
    # 64 warp slots, which is what hides HBM latency in a streaming kernel.
    programs_per_sm: int = 4
    # Below this many bytes moved, an op is launch-latency bound (a few microseconds): one
    # fused launch beats the three launches of a split reduction even on an idle GPU.
    split_min_bytes: int = 4 << 20
    interpreter: bool = False
    # Shipped table name (tritonorm/tables/<table>.json) and cache validators.
    table: str | None = None
    gpu_name: str | None = None
    capability: tuple | None = None
    # True for a profile built from a device present in this process (then the user's tuning
    # cache, which holds measurements of that device, is consulted).
    live: bool = False
    # The cost model's figures (tritonorm.cost): device-to-device copy bandwidth one can reach
    # (GB/s, read + write) and the time a launch adds (us). Datasheet-derived until measured.
    hbm_gbps: float = 2000.0
    launch_us: float = 4.0
    # The L2's size: second passes over more than half of it evict first (second_pass_policy).
    l2_bytes: int = 50 << 20

    def __post_init__(self):
        for attr in ("fused_max", "fused_max_backward"):
            value = getattr(self, attr)
            if isinstance(value, dict):
                object.__setattr__(self, attr, tuple(sorted(value.items())))

    def fused_limit(self, elem_bytes: int, op: str = "forward", contiguous: bool = True) -> int:
        """Largest fused statistic; ``contiguous=False``: its columns are not one unit-stride run."""
        pairs = dict(self.fused_max_backward if op != "forward" else self.fused_max)
        limit = pairs.get(elem_bytes, pairs.get(4, min(pairs.values())))
        return limit if contiguous else max(1, limit // self.strided_fused_div)


PROFILES = {
    # H100 SXM5 and H200: the same GH100 die, 132 SMs, 50 MB L2, compute capability 9.0;
    # the H200 has more and faster HBM (141 GB HBM3e, 4.8 TB/s vs 80 GB HBM3, 3.35 TB/s).
    # Copy bandwidth ~87-90% of the datasheet's 3.35 / 4.8 TB/s (what streaming kernels reach).
    "h100": DeviceProfile("h100", sm_count=132, table="h100", gpu_name="NVIDIA H100", capability=(9, 0),
                          hbm_gbps=2950.0, launch_us=3.0),
    "h200": DeviceProfile("h200", sm_count=132, table="h200", gpu_name="NVIDIA H200", capability=(9, 0),
                          hbm_gbps=4250.0, launch_us=3.0),
    # Triton's interpreter runs programs one after another in Python: few, large programs are
    # fastest there, and the limits only bound memory.
    "interpreter": DeviceProfile("interpreter", sm_count=4, fused_max={4: 4096, 2: 4096},
                                 fused_max_backward={4: 4096, 2: 4096}, strided_fused_div=1, tile=4096,
                                 values_per_thread=8, split_min_bytes=1 << 62, interpreter=True),
}


def profile_named(name: str) -> DeviceProfile:
    key = name.strip().lower()
    if key not in PROFILES:
        raise ValueError(f"device={name!r} is not a known profile; expected one of {', '.join(PROFILES)}")
    return PROFILES[key]


def profile_from_properties(gpu_name: str, sm_count: int, capability: tuple) -> DeviceProfile:
    """The profile of a present GPU: a named profile's table when the name matches, with the
    device's own SM count (an H100 PCIe has 114 SMs, not 132)."""
    lower = gpu_name.lower()
    base = DeviceProfile(gpu_name, sm_count=sm_count)
    for key in ("h200", "h100"):
        if key in lower:
            base = PROFILES[key]
            break
    return replace(base, sm_count=sm_count, gpu_name=gpu_name, capability=tuple(capability), live=True)


def profile_for_device(device) -> DeviceProfile:
    """The profile for a torch device (CUDA: its properties; anything else: the interpreter)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return PROFILES["interpreter"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_profile(index)


@functools.lru_cache(maxsize=None)
def _cuda_profile(index: int) -> DeviceProfile:
    import torch

    props = torch.cuda.get_device_properties(index)
    profile = profile_from_properties(props.name, props.multi_processor_count, (props.major, props.minor))
    l2 = getattr(props, "L2_cache_size", 0)  # torch's device properties (bytes); absent: the profile's
    return replace(profile, l2_bytes=l2) if l2 else profile


@dataclass(frozen=True)
class Problem:
    op: str            # "forward", "backward" (dx) or "dwdb" (weight/bias gradient reduction)
    P: int             # number of statistics
    M: int             # elements per statistic
    elem_bytes: int    # bytes per element of x
    rows_unit_stride: bool = False  # x's unit stride is on the statistics side (e.g. channels_last BN)
    # Descriptive fields: part of the tuning-cache key, not of the heuristic.
    scope: str = ""    # e.g. "NCHW:NHW/g1" (layout, reduced letters, groups), "/s8" with sample groups
    dtype: str = ""    # "float32", "bfloat16", "float16"
    layout: str = ""   # which side is unit-stride and how many dims each side has, e.g. "cols/1x2"
    flags: str = ""    # epilogue flags, e.g. "w,b,act=silu"
    col_run: int = 0   # contiguous elements per statistic run in x (0: unknown)
    # Columns a fused program holds when more than pow2(M): the backward's (channel, position)
    # tile for GroupNorm/InstanceNorm dweight/dbias, pow2(channels) * pow2(positions).
    fused_m: int = 0

    def key(self) -> str:
        """The tuning-cache key: descriptive fields and the power-of-two buckets of P and M."""
        return "|".join((self.op, self.scope, self.dtype, self.layout, self.flags,
                         f"P{bucket(self.P)}", f"M{bucket(self.M)}"))


@dataclass(frozen=True)
class Plan:
    """A kernel choice: ``kernel`` names the regime, ``config`` the launch parameters, ``reason``
    why (heuristic, cache hit, shipped table, forced)."""

    kernel: str
    config: dict
    reason: str
    # tritonorm.cost.Cost of the whole call (launches, bytes, predicted time) when explain() made
    # the plan; not part of a plan's identity.
    cost: object = field(default=None, compare=False)

    def with_config(self, **kw) -> "Plan":
        return replace(self, config={**self.config, **kw})


def _pow2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


def bucket(n: int) -> int:
    """Shape bucket: the next power of two. Configs depend on P and M only through these."""
    return _pow2(n)


def _warps(elements: int, profile: DeviceProfile) -> int:
    # ``values_per_thread`` fp32 values per thread per tile: at least 8 contiguous 16-bit values
    # (one 16-byte access), few enough to keep the program's registers under the SM's budget.
    return max(1, min(profile.max_warps, _pow2(elements // (32 * profile.values_per_thread))))


# The fused forward holds a contiguous block of up to this many fp32 elements on at most 8
# warps (32 a thread): on 16 warps Triton 3.6's ptxas kept LayerNorm 4096x8192 fp32 at 40
# registers and spilled (docs/compiled.md); on 8 it takes 75 and spills nothing, with as many
# bytes in flight an SM. Strided statistics (an address a value) stay on 16: on 8 the fp32
# conditional BatchNorm 256x32^2 forward took 231 registers.
FP32_FUSED_8_WARPS = 8192


def _fused_warps(elements: int, problem: Problem, profile: DeviceProfile, contiguous: bool) -> int:
    warps = _warps(elements, profile)
    if contiguous and problem.elem_bytes == 4 and problem.op == "forward" and elements <= FP32_FUSED_8_WARPS:
        warps = min(warps, 8)
    return warps


def _stream_block_m(problem: Problem, profile: DeviceProfile) -> int:
    """Columns per tile for the looped and split regimes, from the statistic's contiguous run:
    never from P, the split or M (BatchNorm's M includes the batch), so a layer compiles one
    BLOCK_M whatever its batch. About 64 tiles per run when it allows (work for a split of 32:
    Stable Diffusion's batch-1 GroupNorm, 32 statistics, needs that), 1024 at least (long
    enough to stream), the tile at most."""
    run = problem.col_run if problem.col_run > 1 else problem.M
    return min(profile.tile, max(1024, _pow2(run) // 64), _pow2(problem.M))


# Split-regime apply programs take several tiles each (see apply_grid); False: one tile a program,
# as before (the GPU report's A/B stage measures both).
APPLY_FILL = True
# Apply passes that follow a sweep of the same data (the split forward's partials, the two-stage
# backward's sums) take their tiles last to first (common.strided_tiles, launch.tile_order), so
# the L2 serves the part of the re-read that the sweep read last; False: first to last, as
# before (the GPU report's A/B stage measures both). Any order computes the same values.
APPLY_REVERSE = True


def sweep_back(n: int, block: int, reverse: bool | None = None) -> int:
    """A looped kernel's host int for its second sweep over ``n`` items in ``block``s (the row
    looped forward's columns, the planes kernels' samples): the sweep visits block |back - j|
    for j = 0, 1, ...; so the last block's index (its blocks last to first: first what the first
    sweep read last) where ``reverse`` (default APPLY_REVERSE), else 0 (first to last). A block
    index, not an element offset, so the kernels' start (index * BLOCK) keeps its known
    alignment; a host int (do_not_specialize), so both orders share one compiled variant."""
    if (APPLY_REVERSE if reverse is None else reverse) and n > 0:
        return (n - 1) // block
    return 0


# A second pass over data the L2 cannot keep whole (an apply kernel after the sweep of the same x
# and dy, a looped kernel's second sweep) loads and stores with eviction_policy="evict_first": what
# it reads is not read again and what it writes is read by a later kernel, if at all, after it has
# left the L2 anyway; so neither displaces the lines of x (dy) the same pass has yet to re-read.
# torch.compile's looped reductions mark their one-time loads the same way. False: no hints (the
# GPU report's A/B stage measures both). Tensors of at most half the L2 take none: their outputs
# may still be in the L2 when the next layer reads them.
EVICT_FIRST = True


def second_pass_policy(reread_bytes: int, profile: "DeviceProfile") -> str:
    """The eviction policy of a second pass that re-reads ``reread_bytes`` (x, and dy in a
    backward, and a residual): "evict_first" past half the profile's L2, else ""."""
    return "evict_first" if EVICT_FIRST and 2 * reread_bytes > profile.l2_bytes else ""


def second_pass_kw(second_pass: bool, reread_bytes: int, profile: "DeviceProfile") -> dict:
    """The EV constexpr of a kernel whose pass (``second_pass``: it follows a sweep of the same
    data in the same call) re-reads ``reread_bytes``: {"EV": second_pass_policy(...)}, or {} where
    there is no such pass or it takes no hint, so those plans compile what they always did."""
    ev = second_pass_policy(reread_bytes, profile) if second_pass else ""
    return {"EV": ev} if ev else {}


MAX_GRID_1 = 65535  # CUDA's limit on the second grid dimension
# Partials merged per step by the apply and finish kernels (row, whole-pixel and planes): a fixed
# block (not the split's next power of two), so the split count, which follows the batch, never
# compiles a new variant.
MERGE_BLOCK = 16


def apply_grid(P: int, M: int, bp: int, bm: int, one_program_per_row: bool = False, fill: int | None = None):
    """Grid of the apply kernels: (row blocks, column programs), and column tiles per program.

    ``fill``: the programs that fill the device, given when every apply program first merges the
    split regime's partials (SPLIT of them per row, read and combined before its first tile).
    Then the programs take several tiles each, about ``fill`` programs in all, so the merge is
    paid once per program rather than once per tile: with one tile a program, BatchNorm
    64x112^2 channels_last batch 256 (split 256, 16 x 1024 tiles) merged 4096 partial pairs,
    32 KB, for every 32 KB tile. (The H200 sweep in benchmarks/results/h200/NOTES.md: split
    512 ran 2.6x slower than split 128 with the same tiles.) The launchers run this grid and
    the cost model counts the merges from it (each column program reads its row block's
    partials once)."""
    n_tiles = -(-M // bm)
    row_blocks = -(-P // bp)
    col_progs = 1 if one_program_per_row else min(n_tiles, MAX_GRID_1)
    if fill is not None and not one_program_per_row and APPLY_FILL:
        col_progs = max(1, min(col_progs, -(-fill // row_blocks)))
    return (row_blocks, col_progs), -(-n_tiles // col_progs)


def _fill(warps: int, profile: DeviceProfile) -> int:
    """Programs of ``warps`` warps that fill the device: ``programs_per_sm`` programs of
    ``max_warps`` warps per SM (the SM's 64 warp slots), i.e. more of smaller programs, up to
    the 32 resident programs an SM takes."""
    per_sm = min(32, profile.programs_per_sm * max(1, profile.max_warps // max(1, warps)))
    return per_sm * profile.sm_count


def problem_from_view(op: str, view, elem_bytes: int, *, spec=None, dtype: str = "",
                      flags: str = "", fused_m: int = 0) -> Problem:
    """The problem a launcher (or explain) solves on a layout.View; one definition for both."""
    rows, cols = view.rows, view.cols
    rows_unit = rows.numel > 1 and _unit_run(rows) > 1
    run = _unit_run(cols)
    side = "rows" if rows_unit else ("cols" if run > 1 else "none")
    layout = f"{side}/{_ndims(rows)}x{_ndims(cols)}"
    if side == "cols":
        layout += f"/run{min(bucket(run), 4096)}"
    scope = f"{spec.layout}:{spec.letters}/g{spec.num_groups}" if spec is not None else ""
    if spec is not None and getattr(spec, "sample_groups", 1) > 1:
        scope += f"/s{spec.sample_groups}"  # its own tuning key; S = 1 keys are unchanged
    return Problem(op=op, P=view.P, M=view.M, elem_bytes=elem_bytes, rows_unit_stride=rows_unit,
                   scope=scope, dtype=dtype, layout=layout, flags=flags, col_run=run, fused_m=fused_m)


def _ndims(side) -> int:
    return max(1, sum(1 for n in side.sizes if n > 1))


def _unit_run(side) -> int:
    """Elements of a statistic that lie contiguously in x (the fastest dim, if unit-stride)."""
    dims = [(n, st) for n, st in zip(side.sizes, side.strides[0]) if n > 1]
    if not dims or dims[-1][1] != 1:
        return 1
    return dims[-1][0]


def flags_key(has_w: bool, has_b: bool, has_res: bool, act: int | str | None, center: bool) -> str:
    parts = [p for p, on in (("w", has_w), ("b", has_b), ("res", has_res), ("rms", not center)) if on]
    if act not in (None, 0, "none"):
        parts.append(f"act={act}")
    return ",".join(parts) or "-"


def choose(problem: Problem, profile: DeviceProfile) -> Plan:
    """The analytic heuristic (docs/dispatch.md explains each step)."""
    P, M = problem.P, problem.M
    Pb = bucket(P)
    total_bytes = P * M * problem.elem_bytes
    fill = profile.programs_per_sm * profile.sm_count
    contiguous = problem.rows_unit_stride or problem.col_run >= M
    fused_max = profile.fused_limit(problem.elem_bytes, problem.op, contiguous)
    block_m_full = max(_pow2(M), problem.fused_m)
    # Column-strided statistics (rows unit-stride) need several rows per program for coalesced
    # loads, so the fused regime must hold at least that many whole statistics.
    min_rows = min(Pb, 16) if problem.rows_unit_stride else 1
    fits = block_m_full * min_rows <= fused_max and problem.op != "dwdb"
    if fits:
        block_p = max(min_rows, min(Pb, profile.tile // block_m_full))
        if not profile.interpreter:
            # Keep >= 2 programs per SM when P allows (decided on the bucket of P, so the
            # compiled BLOCK_P is the same for every batch size in a bucket).
            while block_p > min_rows and Pb // block_p < 2 * profile.sm_count:
                block_p //= 2
        programs = -(-P // block_p)
        if programs >= profile.sm_count or total_bytes < profile.split_min_bytes:
            cfg = {"block_p": block_p, "block_m": block_m_full,
                   "num_warps": _fused_warps(block_p * block_m_full, problem, profile, contiguous)}
            why = (f"heuristic: statistic of {M} elements fits one program (<= {fused_max}); "
                   + (f"{programs} programs fill {profile.sm_count} SMs" if programs >= profile.sm_count
                      else f"{total_bytes >> 10} KiB is launch-latency bound: one launch"))
            return Plan("fused", cfg, why)
    gather = False
    warps = None
    if problem.rows_unit_stride:
        block_p = min(Pb, 32)
        block_m = max(16, profile.tile // block_p)
        if not profile.interpreter:
            # Statistics along the contiguous axis (channels_last BatchNorm): each column holds
            # only block_p contiguous values, so a tile needs many columns to keep bytes in
            # flight. Measured on an H200 (benchmarks/results/h200/NOTES.md), BatchNorm
            # 64x112^2 batch 256 channels_last bf16 forward: 32 x 128 tiles 1.49 ms; 16 x 1024
            # on 8 warps 0.47 ms; 64 x 1024 0.45 ms; 16 x 512 0.56 ms. The backward holds x and
            # dy: half the columns (at 16 x 1024 its sums kernel took 244-255 registers at
            # sm_90a, one program an SM; at 16 x 512, docs/compiled.md). Not yet measured.
            # Sized in bytes: fp32 takes half the columns (16 x 1024 fp32 spilled 8 B in the
            # Ghost BatchNorm partial kernel at sm_90a).
            rows, cols = profile.strided_rows_block
            cols = max(16, cols * 2 // problem.elem_bytes)
            if problem.op != "forward":
                cols //= 2
            block_p, block_m, warps = min(Pb, rows), cols, 8
    elif 1 < problem.col_run < 32:
        # Short contiguous runs (channels_last GroupNorm: Cg channels per group): neighbouring
        # statistics share cache lines, so one program takes enough of them for ~32-element runs.
        block_p = min(Pb, _pow2(32 // problem.col_run))
        # These tiles are gathered element by element (an address per element): half a tile
        # and 8 values a thread keep the backward sums kernel clear of spills at sm_90a (it
        # spilled 104 B at 4x1024 on 8 warps and 56 B at 4x512 on 4; none at 4x512 on 8).
        block_m = max(16, profile.tile // (block_p if profile.interpreter else 2 * block_p))
        gather = True
    else:
        block_p = 1
        block_m = _stream_block_m(problem, profile) if not profile.interpreter else min(profile.tile, block_m_full)
        if not profile.interpreter and block_m < 1024:
            # Short statistics that are not fused (dweight/dbias of small maps: 64 elements a
            # channel at GroupNorm 1280x8^2, batch 1): several rows a program, so each thread
            # still moves 16 bytes (a 1 x 64 tile on one warp moved 4).
            block_p = min(Pb, 1024 // block_m)
    row_programs = -(-P // block_p)
    tiles = -(-M // block_m)
    warps = warps or _warps(block_p * block_m * (2 if gather and not profile.interpreter else 1), profile)
    cfg = {"block_p": block_p, "block_m": block_m, "num_warps": warps}
    enough = row_programs >= fill
    if not profile.interpreter:
        # Fill counted in warps (smaller programs, more of them). Whole statistics filling half
        # the warp slots are enough: a split's extra stage and pass over x cost more than the
        # last half of the occupancy.
        fill = _fill(warps, profile)
        enough = row_programs >= fill // 2
    if enough or tiles == 1:
        return Plan("looped", {**cfg, "split": 1},
                    f"heuristic: {row_programs} programs of one statistic block each fill the device")
    split = min(MAX_SPLIT, _pow2(-(-fill // row_programs)))
    # Too few tiles to split that many ways: smaller tiles (down to 1024 elements, still long
    # enough to stream) rather than fewer programs. (On a GPU _stream_block_m has already sized
    # the tiles, batch-independently, so this only acts in the interpreter profile.)
    while split > tiles and block_m > 1024 and not problem.rows_unit_stride and profile.interpreter:
        block_m //= 2
        tiles = -(-M // block_m)
        cfg = {**cfg, "block_m": block_m, "num_warps": _warps(block_p * block_m, profile)}
    if not profile.interpreter:
        # Powers of four (4, 16, 64, 256): as the batch moves P (GroupNorm) or the tiles
        # (BatchNorm), split -- and with it the merge kernel's compiled BLOCK_S -- takes at most
        # three values over batch 1..64 instead of five (tests/test_sm90.py counts them).
        split = 1 << (2 * ((split.bit_length() - 1 + 1) // 2))
    while split > 1 and split > tiles:
        split //= 2 if profile.interpreter else 4
    if split <= 1:
        return Plan("looped", {**cfg, "split": 1},
                    "heuristic: one tile per statistic block, nothing to split")
    return Plan("split", {**cfg, "split": split},
                f"heuristic: only {row_programs} statistic blocks for {profile.sm_count} SMs: "
                f"{split} programs share each ({row_programs * split} programs)")


# Row blocks each program of the persistent LayerNorm-row backward owns at least: its [2, C] fp32
# dweight/dbias partial then costs at most 1/8 of a row's bytes per row.
ROWS_PER_PROGRAM = 8
# Programs of that backward per SM at most (the GPU report's A/B stage measures 2).
COL_PROGRAMS_PER_SM = 1


def col_channel_programs(row_blocks: int, sm_count: int) -> int:
    """Programs of the persistent LayerNorm-row backward: at most COL_PROGRAMS_PER_SM per SM
    (enough to keep the GPU busy on long inputs), each owning at least ROWS_PER_PROGRAM row
    blocks."""
    return max(1, min(COL_PROGRAMS_PER_SM * sm_count, -(-row_blocks // ROWS_PER_PROGRAM)))


# The backward of contiguous rows longer than one fused program holds (LayerNorm/RMSNorm at
# D = 16384): one pass over x and dy on a (programs, column tiles) grid, each program holding a
# tile and sweeping the whole rows for their sums first (kernels/backward.py, WIDE), where the
# looped regime's two stages read x and dy twice from HBM. False: the looped/split plan, as
# before (the GPU report's A/B stage measures both).
WIDE_ROWS = True
# At most this many tiles a row: every tile's program sweeps the whole row from the L2, so the
# L2 reads grow with the tiles (three row reads at two tiles: two sweeps and the tile reload).
WIDE_MAX_TILES = 2


def wide_plan(problem: Problem, profile: DeviceProfile, tiles: int | None = None,
              block_a: int | None = None) -> Plan | None:
    """The fused plan with ``wide`` column tiles for a backward of contiguous rows between one
    and WIDE_MAX_TILES times the fused limit (``tiles``: that many, whatever the limit, as
    ``forced(..., wide=tiles)`` asks), or None where it does not apply. The launcher also checks
    that the gradients suit it (see BackwardPlan)."""
    if problem.op != "backward" or problem.rows_unit_stride or problem.col_run < problem.M:
        return None
    limit = profile.fused_limit(problem.elem_bytes, "backward", True)
    if tiles is None:
        if not WIDE_ROWS or problem.M <= limit:
            return None
        tiles = -(-problem.M // limit)
        if tiles > WIDE_MAX_TILES:
            return None
    tiles = max(1, min(int(tiles), problem.M))
    block_m = _pow2(-(-problem.M // tiles))
    tiles = -(-problem.M // block_m)
    # The sweep's chunk is the tile: the sweep holds no more than the tile's pass does (sm_90a,
    # Triton 3.6 and 3.9: 100-126 registers, no spills), and a chunk of BLOCK_M columns puts
    # twice the bytes of a 4096-column one in flight a step: one 16-warp program an SM is all
    # the occupancy this kernel has, so its loads a step are what hides the memory's latency.
    block_a = _pow2(block_a) if block_a else block_m
    return Plan("fused", {"block_p": 1, "block_m": block_m, "num_warps": _warps(block_m, profile), "wide": tiles,
                          "block_a": block_a},
                f"heuristic: rows of {problem.M} elements, more than one program holds ({limit}): "
                f"{tiles} column tiles a row, each program sweeping the whole rows for their sums (one "
                f"pass over x and dy)")


def maybe_wide(plan: Plan, problem: Problem, profile: DeviceProfile) -> Plan:
    """``plan``, or the WIDE plan where the heuristic chose the looped or split regime for rows
    it suits (a tuned table's or a forced plan stays as it is)."""
    if plan.kernel in ("looped", "split") and plan.reason.startswith("heuristic"):
        return wide_plan(problem, profile) or plan
    return plan


def backward_wide(plan: Plan, problem: Problem, profile: DeviceProfile, suits: bool) -> Plan:
    """The backward plan the launcher runs (launch.BackwardPlan; explain asks the same): where
    the gradients ``suit`` the WIDE kernel (launch.wide_suits), ``maybe_wide``; where they do
    not, the heuristic's plan in place of a forced or stored WIDE one."""
    if suits:
        return maybe_wide(plan, problem, profile)
    return choose(problem, profile) if "wide" in plan.config else plan


def wide_programs(row_blocks: int, tiles: int, sm_count: int) -> int:
    """Programs along the rows of the WIDE backward: with the tiles, at most one an SM, so that
    every program runs at once and a row block's tiles stay in step (what lets the L2 serve
    their shared row sweeps); as ``col_channel_programs``, at least ROWS_PER_PROGRAM row blocks
    each."""
    return max(1, min(sm_count // max(1, tiles), -(-row_blocks // ROWS_PER_PROGRAM)))


def col_tile_programs(row_blocks: int, tiles: int, warps: int, profile: DeviceProfile) -> int:
    """Programs along the rows of the looped/split LayerNorm-row backward's first stage (one per
    column tile on the other axis): enough to fill half the device's warp slots with the tiles
    (as the split heuristic: the rest of the occupancy is worth less than the partials), never
    more than the row blocks. Each writes its tile's fp32 dweight/dbias sums, which the finish
    reads back: at 4096 x 16384 on an H200, 132 programs a tile, 17 MB against x's 134 MB."""
    return max(1, min(row_blocks, -(-_fill(warps, profile) // (2 * max(1, tiles)))))


def sample_tile_programs(samples: int, rows_per_sample: int, block_p: int, tiles: int, warps: int,
                         profile: DeviceProfile) -> int:
    """Programs a sample of the looped/split adaLN-row backward's first stage (per column tile):
    ``col_tile_programs``' count shared out over the samples, at most one a row block."""
    blocks = -(-rows_per_sample // block_p)
    return max(1, min(blocks, col_tile_programs(samples * blocks, tiles, warps, profile) // samples))


def sample_programs(samples: int, rows_per_sample: int, block_p: int, sm_count: int) -> int:
    """Programs a sample of the adaLN-row backward (per-sample weight/bias read in place): the
    persistent grid's programs shared out over the samples, each over that sample's row blocks
    only (at most one program a block)."""
    blocks = -(-rows_per_sample // block_p)
    total = col_channel_programs(samples * blocks, sm_count)
    return max(1, min(blocks, -(-total // samples)))


def fit(plan: Plan, problem: Problem, profile: DeviceProfile) -> Plan | None:
    """A stored plan adapted to this problem (split clamped to the tiles), or None when it cannot
    run it (a fused block narrower than the statistic, a malformed config)."""
    if plan.kernel not in KERNELS:
        return None
    if plan.kernel == NATIVE:
        return plan
    cfg = dict(plan.config)
    try:
        bp, bm, nw = int(cfg["block_p"]), int(cfg["block_m"]), int(cfg.get("num_warps", 4))
    except (KeyError, TypeError, ValueError):
        return None
    if bp < 1 or bm < 1 or bp & (bp - 1) or bm & (bm - 1) or nw < 1 or nw & (nw - 1):
        return None
    cfg.update(block_p=bp, block_m=bm, num_warps=nw)
    if plan.kernel == "fused" and "wide" in cfg:  # WIDE: its tiles and chunk, as forced(wide=...) plans them
        wide = wide_plan(problem, profile, cfg["wide"], cfg.get("block_a"))
        return None if wide is None else replace(wide, reason=plan.reason)
    if plan.kernel == "fused":
        if bm < max(problem.M, problem.fused_m):
            return None
        cfg.pop("split", None)
    else:
        tiles = -(-problem.M // bm)
        split = 1 if plan.kernel == "looped" else max(1, min(int(cfg.get("split", 2)), tiles, MAX_SPLIT))
        if plan.kernel == "split" and split < 2:
            return None
        cfg["split"] = split
    return replace(plan, config=cfg)


class _Forced:
    """The regime forced by ``forced(...)``: process-wide, not per thread. Autograd runs a CUDA
    tensor's backward in its own device thread, so a thread-local value set around
    ``autograd.grad`` was never seen by the backward's planning on a GPU (it is on the CPU, where
    the backward runs in the calling thread): the tests' forced backward regimes and the tuner's
    backward candidates silently ran the heuristic's plan."""

    value = None


_forced = _Forced()


def forced_state():
    """A hashable token of the regime forced now (None when nothing is): part of the
    launch-plan cache key, so a plan made under ``forced`` is not reused outside it."""
    value = _forced.value
    if value is None:
        return None
    kernel, op, cfg = value
    return (kernel, op, tuple(sorted(cfg.items())))


@contextlib.contextmanager
def forced(kernel: str, op: str | None = None, **config):
    """Force a regime (and optionally launch parameters) inside the block. For tests and tuning.

    The forcing is process-wide (autograd's device threads must see it): every thread's calls
    inside the block take it.

    ``op``: only problems of this op ("forward", "backward", "dwdb") are forced; default all.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not a regime; expected one of {', '.join(KERNELS)}")
    prev = _forced.value
    _forced.value = (kernel, op, config)
    try:
        yield
    finally:
        _forced.value = prev


def _forced_plan(kernel: str, cfg: dict, problem: Problem, profile: DeviceProfile) -> Plan:
    if kernel == NATIVE:
        return Plan(NATIVE, {}, "forced")
    if kernel == "fused" and cfg.get("wide"):  # where the WIDE backward cannot run: the heuristic's
        wide = wide_plan(problem, profile, cfg["wide"], cfg.get("block_a"))
        return replace(wide, reason="forced") if wide is not None else choose(problem, profile)
    nw = cfg.get("num_warps", 4)
    if kernel == "fused":
        need = max(_pow2(problem.M), problem.fused_m)
        block_p = cfg.get("block_p", max(1, min(_pow2(problem.P), profile.tile // need)))
        return Plan("fused", {"block_p": block_p, "block_m": need, "num_warps": nw}, "forced")
    block_p = cfg.get("block_p", 1)
    block_m = cfg.get("block_m", min(64, _pow2(problem.M)))
    tiles = -(-problem.M // block_m)
    split = 1 if kernel == "looped" else max(2, min(tiles, cfg.get("split", 3)))
    return Plan(kernel, {"block_p": block_p, "block_m": block_m, "split": split, "num_warps": nw}, "forced")


def _stored(problem: Problem, profile: DeviceProfile) -> Plan | None:
    """A plan from the user's tuning cache (live devices) or the shipped table, if one fits."""
    from .tuning import cache  # imports nothing back from tritonorm: no circle

    cache.on_change(clear_memo)  # idempotent; memoized plans are only made after this point
    key = problem.key()
    sources = []
    if profile.live:
        sources.append(("cache hit", cache.user_cache(profile)))
    if profile.table:
        sources.append((f"shipped table {profile.table}", cache.shipped_table(profile.table)))
    for label, store in sources:
        table_cap = getattr(store, "capability", None)
        if table_cap and profile.capability and table_cap != "%d.%d" % tuple(profile.capability[:2]):
            continue
        entry = store.get(key) if store is not None else None
        if entry is None:
            continue
        plan = fit(Plan(entry["kernel"], dict(entry.get("config", {})), label), problem, profile)
        if plan is not None:
            return replace(plan, reason=f"{label}: {key}")
    return None


_memo: dict = {}
_memo_lock = threading.Lock()


_clear_hooks: list = []


def on_clear(hook) -> None:
    """Call ``hook()`` whenever memoized plans are forgotten (the launch-plan cache registers)."""
    _clear_hooks.append(hook)


def clear_memo() -> None:
    """Forget memoized plans (after the tuning cache or a table changed)."""
    with _memo_lock:
        _memo.clear()
    for hook in _clear_hooks:
        hook()


def plan_for(problem: Problem, profile: DeviceProfile) -> Plan:
    """The plan a call runs: forced, else cache, else shipped table, else the heuristic."""
    force = _forced.value
    if force is not None:
        kernel, op, cfg = force
        if op is None or op == problem.op:
            return _forced_plan(kernel, cfg, problem, profile)
    memo_key = (problem, profile)
    plan = _memo.get(memo_key)
    if plan is None:
        plan = _stored(problem, profile) or choose(problem, profile)
        with _memo_lock:
            if len(_memo) > 4096:
                _memo.clear()
            _memo[memo_key] = plan
    return plan
