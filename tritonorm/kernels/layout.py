"""Strided views: any scope of any layout as a (rows x cols) problem, without copies.

A kernel sees two *sides*: the rows (one per statistic in the statistic view) and the columns
(the elements one statistic is taken over). Each side is up to four dims, the last fastest,
and every dim carries three strides: into x, into the outputs (y, and dy/dx/residual, which share
y's strides) and into the per-statistic tensors (mean, rstd). The channel (for weight and bias) is
one "digit" of each side's flat index, ``(idx // div) % mod * mul``. An element's offset in any
tensor is the sum of a row part and a column part, so a kernel computes offsets once per row and
once per column.

Building the view: the logical axes [S,] N, G, Cg, *spatial are split into the two sides, size-1 axes
are dropped, each side is sorted by x's strides (largest first) and adjacent axes are merged
wherever every stride set allows it (as TensorIterator coalesces). Merging is what makes the
common cases 1-D: LayerNorm rows, contiguous GroupNorm groups (channels x positions), channels_last
channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..scope import Spec

MAX_DIMS = 4
_I32_MAX = 2**31 - 1

# stride sets per axis: (x, out, stat); an axis tuple is (size, x, out, stat, channel coefficient)
_SETS = 3


class TooManyDims(Exception):
    """A side needs more than MAX_DIMS dims after merging. Dense layouts never do (at most four:
    e.g. N, G, D, W kept apart by the channel and statistic strides); irregular strides can,
    and the launcher then copies x into a dense layout."""


@dataclass(frozen=True)
class Side:
    numel: int
    sizes: tuple[int, ...]                 # MAX_DIMS sizes; only sizes[1:] enter the index split
    strides: tuple[tuple[int, ...], ...]   # per set (x, out, stat): MAX_DIMS strides
    chan: tuple[int, int, int] = (1, 1, 0)  # channel index = (idx // div) % mod * mul

    @property
    def geometry(self) -> tuple[int, ...]:
        """The kernels' geometry tuple (common.side_offsets): s1, s2, s3, the four strides of each
        set, then the channel digit's div, mod, mul. One tuple argument binds far faster than 18
        scalar ones, and Triton still specializes its 1s and multiples of 16."""
        out = list(self.sizes[1:])
        for st in self.strides:
            out.extend(st)
        out.extend(self.chan)
        return tuple(out)

    def max_offset(self, k: int) -> int:
        return sum((s - 1) * abs(st) for s, st in zip(self.sizes, self.strides[k]))


@dataclass(frozen=True)
class View:
    rows: Side
    cols: Side
    int64: bool

    @property
    def P(self) -> int:
        return self.rows.numel

    @property
    def M(self) -> int:
        return self.cols.numel

    def geometry(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.rows.geometry, self.cols.geometry


def _channel_digit(axes: list[tuple[int, ...]]) -> tuple[int, int, int]:
    """(div, mod, mul) with channel = (flat index // div) % mod * mul over the sorted axes.

    A side holds at most one channel-bearing axis (G or Cg), or both G and Cg in that order
    (the channel view), whose joint index is the channel itself. Computing the channel from the
    flat index rather than as a stride set lets the other axes merge across it.
    """
    idx = [i for i, a in enumerate(axes) if a[4] != 0]
    if not idx:
        return (1, 1, 0)
    if len(idx) == 2 and idx[1] == idx[0] + 1 and axes[idx[0]][4] == axes[idx[1]][0] * axes[idx[1]][4]:
        first, last = idx
        mod = axes[first][0] * axes[last][0]
    elif len(idx) == 1:
        first = last = idx[0]
        mod = axes[first][0]
    else:
        raise TooManyDims(len(axes))
    div = 1
    for a in axes[last + 1:]:
        div *= a[0]
    return (div, mod, axes[last][4])


def _coalesce(axes: list[tuple[int, ...]], keep_order: bool = False) -> Side:
    """``keep_order``: the axes stay in the given order (outermost first) instead of being sorted
    by x's strides, so the flat index is that order's (sample_segments' channel-major rows)."""
    axes = [a for a in axes if a[0] != 1]
    if not keep_order:
        axes.sort(key=lambda a: (abs(a[1]), abs(a[2])), reverse=True)
    chan = _channel_digit(axes)
    merged: list[list[int]] = []
    for a in axes:
        if merged:
            prev = merged[-1]
            if all(prev[1 + k] == a[1 + k] * a[0] for k in range(_SETS)):
                prev[0] *= a[0]
                for k in range(_SETS):
                    prev[1 + k] = a[1 + k]
                continue
        merged.append(list(a[: 1 + _SETS]))
    if len(merged) > MAX_DIMS:
        raise TooManyDims(len(merged))
    numel = 1
    for a in merged:
        numel *= a[0]
    while len(merged) < MAX_DIMS:
        merged.append([1] + [0] * _SETS)  # padding at the fast end: the index math folds away
    sizes = tuple(a[0] for a in merged)
    strides = tuple(tuple(a[1 + k] for a in merged) for k in range(_SETS))
    return Side(numel=numel, sizes=sizes, strides=strides, chan=chan)


def _logical(shape, spec: Spec, x_strides, out_strides) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, (size, x, out, stat, chan), reduced) for the logical axes [S,] N, G, Cg, *spatial.

    Groups of samples are to N what channel groups are to C: S strides over whole groups of
    N/S samples (x's batch stride times N/S), N over the samples within one.
    """
    g = spec.num_groups
    cg = shape[1] // g
    ns = shape[0] // spec.sample_groups
    names, sizes, xs, os_, chans, reds = [], [], [], [], [], []
    for name, size, red in spec.logical_axes(shape):
        if name == "S":
            xs.append(x_strides[0] * ns); os_.append(out_strides[0] * ns); chans.append(0)
        elif name == "N":
            xs.append(x_strides[0]); os_.append(out_strides[0]); chans.append(0)
        elif name == "G":
            xs.append(x_strides[1] * cg); os_.append(out_strides[1] * cg); chans.append(cg)
        elif name == "Cg":
            xs.append(x_strides[1]); os_.append(out_strides[1]); chans.append(1)
        else:
            d = 2 + spec.spatial.index(name)
            xs.append(x_strides[d]); os_.append(out_strides[d]); chans.append(0)
        names.append(name); sizes.append(size); reds.append(red)
    # Per-statistic tensors are contiguous over the kept axes in logical order.
    stats = [0] * len(sizes)
    acc = 1
    for i in reversed(range(len(sizes))):
        if not reds[i]:
            stats[i] = acc
            acc *= sizes[i]
    return [(names[i], (sizes[i], xs[i], os_[i], stats[i], chans[i]), reds[i]) for i in range(len(sizes))]


def _finish(rows: Side, cols: Side, extra: int = 0) -> View:
    big = max(rows.max_offset(k) + cols.max_offset(k) for k in range(_SETS))
    big = max(big, rows.numel * max(cols.numel, 1), extra)
    return View(rows=rows, cols=cols, int64=big > _I32_MAX)


def stat_view(shape, spec: Spec, x_strides, out_strides) -> View:
    """Rows: one per statistic (kept axes); cols: the reduced axes."""
    axes = _logical(shape, spec, x_strides, out_strides)
    rows = _coalesce([a for _, a, red in axes if not red])
    cols = _coalesce([a for _, a, red in axes if red])
    return _finish(rows, cols)


def channel_view(shape, spec: Spec, x_strides, out_strides) -> View:
    """Rows: one per channel (G and Cg); cols: N and the spatial axes. For dweight/dbias."""
    axes = _logical(shape, spec, x_strides, out_strides)
    rows = _coalesce([a for name, a, _ in axes if name in ("G", "Cg")])
    cols = _coalesce([a for name, a, _ in axes if name not in ("G", "Cg")])
    return _finish(rows, cols)


def channel_per_row(spec: Spec) -> bool:
    """Each statistic is one channel (BatchNorm's scope, without sample groups): the dx kernels'
    row sums are dweight and dbias."""
    return spec.allows_running_stats and not spec.reduces_c and spec.sample_groups == 1


def channel_per_col(view: View, channels: int) -> bool:
    """Each column of the statistic view is one channel (LayerNorm rows, positional scope)."""
    return view.cols.chan == (1, view.M, 1) and view.M == channels


def sample_rows(view: View, shape) -> bool:
    """Whether adaLN's per-(sample, column) weight/bias can be read in place on this statistic
    view of a norm over x's last axis (common.param_offsets, PARAM_NC == 2): the rows in logical
    (sample, position) order — the rows' statistic offset is the row itself, so row r is sample
    r // (P / N) — and the columns the last axis with unit output stride (column d's output
    offset is d). The grid's second axis holds the samples."""
    N, M = shape[0], view.M
    if N > 65535 or M != shape[-1] or view.P % N:
        return False
    rows = view.rows
    for i, (size, st) in enumerate(zip(rows.sizes, rows.strides[2])):
        if size > 1 and st != math.prod(rows.sizes[i + 1:]):
            return False
    cols = view.cols
    return M <= 1 or (all(sz == 1 for sz in cols.sizes[1:]) and cols.strides[1][0] == 1)


def alloc_out(x: torch.Tensor) -> torch.Tensor:
    """An output like x: same strides when x is dense, else dense in x's stride order."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def match_strides(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s strides (a copy only when they differ)."""
    if all(a == b or n == 1 for a, b, n in zip(t.stride(), like.stride(), like.shape)):
        return t
    out = torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


# --- Per-(sample, channel) segments: GroupNorm/InstanceNorm dweight/dbias in the dx pass --------

# A segment shorter than this keeps the channel-view sweep: its fp32 partials (16 bytes per
# segment and split) would outweigh re-reading it (LayerNorm rows over C alone: one element).
MIN_SEGMENT = 2


@dataclass(frozen=True)
class Segments:
    """How a statistic's columns split into per-channel segments (channel digit j, position h).

    Each statistic row r spans ``hm`` channels of ``H`` elements each; segment ``r*hm + j`` is
    sample n, channel c with ``r*hm + j == n*C + c`` (checked), so fp32 partials laid out
    [.., N*C] sum to dweight/dbias over N (``batch_segments``: sample group s, channel c,
    segment s*C + c, summed over the S groups; in general over ``view.P // C`` blocks).
    ``order``: how a column index splits in the statistic
    view, 1: col = j*H + h (NCHW; InstanceNorm), 2: col = h*hm + j (channels_last GroupNorm),
    3: as 1 with the columns side exactly the digits (j, h) (conditional BatchNorm, NCHW),
    0: neither (no fused factorization; the segment view still serves the two-stage regimes).
    """

    hm: int
    H: int
    order: int
    view: View | None = None   # rows: the N*C segments; cols: their H positions

    @property
    def fused_cols(self) -> int:
        """Columns of the fused (channel, position) tile: pow2(hm) * pow2(H)."""
        return _p2(self.hm) * _p2(self.H) if self.order else 0


def _p2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


def segment_view(shape, spec: Spec, x_strides, out_strides) -> View:
    """Rows: one per sample and channel; cols: the reduced axes other than C. Built as the
    InstanceNorm view of the same axes, so the channels merge into one unit-stride side for
    channels_last; its statistic offset is the segment's own (n*C + c): kernels divide it by hm
    to find the statistic (``Segments`` checks that this holds)."""
    letters = "".join(ch for ch in spec.letters if ch != "C")
    return stat_view(shape, replace(spec, letters=letters, num_groups=1), x_strides, out_strides)


def segments(view: View, shape, spec: Spec, x_strides, out_strides) -> Segments | None:
    """The segments of a statistic view whose rows are (sample, channel group) in that order and
    whose columns are (channel in group, position) — dense GroupNorm and InstanceNorm, and
    LayerNorm over (C, *spatial) — else None (sample groups, kept spatial axes, odd strides)."""
    if len(shape) < 3 or spec.sample_groups != 1 or spec.reduces_n:
        return None
    N, C = shape[0], shape[1]
    P, M = view.P, view.M
    if P * M == 0 or (N * C) % P:
        return None
    hm = N * C // P
    H = M // hm if M % hm == 0 else 0
    if H < MIN_SEGMENT:
        return None
    groups = C // hm
    # Stat row r = n*G + g (the group digit fastest) and the columns' channel digit spans hm.
    order = _segment_order(view, groups, hm, M)
    if order is None:
        return None
    try:
        sview = segment_view(shape, spec, x_strides, out_strides)
    except TooManyDims:
        return None
    # Segment row s = n*C + c: the channel digit fastest over all C channels.
    if sview.P != N * C or sview.M != H or sview.rows.chan != ((1, C, 1) if C > 1 else (1, 1, 0)):
        return None
    return Segments(hm=hm, H=H, order=order, view=sview)


def _segment_order(view: View, groups: int, hm: int, M: int) -> int | None:
    """The fused tile order of segments of hm channels (Segments.order), or None when the view's
    digits do not give them: statistic rows must have the group digit fastest (r = n*G + g) and
    the columns' channel digit must span hm channels with unit multiplier."""
    if view.rows.chan != ((1, groups, hm) if groups > 1 else (1, 1, 0)):
        return None
    div, mod, mul = view.cols.chan
    if hm > 1 and (mod != hm or mul != 1):
        return None
    return 1 if (hm == 1 or div * hm == M) else (2 if div == 1 else 0)


def batch_segments(view: View, shape, spec: Spec, x_strides, out_strides) -> Segments | None:
    """The (sample group s, channel c) segments of a scope over N and every spatial axis, other
    than plain BatchNorm's (whose rows are channels): Ghost BatchNorm (sample groups S > 1) and
    batch_group (channel groups, any S). Statistic row r = s*G + g spans hm = C/G channels
    (1 without channel groups: the segment view is then the statistic view itself), segment
    s*C + c, so dweight/dbias partials [2, S, C] are added over the S groups as GroupNorm's are
    over N. Checked: the rows' channel digit is their fastest (rows s*G + g) and the segment
    view's rows are s*C + c; else None (x with C outside N in memory: the channel-view sweep)."""
    if not spec.allows_running_stats:
        return None
    S, C = spec.sample_groups, shape[1]
    G = spec.num_groups if spec.reduces_c else C
    hm = C // G
    P, M = view.P, view.M
    if (S == 1 and hm == 1) or P != S * G or P * M == 0 or M % hm or M // hm < MIN_SEGMENT:
        return None
    order = _segment_order(view, G, hm, M)
    if order is None:
        return None
    try:
        sview = view if hm == 1 else segment_view(shape, spec, x_strides, out_strides)
    except TooManyDims:
        return None
    if sview.P != S * C or sview.M != M // hm or sview.rows.chan != ((1, C, 1) if C > 1 else (1, 1, 0)):
        return None
    return Segments(hm=hm, H=M // hm, order=order, view=sview)


def sample_segments(view: View, shape, spec: Spec, x_strides, out_strides) -> Segments | None:
    """Conditional BatchNorm's segments: plain BatchNorm (each statistic row one channel c, its
    columns N * H: every sample's H spatial positions) with a per-(sample, channel) weight/bias.
    Segment (c, n) is sample n's run of channel c. Needed, and checked: the columns' flat index is
    n*H + h (N the outermost reduced axis of x, so the (j, h) tile of ORDER 1 with hm = N splits
    it), and N the outermost axis of the output (out_strides[0] == C*H: the sample of any output
    offset o is o // out_strides[0], which common.param_offsets' PARAM_NC == 3 reads).

    The segment view (for the looped/split sums kernel) is built by hand: rows n*C + c in that
    order (channels_last: unit-stride rows, so its tiles load 16 bytes along them) whose
    statistic offset is the channel c itself (stat strides 0 and 1: statistic = offset // 1),
    columns the spatial axes. Its [4, N*C, split] partials are sample-major, so the apply
    kernel reads a channel's N*split of them strided (PART_N); the fused pass stores its
    per-row (channel) sums at n*C + c (SEG_T). Else None (sample groups, channel groups, x or
    the output with N inside another axis)."""
    if len(shape) < 3 or not channel_per_row(spec) or spec.reduces_c:
        return None
    N, C = shape[0], shape[1]
    H = math.prod(shape[2:])
    if N * C * H == 0 or view.P != C or view.M != N * H or out_strides[0] != C * H:
        return None
    if view.rows.chan != ((1, C, 1) if C > 1 else (1, 1, 0)):
        return None
    if N > 1 and any(s > 1 and abs(x_strides[d]) >= abs(x_strides[0])
                     for d, s in enumerate(shape[2:], start=2)):
        return None  # a spatial axis outside N in x: the columns' flat index is not n*H + h
    rows = [(N, x_strides[0], out_strides[0], 0, 0), (C, x_strides[1], out_strides[1], 1, 1)]
    cols = [(shape[d], x_strides[d], out_strides[d], 0, 0) for d in range(2, len(shape))]
    try:
        sview = _finish(_coalesce(rows, keep_order=True), _coalesce(cols))
    except TooManyDims:
        return None
    # Order 3 (the fused tile's offsets straight from (n, h)) when the columns side is exactly
    # (N, H): NCHW-like x, whose spatial run does not merge with N.
    two = N > 1 and H > 1 and view.cols.sizes == (N, H, 1, 1)
    return Segments(hm=N, H=H, order=3 if two else 1, view=sview)
