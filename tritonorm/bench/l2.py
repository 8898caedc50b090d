"""What the L2 can serve of a two-sweep call: an LRU replay of the kernels' access order.

The split and looped regimes read x (and, backward, dy) twice: a first kernel or sweep for the
statistics or the sums, then the apply pass. The cost model (``tritonorm/cost.py``) counts bytes
*requested*. How many of the second pass's bytes come from HBM depends on what the L2 still
holds, and that depends on the order in which the programs touch the tensor. This module replays
that order, as the launchers would run it on a device profile, through a least-recently-used
cache of the L2's size, and says what part of each call's requested reads it serves.

It is a model, not a measurement, and a simple one:
- the launches are recorded from the real host path planning for the profile
  (``aot.record.planning_for``; nothing runs), and each recorded launch of a modelled kernel is
  turned into its programs' tiles: which BLOCK-byte blocks of x, dy and the outputs each tile
  touches, from the kernel's own geometry tuples (``common.side_offsets``);
- programs are dispatched in grid order (axis 0 fastest) onto ``dispatch._fill(num_warps)``
  resident slots, and the resident programs advance one tile each in turn;
- the cache is one fully associative LRU of ``capacity`` bytes in BLOCK-byte units, evicted
  whole, that counts hits by 32-byte sector (what the L2 fetches at a time); writes allocate
  (the outputs take room as they are written); a unit that a pass with the kernels' evict-first
  hint (``EV``, dispatch.second_pass_policy) reads or writes goes to the evicted-first end; a
  call starts cold (other layers ran in between).
A real L2 is set associative, split in two partitions, and not exactly LRU, so the figures are
for comparing orders and for reading the GPU report's measured times against, not for trusting
to the byte. Modelled: the calls that read x twice on the row kernels (``forward.py``,
``backward.py``: the looped and split forwards and the two-stage backwards, LayerNorm rows'
column sums included) and the split
regime of the whole-pixel kernels (``pixels.py``, ``pixels_backward.py``: channels_last
GroupNorm/InstanceNorm, whose apply programs sweep the same chunks as the first stage's), and
the planes kernels' looped calls (``planes.py``: NCHW BatchNorm at 14x14 and 7x7, a channel
block's sample tiles swept twice in one launch). Calls of the row kernels' fused ones alone,
or of the planes and whole-pixel kernels' fused ones, read x once (what they request is what
HBM moves); calls with other kernels (the whole-pixel looped ones) are reported as not
modelled.

    python -m tritonorm.bench.l2 [--device h200] [--suite S] [--filter TEXT] [--two-sweep] [--json PATH]

The whole set of suites takes about ten minutes (the 392 MiB cases most of it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict

from tritonorm.dispatch import sweep_back
from tritonorm.kernels.launch import tile_order
from tritonorm.kernels.pixels import pixels_order

BLOCK = 512  # bytes a modelled cache unit holds (four 128-byte lines)
L2_BYTES = {"h100": 50 << 20, "h200": 50 << 20}  # GH100: 50 MB of L2

# Kernels whose access order is modelled; tiny kernels beside them (finishing partial sums) move
# a few KB and are ignored.
_PIXELS = {"_pixels_partial_kernel", "_pixels_apply_kernel", "_pixels_bwd_sums_kernel", "_pixels_bwd_apply_kernel"}
_PLANES = {"_planes_fwd_kernel", "_planes_bwd_kernel"}
_MODELLED = {"_fwd_looped_kernel", "_fwd_partial_kernel", "_fwd_apply_kernel", "_bwd_sums_kernel", "_bwd_col_sums_kernel",
             "_bwd_apply_kernel", "_bwd_fused_kernel"} | _PIXELS | _PLANES
_IGNORED = {"_finish_kernel", "_finish_samples_kernel"}
# A call with one of these reads x twice; a call of the row kernels' fused ones alone reads it
# once (what it requests is what HBM moves) and is not replayed.
_TWO_SWEEP = {"_fwd_looped_kernel", "_fwd_partial_kernel", "_bwd_sums_kernel", "_bwd_col_sums_kernel", "_pixels_partial_kernel",
              "_pixels_bwd_sums_kernel"}
_ONE_SWEEP = {"_fwd_fused_kernel", "_bwd_fused_kernel"}


# Kernels that read their input once when FUSED (a program's whole data in one tile), twice
# (two sweeps in one launch) otherwise.
_FUSED_ONCE = _PLANES | {"_pixels_fwd_kernel", "_pixels_bwd_kernel"}


def _two_sweep(launch) -> bool:
    """Whether a launch reads its input twice: the first stages and looped kernels above, and
    the planes and whole-pixel fused/looped kernels unless FUSED."""
    if launch.name in _FUSED_ONCE:
        return not launch.args["FUSED"].value
    if launch.name == "_bwd_fused_kernel":  # WIDE: each tile's program sweeps the whole rows first
        return bool(getattr(launch.args.get("WIDE"), "value", 0))
    return launch.name in _TWO_SWEEP


SECTOR = 32  # bytes: what the L2 fetches from HBM at a time
_FULL = (1 << (BLOCK // SECTOR)) - 1


class LRU:
    """A fully associative least-recently-used cache of ``capacity`` units, each holding which of
    its SECTOR-byte sectors have been fetched (a bit mask): units are evicted whole, hits are
    counted by sector, so two tiles that share a unit but not its sectors do not serve each
    other."""

    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self.lines: OrderedDict = OrderedDict()

    def access(self, key, mask: int = _FULL) -> float:
        """Touch the sectors ``mask`` of unit ``key``; the fraction of them it held."""
        lines = self.lines
        held = lines.get(key)
        if held is not None:
            lines.move_to_end(key)
            lines[key] = held | mask
            if held & mask == mask:
                return 1.0
            return bin(held & mask).count("1") / bin(mask).count("1")
        lines[key] = mask
        if len(lines) > self.capacity:
            lines.popitem(last=False)
        return 0.0


WRITE, EVICT_FIRST = 1, 2  # an access's flags (a bool is a write flag)


def run_kernel(cache: LRU, programs, slots: int) -> tuple[float, float, float]:
    """Replay one launch: ``programs`` (in dispatch order) are iterables of steps, a step a list
    of (key, bytes used of that unit, its sectors used (mask), flags: WRITE, EVICT_FIRST (the
    kernels' eviction_policy="evict_first": the unit goes to the evicted-first end of the LRU
    instead of staying at its most recent end)); ``slots`` of them are resident at once and take
    a step each in turn. Returns (bytes read, bytes read from units the cache held, bytes
    written)."""
    from collections import deque

    queue = iter(programs)
    active = deque()
    for _ in range(max(1, slots)):
        p = next(queue, None)
        if p is None:
            break
        active.append(iter(p))
    reads = hits = writes = 0.0
    access = cache.access
    lines = cache.lines
    while active:
        prog = active.popleft()
        step = next(prog, None)
        if step is None:
            p = next(queue, None)
            if p is not None:
                active.append(iter(p))
            continue
        for key, used, mask, flags in step:
            hit = access(key, mask)
            if flags & WRITE:
                writes += used
            else:
                reads += used
                hits += used * hit
            if flags & EVICT_FIRST:
                lines.move_to_end(key, last=False)
        active.append(prog)
    return reads, hits, writes


class Geometry:
    """A side's geometry tuple (layout.Side.geometry): flat index -> element offset into x
    (set 0) or into the outputs (set 1)."""

    def __init__(self, g: tuple, which: int):
        self.s1, self.s2, self.s3 = g[0], g[1], g[2]
        self.st = g[3 + 4 * which: 7 + 4 * which]
        # The innermost digit of size > 1 (digit 0 has no bound): runs of indices along it
        # have offsets in one arithmetic progression.
        k = 3
        while k > 0 and g[k - 1] == 1:
            k -= 1
        self.run = g[k - 1] if k > 0 else 0
        self.run_stride = self.st[k]

    def offset(self, idx: int) -> int:
        i3 = idx % self.s3
        q = idx // self.s3
        i2 = q % self.s2
        q //= self.s2
        i1 = q % self.s1
        i0 = q // self.s1
        a, b, c, d = self.st
        return i0 * a + i1 * b + i2 * c + i3 * d

    def spans(self, start: int, stop: int):
        """(first, last, stride) element offsets of the runs of indices start..stop-1 along the
        innermost digit of size > 1 (one run per value of the outer digits)."""
        run, d = self.run, self.run_stride
        i = start
        while i < stop:
            end = min(stop, (i // run + 1) * run) if run else stop
            a, b = self.offset(i), self.offset(i) + (end - 1 - i) * d
            yield ((a, b) if a <= b else (b, a)) + (abs(d),)
            i = end


class Tiles:
    """The BLOCK-byte blocks a (row block, column range) tile of a tensor touches, cached."""

    def __init__(self, rg: tuple, cg: tuple, which: int, elem_bytes: int, P: int, M: int, bp: int):
        self.rows, self.cols = Geometry(rg, which), Geometry(cg, which)
        self.eb, self.P, self.M, self.bp = elem_bytes, P, M, bp
        self.memo: dict = {}

    def blocks(self, rb: int, c0: int, c1: int) -> tuple:
        """((unit, bytes of it the tile uses, which of its sectors), ...) of the tile of row
        block ``rb`` and columns c0..c1-1: address blocks of BLOCK bytes, or for interleaved
        data, BLOCK bytes of the row block's own slices."""
        key = (rb, c0, c1)
        got = self.memo.get(key)
        if got is None:
            c1 = min(c1, self.M)
            r0, r1 = rb * self.bp, min((rb + 1) * self.bp, self.P)
            used: dict = {}
            if c0 < c1 and r0 < r1:
                row_offs = sorted(self.rows.offset(r) for r in range(r0, r1))
                col_spans = list(self.cols.spans(c0, c1))
                # Adjacent rows (channels_last: a row block is contiguous channels) go together:
                # one group from the first to the last.
                groups, lo = [], row_offs[0]
                prev = lo
                for o in row_offs[1:]:
                    if o - prev != 1:
                        groups.append((lo, prev))
                        lo = o
                    prev = o
                groups.append((lo, prev))
                for glo, ghi in groups:
                    for a, b, d in col_spans:
                        _units(used, glo, ghi, a, b, d, self.eb)
            got = self.memo[key] = tuple((k, u, m) for k, (u, m) in used.items())
        return got


def _units(used: dict, glo: int, ghi: int, a: int, b: int, d: int, eb: int) -> None:
    """Add to ``used`` (unit -> (bytes, sector mask)) the elements glo..ghi (a group of adjacent
    rows or channels) of each column at offsets a, a + d, ..., b."""
    width = ghi - glo + 1
    if d > width:
        # Interleaved (channels_last BatchNorm, channel blocks of whole-pixel tiles: each pixel
        # holds the group's few channels among all of them): the group's slice of each column
        # is data of its own, so its units are (group, BLOCK bytes of such slices), never
        # shared with another group's.
        # A unit holds ``per`` columns' slices, one mask bit each (so a tile that ends inside a
        # unit does not serve the next tile the slices it did not fetch).
        per = max(1, min(BLOCK // SECTOR, BLOCK // (width * eb)))
        for off in range(a, b + 1, d):
            col = off // d
            k = ("slice", glo, col // per)
            u, m = used.get(k, (0.0, 0))
            used[k] = (u + width * eb, m | (1 << (col % per)))
        return
    # Contiguous: the address blocks from the first byte to the last, and the sectors of each.
    lo_b, hi_b = (glo + a) * eb, (ghi + b + 1) * eb
    for k in range(lo_b // BLOCK, (hi_b - 1) // BLOCK + 1):
        s0, s1 = max(lo_b, k * BLOCK), min(hi_b, (k + 1) * BLOCK)
        mask = ((1 << ((s1 - 1 - k * BLOCK) // SECTOR + 1)) - 1) ^ ((1 << ((s0 - k * BLOCK) // SECTOR)) - 1)
        u, m = used.get(k, (0.0, 0))
        used[k] = (min(BLOCK, u + s1 - s0), m | mask)


class PixelTiles:
    """The units a whole-pixel tile touches (kernels/pixels.py, pixels_backward.py): sample n,
    channel block cb (CB channels), pixels p0..p1-1 of a channels_last tensor, cached."""

    def __init__(self, HW: int, C: int, CB: int, NCB: int, elem_bytes: int):
        self.HW, self.C, self.CB, self.NCB, self.eb = HW, C, CB, NCB, elem_bytes
        self.memo: dict = {}

    def blocks(self, pid: int, p0: int, p1: int) -> tuple:
        key = (pid, p0, p1)
        got = self.memo.get(key)
        if got is None:
            n, cb = divmod(pid, self.NCB)
            used: dict = {}
            p1 = min(p1, self.HW)
            if p0 < p1:
                glo = n * self.HW * self.C + cb * self.CB
                _units(used, glo, glo + self.CB - 1, p0 * self.C, (p1 - 1) * self.C, self.C, self.eb)
            got = self.memo[key] = tuple((k, u, m) for k, (u, m) in used.items())
        return got


def _pixel_programs(launch, tiles_of, reverse=None):
    """The programs of a whole-pixel split launch: grid (samples x channel blocks, SPLIT), each
    sweeping its chunk of pixels; the apply kernels' program (|FIRST_PID - pid0|,
    |FIRST_SP - pid1|) from pixel |TILE0 - t| (pixels.pixels_order; ``reverse`` overrides it)."""
    name = launch.name
    a = _args(launch)
    bwd = "_bwd_" in name
    apply = name.endswith("apply_kernel")
    roles = ["X"] + (["DY"] if bwd else [])
    out = ("DX" if bwd else "Y") if apply else None
    if out == "DX" and not a.get("NEED_DX", True):
        out = None
    tiles = {r: tiles_of(r, a) for r in roles + ([out] if out else [])}
    chunk, hw, bhw = a["CHUNK"], a["HW"], a["BLOCK_HW"]
    g0, g1 = launch.grid[0], (tuple(launch.grid) + (1,))[1]
    first_pid, first_sp, tile0 = (a["FIRST_PID"], a["FIRST_SP"], a["TILE0"]) if apply else (0, 0, 0)
    if apply and reverse is not None:  # the other order (the launchers' own rule)
        first_pid, first_sp, tile0 = pixels_order(g0, g1, chunk, bhw, True, reverse)
    for p1 in range(g1):
        for p0 in range(g0):
            pid, sp = abs(first_pid - p0), abs(first_sp - p1)
            start, end = sp * chunk, min(sp * chunk + chunk, hw)
            steps = []
            for t0 in range(0, chunk, bhw):
                t = start + abs(tile0 - t0)
                if t >= end:
                    continue
                step = [((r, k), u, m, False) for r in roles for k, u, m in tiles[r].blocks(pid, t, t + bhw)]
                if out:
                    step += [((out, k), u, m, True) for k, u, m in tiles[out].blocks(pid, t, t + bhw)]
                steps.append(step)
            yield steps


class PlaneTiles:
    """The units the planes kernels' tiles touch (kernels/planes.py): for sample n and channel
    block pid, one contiguous run of T = CB * HW elements at (n * NCB + pid) * T; cached."""

    def __init__(self, T: int, NCB: int, elem_bytes: int):
        self.T, self.NCB, self.eb = T, NCB, elem_bytes
        self.memo: dict = {}

    def blocks(self, pid: int, n0: int, n1: int) -> tuple:
        key = (pid, n0, n1)
        got = self.memo.get(key)
        if got is None:
            used: dict = {}
            for n in range(n0, n1):
                lo = (n * self.NCB + pid) * self.T
                _units(used, lo, lo + self.T - 1, 0, 0, 1, self.eb)
            got = self.memo[key] = tuple((k, u, m) for k, (u, m) in used.items())
        return got


def _evict(a: dict, hints) -> int:
    """EVICT_FIRST for the accesses of a launch's second pass that takes the kernels' EV hint
    (dispatch.second_pass_policy), as recorded (``hints`` None) or not at all (False)."""
    return EVICT_FIRST if hints is not False and a.get("EV") == "evict_first" else 0


def _plane_programs(launch, tiles_of, reverse=None, hints=None):
    """The programs of a planes launch: grid (channel blocks, sample groups), each sweeping its
    group's N samples in BLOCK_N tiles for the moments or sums, then again for y or dx (FUSED:
    one tile, read once); the second sweep's tile j is |N_BACK - j| (dispatch.sweep_back;
    ``reverse`` overrides it), its accesses evict-first where the launch says so (EV)."""
    a = _args(launch)
    ev = _evict(a, hints)
    bwd = launch.name == "_planes_bwd_kernel"
    roles = ["X"] + (["DY"] if bwd else [])
    out = "DX" if bwd else "Y"
    if bwd and not a["NEED_DX"]:
        out = None
    T = a["CB"] * a["HW"]
    tiles = {r: tiles_of(r, dict(a, T=T)) for r in roles + ([out] if out else [])}
    N, bn = a["N"], a["BLOCK_N"]
    back = a.get("N_BACK", 0)
    if reverse is not None:
        back = sweep_back(N, bn, reverse)
    g0, g1 = launch.grid[0], (tuple(launch.grid) + (1,))[1]

    def touch(pid, n0, n1, write, flags=0):
        step = [((r, k), u, m, flags) for r in roles for k, u, m in tiles[r].blocks(pid, n0, n1)]
        if write and out:
            step += [((out, k), u, m, flags | WRITE) for k, u, m in tiles[out].blocks(pid, n0, n1)]
        return step

    for s in range(g1):
        for pid in range(g0):
            lo = s * N
            if a["FUSED"]:
                yield [touch(pid, lo, lo + N, True)]
                continue
            first = [touch(pid, lo + n0, lo + min(n0 + bn, N), False) for n0 in range(0, N, bn)]
            second = []
            for j in range(-(-N // bn)):
                n0 = abs(back - j) * bn
                second.append(touch(pid, lo + n0, lo + min(n0 + bn, N), True, ev))
            yield first + second


def _args(launch) -> dict:
    return {k: (a.value if a.kind in ("int", "bool", "constexpr", "float") else
                tuple(v.value for v in a.value) if a.kind == "tuple" else a)
            for k, a in launch.args.items()}


def _tensor_bytes(arg) -> int:
    import torch

    return getattr(torch, arg.dtype).itemsize


def _programs(launch, tiles_of, reverse=None, hints=None):
    """The programs of a recorded launch in dispatch order, each a list of steps (an apply
    kernel's, or a looped kernel's second sweep's, evict-first where the launch says so: EV)."""
    name = launch.name
    a = _args(launch)
    ev = _evict(a, hints)
    bm, M = a["BLOCK_M"], a["M"]
    grid = tuple(launch.grid) + (1, 1)
    g0, g1 = grid[0], grid[1]
    x = tiles_of("X", a)
    out_name = "Y" if name.startswith("_fwd") else "DX"
    dy = tiles_of("DY", a) if name.startswith("_bwd") else None
    out = tiles_of(out_name, a) if out_name in a and not isinstance(a[out_name], (int, type(None))) else None

    def touch(rb, c0, c1, read_dy=False, write=True, flags=0):
        step = [(("X", k), u, m, flags) for k, u, m in x.blocks(rb, c0, c1)]
        if read_dy and dy is not None:
            step += [(("DY", k), u, m, flags) for k, u, m in dy.blocks(rb, c0, c1)]
        if write and out is not None:
            step += [((out_name, k), u, m, flags | WRITE) for k, u, m in out.blocks(rb, c0, c1)]
        return step

    bwd = name.startswith("_bwd")
    if name == "_fwd_looped_kernel":
        back = a.get("M_BACK", 0)  # the second sweep's tile j is |M_BACK - j| (forward.py)
        if reverse is not None:
            back = sweep_back(M, bm, reverse)
        for rb in range(g0):
            first = [touch(rb, m, m + bm, write=False) for m in range(0, M, bm)]
            second = ([touch(rb, abs(back - j) * bm, abs(back - j) * bm + bm, flags=ev) for j in range(-(-M // bm))]
                      if out is not None else [])
            yield first + second
    elif name == "_bwd_fused_kernel":  # WIDE: program (r, t) sweeps row blocks r, r + R, ..., then tile t
        wide = a["WIDE"]
        for t in range(g1):
            for r in range(g0):
                steps = []
                for rb in range(r, a["ROW_BLOCKS"], g0):
                    steps += [touch(rb, m, m + wide, read_dy=True, write=False) for m in range(0, M, wide)]
                    steps.append(touch(rb, t * bm, t * bm + bm, read_dy=True))
                yield steps
    elif name == "_bwd_col_sums_kernel":  # program (r, t): column tile t of row blocks r, r + R, ...
        for t in range(g1):
            for r in range(g0):
                yield [touch(rb, t * bm, t * bm + bm, read_dy=True, write=False)
                       for rb in range(r, a["ROW_BLOCKS"], g0)]
    elif name in ("_fwd_partial_kernel", "_bwd_sums_kernel"):
        chunk = a["CHUNK"]
        for sp in range(g1):
            for rb in range(g0):
                start, end = sp * chunk, min(sp * chunk + chunk, M)
                yield [touch(rb, m, min(m + bm, end), read_dy=bwd, write=False) for m in range(start, end, bm)]
    elif name in ("_fwd_apply_kernel", "_bwd_apply_kernel"):
        step, tpp, first = a["TILE_STEP"], a["TILES_PER_PROG"], a["FIRST_TILE"]
        if reverse is not None:  # the other order of the same tiles (the launchers' own rule)
            step, tpp, first = tile_order(abs(step), tpp, True, reverse)
        for p1 in range(g1):
            for rb in range(g0):
                steps = []
                for i in range(tpp):  # common.strided_tiles
                    c0 = (abs(first - p1) + i * step) * bm
                    if c0 < M:
                        steps.append(touch(rb, c0, c0 + bm, read_dy=bwd, flags=ev))
                yield steps
    else:
        raise ValueError(name)


def replay(launches, profile, capacity_bytes: int, reverse=None, memo: dict | None = None, hints=None) -> dict:
    """Replay a call's recorded launches through one cold LRU of ``capacity_bytes``; ``reverse``
    overrides the apply kernels' tile order (None: as recorded; launch.tile_order); ``hints``
    False ignores the launches' evict-first hints (None: as recorded). Returns bytes read,
    bytes the L2 served and bytes written, per launch and in all."""
    from tritonorm import dispatch

    cache = LRU(capacity_bytes // BLOCK)
    memo = {} if memo is None else memo  # the tiles' blocks, shared by replays of the same launches

    def tiles_of(role, a):
        t = a[role]
        if "T" in a:  # planes runs
            key = ("planes", role, a["T"], a["NCB"])
            if key not in memo:
                memo[key] = PlaneTiles(a["T"], a["NCB"], _tensor_bytes(t))
            return memo[key]
        if "NCB" in a:  # whole-pixel tiles
            key = ("pixels", role, a["HW"], a["C"], a["CB"], a["NCB"])
            if key not in memo:
                memo[key] = PixelTiles(a["HW"], a["C"], a["CB"], a["NCB"], _tensor_bytes(t))
            return memo[key]
        key = (role, a["RG"], a["CG"], a["BLOCK_P"], a["P"], a["M"])
        if key not in memo:
            memo[key] = Tiles(a["RG"], a["CG"], 0 if role == "X" else 1, _tensor_bytes(t), a["P"], a["M"],
                              a["BLOCK_P"])
        return memo[key]

    per = []
    for launch in launches:
        if launch.name in _IGNORED:
            continue
        warps = launch.options.get("num_warps", 4)
        programs = (_pixel_programs(launch, tiles_of, reverse) if launch.name in _PIXELS
                    else _plane_programs(launch, tiles_of, reverse, hints) if launch.name in _PLANES
                    else _programs(launch, tiles_of, reverse, hints))
        r, h, w = run_kernel(cache, programs, dispatch._fill(warps, profile))
        per.append({"kernel": launch.name, "grid": list(launch.grid), "reads": r, "hits": h, "writes": w})
    return {"launches": per, "reads": sum(p["reads"] for p in per), "hits": sum(p["hits"] for p in per),
            "writes": sum(p["writes"] for p in per)}


def record_call(case, dtype, channels_last: bool, profile_name: str):
    """(forward launches, backward launches) of one training call of ``case``, planned for the
    profile; nothing runs."""
    from tritonorm.aot import variants as V
    from tritonorm.aot.record import LaunchRecorder, planning_for

    rec = LaunchRecorder()
    with planning_for(profile_name), rec:
        V.run_case(case, dtype, channels_last, rec=rec)
    fwd = [la for la in rec.launches if la.tags.get("phase") == "forward"]
    bwd = [la for la in rec.launches if la.tags.get("phase") == "backward"]
    return fwd, bwd


def model_case(case, dtype, channels_last: bool, profile_name: str = "h200", fractions=(1.0, 0.5)) -> dict:
    """Per phase: bytes requested and what the L2 serves, with the recorded order (the apply
    passes' tile order as planned) and with the apply passes first to last, at each fraction of
    the L2."""
    from tritonorm import dispatch

    profile = dispatch.profile_named(profile_name)
    l2 = L2_BYTES.get(profile_name, 50 << 20)
    row = {"case": case.name, "dtype": str(dtype).replace("torch.", ""), "channels_last": channels_last}
    for phase, launches in zip(("fwd", "bwd"), record_call(case, dtype, channels_last, profile_name)):
        names = {la.name for la in launches}
        two = any(_two_sweep(la) for la in launches)
        if names and not two and names <= _ONE_SWEEP | _FUSED_ONCE | _IGNORED:
            row[phase] = {"modelled": False, "why": "one sweep", "kernels": sorted(names)}
            continue
        if not two or names - _MODELLED - _IGNORED:
            row[phase] = {"modelled": False, "why": "kernels not modelled", "kernels": sorted(names)}
            continue
        out = {"modelled": True, "kernels": [la.name for la in launches if la.name not in _IGNORED]}
        ideal = _ideal_bytes(launches)
        memo: dict = {}
        for frac in fractions:
            for label, rev in (("planned", None), ("forward_order", False)):
                if label == "forward_order" and frac != 1.0:
                    continue
                got = replay(launches, profile, int(l2 * frac), rev, memo)
                out[f"{label}@{frac:g}"] = {
                    "read_mib": round(got["reads"] / 2**20, 2), "l2_served_mib": round(got["hits"] / 2**20, 2),
                    "written_mib": round(got["writes"] / 2**20, 2),
                    "requested_x_ideal": round((got["reads"] + got["writes"]) / ideal, 3),
                    "hbm_x_ideal": round((got["reads"] - got["hits"] + got["writes"]) / ideal, 3)}
        out["ideal_mib"] = round(ideal / 2**20, 2)
        row[phase] = out
    return row


def _ideal_bytes(launches) -> int:
    """Each input read once, each output written once: the sizes of x, dy and y or dx as the
    modelled launches take them."""
    seen = {}
    for la in launches:
        if la.name in _IGNORED:
            continue
        for role in ("X", "DY", "Y", "DX"):
            t = la.args.get(role)
            if t is not None and t.kind == "tensor" and t.numel > 1:
                seen[role] = max(seen.get(role, 0), t.numel * _tensor_bytes(t))
    return max(1, sum(seen.values()))


def hbm_ratio(cost: dict, l2_phase: dict | None, l2_bytes: int) -> tuple[float, str]:
    """(HBM bytes over the ideal, how it was counted) of one call, from its cost-model row
    (bench/model.py: bytes read and written, the ideal's) and its replay (or None):
    - "replay": the cost model's bytes less what the replay says the L2 serves of the re-read;
    - "resident": when everything the call touches (its inputs once and every byte it writes,
      the partials' included) fits in half the L2, what it re-reads is served: its inputs once
      and its writes (written back once) are what HBM moves. The replay says as much of every
      re-read it covers at that size, and it does not cover the fp32 partials' re-reads;
    - "requested": neither applies; the cost model's bytes."""
    ratio, how = cost["bytes"] / max(1, cost["ideal"]), "requested"
    if l2_phase is not None and l2_phase.get("modelled"):
        ratio, how = (cost["bytes"] - l2_phase["planned@1"]["l2_served_mib"] * 2**20) / max(1, cost["ideal"]), "replay"
    footprint = cost["ideal"] + cost["written"] - cost["ideal_written"]
    if 2 * footprint <= l2_bytes:
        resident = (cost["ideal_read"] + cost["written"]) / max(1, cost["ideal"])
        if resident < ratio:
            ratio, how = resident, "resident"
    return ratio, how


def counted(l2_rows: list, model_rows: list, l2_bytes: int) -> dict:
    """Per op ("forward", "backward"): how many cases are within #10's targets (bench/model.py's
    TARGET) in HBM bytes as hbm_ratio counts them, and those over (case, ratio, how)."""
    from tritonorm.bench.model import TARGET

    by_case = {r["case"]: r for r in l2_rows}
    out = {}
    for op, phase in (("forward", "fwd"), ("backward", "bwd")):
        over, how_n = [], {}
        for m in model_rows:
            ratio, how = hbm_ratio(m[op], by_case.get(m["case"], {}).get(phase), l2_bytes)
            how_n[how] = how_n.get(how, 0) + 1
            if ratio > TARGET[op] + 1e-9:
                over.append((m["case"], round(ratio, 2), how))
        out[op] = {"target": TARGET[op], "cases": len(model_rows), "within": len(model_rows) - len(over),
                   "over": over, "counted_by": how_n}
    return out


def report(case_list, device: str = "h200", two_sweep: bool = False, json_path=None, progress: bool = True) -> list:
    """Model ``case_list`` (bf16, each case's own layout), print the table, write the JSON; the
    rows. ``python -m tritonorm.bench.l2`` and ``tritonorm bench --l2`` call this."""
    import torch

    from tritonorm.bench.progress import progress_bar
    from tritonorm.bench.table import format_table

    rows, table = [], []
    bar = progress_bar(len(case_list), "l2 model", "case", progress)
    for case in case_list:
        if bar is not None:
            bar.set_postfix_str(case.name)
        row = model_case(case, torch.bfloat16, case.channels_last, device)
        if bar is not None:
            bar.update()
        rows.append(row)
        for phase in ("fwd", "bwd"):
            r = row[phase]
            if not r["modelled"]:
                if not two_sweep or r["why"] != "one sweep":
                    table.append((case.name, phase, f"{r['why']}: " + ",".join(_short(k) for k in r["kernels"]),
                                  "", "", "", ""))
                continue
            p1, f1, p5 = r["planned@1"], r["forward_order@1"], r["planned@0.5"]
            table.append((case.name, phase, "+".join(_short(k) for k in r["kernels"]), f"{r['ideal_mib']:.1f}",
                          f"{p1['requested_x_ideal']:.2f}", f"{p1['hbm_x_ideal']:.2f} / {p5['hbm_x_ideal']:.2f}",
                          f"{f1['hbm_x_ideal']:.2f}"))
    if bar is not None:
        bar.close()
    print(f"L2 model ({device}: LRU of {L2_BYTES[device] >> 20} MiB in {BLOCK}-byte units, hits by "
          f"{SECTOR}-byte sector, programs on dispatch._fill slots, one call from cold; bf16; a model, "
          "not a measurement)")
    print(format_table(("case", "call", "kernels", "ideal MiB", "requested x ideal",
                        "HBM x ideal, as planned (L2 / half L2)", "HBM x ideal, applies first-to-last (L2)"), table))
    # Every case against #10's targets in HBM bytes: the cost model's bytes, less what the
    # replay serves, or a call resident in the L2 (hbm_ratio).
    from tritonorm.bench import model

    count = counted(rows, [model.report(c, torch.bfloat16, device) for c in case_list], L2_BYTES[device])
    for op, c in count.items():
        ways = ", ".join(f"{n} by {how}" for how, n in sorted(c["counted_by"].items()))
        line = f"{op}: {c['within']} of {c['cases']} within {c['target']}x the ideal in HBM bytes ({ways})"
        if c["over"]:
            line += "; over: " + ", ".join(f"{name} {r:.2f}x" for name, r, _ in c["over"])
        print(line)
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump({"device": device, "block": BLOCK, "sector": SECTOR, "l2_bytes": L2_BYTES[device],
                       "note": "a model, not a measurement (tritonorm/bench/l2.py)", "rows": rows,
                       "counted": count}, f, indent=1)
    return rows


def _short(kernel: str) -> str:
    return kernel.strip("_").replace("_kernel", "")


def main(argv=None) -> int:
    from tritonorm.bench.shapes import select

    ap = argparse.ArgumentParser(prog="python -m tritonorm.bench.l2", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="h200", choices=sorted(L2_BYTES), help="profile to plan for")
    ap.add_argument("--suite", default="all", help="suite name or all")
    ap.add_argument("--filter", default=None, help="only cases whose name contains this")
    ap.add_argument("--two-sweep", action="store_true", help="leave out the calls that read x once")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    chosen = select(args.suite, args.filter)
    if not chosen:
        ap.error(f"--filter: no case of suite {args.suite!r} matches {args.filter!r}")
    report(chosen, args.device, args.two_sweep, args.json, not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
