"""Triton helpers shared by the forward and backward kernels (jit functions only).

Index convention (see layout.py): a side's flat index ``idx`` splits as
``idx = ((i0 * s1 + i1) * s2 + i2) * s3 + i3``; an offset into a tensor is
``i0*st0 + i1*st1 + i2*st2 + i3*st3`` with that tensor's strides, and the channel is
``(idx // hd) % hm * hk``. Padded dims have size 1, which Triton specializes, so the splits fold away
for 1-D sides.
"""

import triton
import triton.language as tl


@triton.jit
def side_offsets(idx, G):
    """Offsets of flat side indices into x, the outputs and the statistics, and their channel.

    ``G`` is a side's geometry tuple (layout.Side.geometry): s1, s2, s3, the four x strides, the
    four output strides, the four statistic strides, then the channel digit (div, mod, mul).
    Sizes and strides equal to 1 are specialized by Triton, so a merged 1-D side folds to
    ``idx * stride``.
    """
    s1, s2, s3, x0, x1, x2, x3, o0, o1, o2, o3, t0, t1, t2, t3, hd, hm, hk = G
    i3 = idx % s3
    q = idx // s3
    i2 = q % s2
    q = q // s2
    i1 = q % s1
    i0 = q // s1
    x = i0 * x0 + i1 * x1 + i2 * x2 + i3 * x3
    o = i0 * o0 + i1 * o1 + i2 * o2 + i3 * o3
    t = i0 * t0 + i1 * t1 + i2 * t2 + i3 * t3
    h = (idx // hd) % hm * hk
    return x, o, t, h


@triton.jit
def row_block(pid, P, BLOCK_P: tl.constexpr, INT64: tl.constexpr, RG):
    """Rows pid*BLOCK_P ... of the view: (rows, rmask, x, out, stat offsets, channel)."""
    if INT64:
        pid = tl.cast(pid, tl.int64)  # the persistent loop hands a plain int in the interpreter
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = rows < P
    rx, ro, rt, rh = side_offsets(rows, RG)
    return rows, rmask, rx, ro, rt, rh


@triton.jit
def col_tile(start, limit, rmask, BLOCK_M: tl.constexpr, INT64: tl.constexpr, CG):
    """Columns start ... start+BLOCK_M (masked at ``limit``): (cmask, tile mask, offsets, channel)."""
    cols = tl.arange(0, BLOCK_M)
    if INT64:
        cols = cols.to(tl.int64)
    cols = cols + start
    cmask = cols < limit
    mask = rmask[:, None] & cmask[None, :]
    cx, co, ct, ch = side_offsets(cols, CG)
    return cmask, mask, cx, co, ct, ch


@triton.jit
def strided_tiles(TILE_STEP, FIRST_TILE, BLOCK_M: tl.constexpr, INT64: tl.constexpr):
    """(first column, step) of program pid1's column tiles: |FIRST_TILE - pid1|, then every
    TILE_STEP tiles (one past the last tile starts at M or later, masked off). The launchers
    pass FIRST_TILE 0 and TILE_STEP = the column programs (tiles pid1, pid1 + programs, ...), or,
    for an apply pass that follows a sweep of the same data in the same call
    (dispatch.APPLY_REVERSE), FIRST_TILE = programs * tiles - 1 and a negative TILE_STEP: the
    same tiles last to first. The programs, which run in about the order of their ids, then
    first re-read what that sweep read last, which is what the L2 still holds (in the sweep's
    order they would first ask for what it read first, which it evicted first). Host ints, not
    a constexpr: one compiled variant serves both orders."""
    t = tl.abs(FIRST_TILE - tl.program_id(1))
    step = t * 0 + TILE_STEP  # in t's integer type, so that the int64 cast covers both
    if INT64:
        t = t.to(tl.int64)
        step = step.to(tl.int64)
    return t * BLOCK_M, step * BLOCK_M


@triton.jit
def store_stats(Stats, P, rt, rmask, k, mean_shifted, var, eps, RunMean, RunVar, momentum, unbias,
                RUNNING: tl.constexpr, LEAN: tl.constexpr = 0):
    """Store a row block's statistics into the [5, P] fp32 buffer (pivot, shifted mean, rstd,
    variance, mean) and, with RUNNING (1: running_var only, 2: running_mean too), blend them into
    the running statistics in fp32 and round once to the buffers' dtype (PyTorch's rule:
    r <- (1 - momentum) r + momentum batch, with the variance times ``unbias`` = M / (M - 1)).
    Each row belongs to one program, so the read-modify-write is race-free. Returns rstd.

    LEAN (a training call whose statistics only its backward reads, see ``load_stats``): the
    buffer is [LEAN, P], rstd (and with LEAN = 2, centring, the shifted mean): what eager
    PyTorch saves per statistic, no more."""
    rstd = tl.rsqrt(var + eps)
    mean = k + mean_shifted
    if LEAN == 0:
        tl.store(Stats + rt, k, mask=rmask)
        tl.store(Stats + P + rt, mean_shifted, mask=rmask)
        tl.store(Stats + 2 * P + rt, rstd, mask=rmask)
        tl.store(Stats + 3 * P + rt, var, mask=rmask)
        tl.store(Stats + 4 * P + rt, mean, mask=rmask)
    else:
        tl.store(Stats + rt, rstd, mask=rmask)
        if LEAN == 2:
            tl.store(Stats + P + rt, mean_shifted, mask=rmask)
    if RUNNING >= 1:
        rv = tl.load(RunVar + rt, mask=rmask, other=0.0).to(tl.float32)
        rv = (1.0 - momentum) * rv + momentum * (var * unbias)
        tl.store(RunVar + rt, rv.to(RunVar.dtype.element_ty), mask=rmask)
    if RUNNING == 2:
        rm = tl.load(RunMean + rt, mask=rmask, other=0.0).to(tl.float32)
        rm = (1.0 - momentum) * rm + momentum * mean
        tl.store(RunMean + rt, rm.to(RunMean.dtype.element_ty), mask=rmask)
    return rstd


@triton.jit
def load_stats(Stats, P, rt, rmask, X, rx, LEAN: tl.constexpr = 0):
    """A row block's pivot, shifted mean and rstd from the [5, P] statistics buffer; LEAN
    (``store_stats``) from the [LEAN, P] one, the pivot read again from the row's first element
    of x (the same rule as ``pivot_input``: rows of the plain row view, whose column 0 has
    offset 0; the backward's x is the forward's normalized input, h for add_norm)."""
    if LEAN == 0:
        k = tl.load(Stats + rt, mask=rmask, other=0.0)
        mean = tl.load(Stats + P + rt, mask=rmask, other=0.0)
        rstd = tl.load(Stats + 2 * P + rt, mask=rmask, other=0.0)
    else:
        rstd = tl.load(Stats + rt, mask=rmask, other=0.0)
        if LEAN == 2:
            k = finite_pivot(tl.load(X + rx, mask=rmask, other=0.0).to(tl.float32))
            mean = tl.load(Stats + P + rt, mask=rmask, other=0.0)
        else:
            k = tl.zeros_like(rstd)
            mean = tl.zeros_like(rstd)
    return k, mean, rstd


@triton.jit
def tile_grads(X, DY, Res, offs, mask, k, mean, rstd, w, b, HAS_RES: tl.constexpr, ACT: tl.constexpr,
               EV: tl.constexpr):
    """xhat and gz = dy * act'(pre) of a tile at ``offs`` whose columns are channels (the
    whole-pixel and plane kernels), from per-column pivot, shifted mean, rstd, weight and bias
    vectors; 0 where masked. ``EV``: the loads' eviction policy (see load2d)."""
    x = tl.load(X + offs, mask=mask, other=0.0, eviction_policy=EV).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0, eviction_policy=EV).to(tl.float32)
    xhat = tl.where(mask, ((x - k[None, :]) - mean[None, :]) * rstd[None, :], 0.0)
    gz = dy
    if ACT != 0:
        pre = xhat * w[None, :] + b[None, :]
        if HAS_RES:
            pre = pre + tl.load(Res + offs, mask=mask, other=0.0, eviction_policy=EV).to(tl.float32)
        gz = tl.where(mask, dy * activation_grad(pre, ACT), 0.0)
    return xhat, gz


@triton.jit
def load2d(Ptr, roff, coff, mask, EV: tl.constexpr):
    """A [rows, cols] tile upcast to fp32 (0 where masked). ``EV``: the eviction policy, "" or
    "evict_first" for a pass whose data is not read again (dispatch.second_pass_policy)."""
    return tl.load(Ptr + (roff[:, None] + coff[None, :]), mask=mask, other=0.0, eviction_policy=EV).to(tl.float32)


@triton.jit
def load_residual(Res, ro, co, mask, HAS_RES: tl.constexpr, EV: tl.constexpr):
    res = 0.0
    if HAS_RES:
        res = load2d(Res, ro, co, mask, EV)
    return res


@triton.jit
def store2d(Ptr, roff, coff, value, mask, EV: tl.constexpr):
    """Store a tile in the pointer's dtype (``EV``: as load2d's)."""
    tl.store(Ptr + (roff[:, None] + coff[None, :]), value.to(Ptr.dtype.element_ty), mask=mask, eviction_policy=EV)


@triton.jit
def sigmoid(z):
    # Relative accuracy everywhere: 1 + e^{-z} does not cancel; saturates to 0 (z -> -inf) and 1.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def tanh(z):
    """tanh accurate to ~2 ulp relative everywhere, saturating cleanly, NaN in -> NaN out.

    1 - 2/(e^{2z}+1) saturates to +-1 (e^{2z} -> inf or 0) but cancels near 0 (tanh(1e-20)
    would be 0); below |z| = 0.625 an odd polynomial z + z^3 P(z^2) takes over (a least-squares
    fit of (tanh(z)/z - 1)/z^2 on Chebyshev nodes of [0, 0.625], max relative error 8e-8 in fp32).
    Both sides are computed and one is selected: no branch, a handful of FMAs more.
    """
    s = z * z
    p = -0.0057189627550542355
    p = p * s + 0.020653124898672104
    p = p * s - 0.05374465882778168
    p = p * s + 0.13331513106822968
    p = p * s - 0.3333328664302826
    small = z + z * s * p
    large = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    return tl.where(tl.abs(z) < 0.625, small, large)


@triton.jit
def activation(z, ACT: tl.constexpr):
    """act(z) for the activation codes of tritonorm.activations (0 = identity).

    NaN and +-inf give what torch's own activation gives on the same z (e.g. relu(NaN) = NaN,
    silu(-inf) = NaN): comparisons are written so that NaN falls on the side that keeps z.
    """
    out = z
    if ACT == 1:
        out = tl.where(z < 0.0, 0.0, z)  # not max(z, 0): fmaxf drops NaN, torch's relu keeps it
    elif ACT == 2:
        out = tl.where(z > 0, z, 0.01 * z)
    elif ACT == 3:
        out = z * sigmoid(z)
    elif ACT == 4:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 5:
        # 0.5 (1 + tanh(u)) = sigmoid(2u): no cancellation of 1 + tanh(u) for z < 0
        out = z * sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    elif ACT == 6:
        out = sigmoid(z)
    elif ACT == 7:
        out = tanh(z)
    return out


@triton.jit
def _sigmoid_and_complement(z):
    """(sigmoid(z), 1 - sigmoid(z)), the complement without cancellation: for z >= 0 it is
    e^{-z} * sigmoid(z) (1 - s would round to 0 once s rounds to 1)."""
    e = tl.exp(-z)
    s = 1.0 / (1.0 + e)
    return s, tl.where(z < 0.0, 1.0 - s, e * s)


@triton.jit
def activation_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, matching torch's autograd at NaN and +-inf: relu'(NaN) = 1 and
    leaky_relu'(NaN) = 0.01 (torch's backward tests z <= 0 and z > 0 respectively), and NaN
    where torch's formula meets inf * 0 (silu, gelu and gelu_tanh at +-inf)."""
    out = tl.full(z.shape, 1.0, tl.float32)  # the identity's, also at NaN/inf (not z * 0 + 1)
    if ACT == 1:
        out = tl.where(z <= 0.0, 0.0, 1.0)
    elif ACT == 2:
        out = tl.where(z > 0, 1.0, 0.01)
    elif ACT == 3:
        s, c = _sigmoid_and_complement(z)
        out = s * (1.0 + z * c)
    elif ACT == 4:
        out = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 5:
        # d/dz z sigmoid(2u) with u = k (z + 0.044715 z^3): s (1 + 2 z (1 - s) u')
        s, c = _sigmoid_and_complement(1.5957691216057308 * (z + 0.044715 * z * z * z))
        out = s * (1.0 + z * c * (1.5957691216057308 + 0.21406444881780076 * z * z))
    elif ACT == 6:
        s, c = _sigmoid_and_complement(z)
        out = s * c
    elif ACT == 7:
        t = tanh(z)
        out = 1.0 - t * t
    return out


@triton.jit
def tile_moments(x, mask, n, CENTER: tl.constexpr, AXIS: tl.constexpr = 1):
    """Per-row (mean, M2) of a [rows, cols] tile over its ``n`` valid columns (x is 0 where masked);
    ``AXIS=0``: per column, over ``n`` valid rows (the whole-pixel and plane kernels).

    Two passes over registers (mean, then squared deviations): exact, no E[x^2]-E[x]^2.
    Without centering the mean is 0 (not 0 * M2: an inf M2 must not make it NaN) and M2 is the
    sum of squares.
    """
    if CENTER:
        mean = tl.sum(x, axis=AXIS) / n
        d = tl.where(mask, x - tl.expand_dims(mean, AXIS), 0.0)
        m2 = tl.sum(d * d, axis=AXIS)
    else:
        m2 = tl.sum(x * x, axis=AXIS)
        mean = tl.zeros_like(m2)
    return mean, m2


@triton.jit
def finite_pivot(k):
    """A pivot that is not finite becomes 0: x - inf would turn every deviation into +-inf or
    NaN, where the exact mean is +-inf (running statistics need it)."""
    return tl.where(k - k == 0.0, k, 0.0)  # k - k is NaN exactly when k is +-inf or NaN


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) partials; returns (mean, M2).

    The counts are scalars known from the tile geometry, so they are not carried. The mean is
    the weighted average (1 - f) mean_a + f mean_b, not mean_a + f (mean_b - mean_a): the latter
    is inf - inf = NaN when one partial's mean is +-inf and the other's finite, where the exact
    mean is +-inf.
    """
    frac = n_b / tl.maximum(n_a + n_b, 1.0)  # an empty tile (n_b = 0) leaves the partial as is
    delta = mean_b - mean_a
    mean = mean_a * (1.0 - frac) + mean_b * frac
    m2 = m2_a + m2_b + delta * (delta * (n_a * frac))  # not delta^2 * 0 = NaN when delta^2 overflows
    return mean, m2


@triton.jit
def load_channel(W, rh, ch, rmask, cmask, CHAN: tl.constexpr):
    """Per-channel values for a [rows, cols] tile, loaded once per side when the channel depends
    on one side only (CHAN: 0 both sides, 1 columns only, 2 rows only, 3 neither)."""
    if CHAN == 1:
        v = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
    elif CHAN == 2:
        v = tl.load(W + rh, mask=rmask, other=0.0).to(tl.float32)[:, None]
    elif CHAN == 3:
        v = tl.load(W + rh * 0, mask=rmask, other=0.0).to(tl.float32)[:, None]
    else:
        v = tl.load(W + (rh[:, None] + ch[None, :]), mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
    return v


@triton.jit
def epilogue(xhat, rh, ch, bh, bc, rmask, cmask, res, W, B, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
             HAS_RES: tl.constexpr, ACT: tl.constexpr, CHAN: tl.constexpr):
    """act(w_c * xhat + b_c + residual), in fp32. (rh, ch): the weight's row and column offsets,
    (bh, bc) the bias's (the same but for per-(sample, channel) parameters: param_offsets)."""
    z = xhat
    if HAS_W:
        z = z * load_channel(W, rh, ch, rmask, cmask, CHAN)
    if HAS_B:
        z = z + load_channel(B, bh, bc, rmask, cmask, CHAN)
    if HAS_RES:
        z = z + res
    return activation(z, ACT)


@triton.jit
def grad_terms(x, dy, mean, rstd, rh, ch, bh, bc, rmask, cmask, mask, res, W, B, HAS_W: tl.constexpr,
               HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, CHAN: tl.constexpr):
    """xhat, gz = dy * act'(pre) (the gradient at the affine output) and g = gz * w_c (at xhat).
    Offsets as ``epilogue``'s. xhat is 0 outside the tile's ``mask``: there x loads as 0, so
    x - mean times a large rstd (a statistic of equal values, a tiny eps) could overflow, and an
    activation's derivative of it be NaN, which dy = 0 would not cancel in the tile's sums."""
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    w = 1.0
    if HAS_W:
        w = load_channel(W, rh, ch, rmask, cmask, CHAN)
    gz = dy
    if ACT != 0:
        pre = xhat * w
        if HAS_B:
            pre = pre + load_channel(B, bh, bc, rmask, cmask, CHAN)
        if HAS_RES:
            pre = pre + res
        gz = dy * activation_grad(pre, ACT)
    g = gz * w
    return xhat, gz, g


# --- Pre-norm residual (tritonorm.add_norm): the normalized input is h = x + residual ---------


@triton.jit
def load_input(X, Res, H, rx, cx, ro, co, mask, PRE_ADD: tl.constexpr, STORE_H: tl.constexpr,
               EV: tl.constexpr):
    """The tile the statistics are taken of, in fp32. Without PRE_ADD: x. With PRE_ADD:
    h = x + residual summed in fp32 and rounded once to H's dtype (the residual stream's), so the
    norm sees exactly the h it returns; stored to H (output layout) when STORE_H. ``EV``: the
    loads' and H's eviction policy (load2d)."""
    v = load2d(X, rx, cx, mask, EV)
    if PRE_ADD:
        h = (v + load2d(Res, ro, co, mask, EV)).to(H.dtype.element_ty)
        if STORE_H:
            tl.store(H + (ro[:, None] + co[None, :]), h, mask=mask, eviction_policy=EV)
        v = h.to(tl.float32)
    return v


@triton.jit
def pivot_input(X, Res, H, rx, ro, rmask, CENTER: tl.constexpr, PRE_ADD: tl.constexpr):
    """The pivot of each row: its first element (column 0 has offset 0 in every view) of the
    normalized input — x, or h = x + residual rounded as h is stored.

    A non-finite first element gives pivot 0: x - inf would turn every deviation of the row into
    +-inf or NaN, where the row's exact mean is +-inf (running statistics need it). Without
    centring the pivot is a plain 0, never 0 * x (inf * 0 = NaN)."""
    if CENTER:
        k = tl.load(X + rx, mask=rmask, other=0.0).to(tl.float32)
        if PRE_ADD:
            k = (k + tl.load(Res + ro, mask=rmask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            k = k.to(tl.float32)
        k = finite_pivot(k)
    else:
        k = (rx * 0).to(tl.float32)
    return k


@triton.jit
def add_incoming(dx, DH, ro, co, mask, ADD_DH: tl.constexpr):
    """dx plus the gradient that reaches h from later layers (add_norm's backward): one tensor
    is then the gradient of both x and the residual."""
    if ADD_DH:
        dx = dx + load2d(DH, ro, co, mask, "")
    return dx


# --- Broadcast (adaptive) affine ------------------------------------------------------------------
# PARAM_FULL: weight/bias expanded to x's shape (in the output's layout) and read at the output
# offsets; the dx kernels store per-element gradients that autograd sums (any broadcast shape).
# PARAM_NC: per-(sample, channel) weight/bias, (N, C, 1, ...) (or (C,) beside one), read in place
# with their own strides: GroupNorm/InstanceNorm views whose row r = n * PG + g (PG rows a sample)
# and whose channel is the row's channel digit plus the column's (layout.segments checks both).
# PARAM_NC == 2: per-(sample, column) weight/bias, adaLN's (N, 1, D) (or (1, 1, D) beside one),
# read in place: row-norm views over x's last axis whose row r = n * PG + t (PG rows a sample)
# and whose column offset in the output is the column itself (launch.py checks both), so the
# parameter's offset is n * stride_n + d * stride_d.
# PARAM_NC == 3: per-(sample, channel) weight/bias of plain BatchNorm (conditional BN): the
# sample is that of the element's output offset, (row offset + column offset) // the output's N
# stride (layout.sample_segments checks N is the output's outermost axis). On the statistic view
# (rows channels) the row part adds nothing to it, on the segment view the column part.


@triton.jit
def param_offsets(rows, rh, ch, ro, co, PARAM_FULL: tl.constexpr, PARAM_NC: tl.constexpr, PS):
    """(weight row, weight column, bias row, bias column) offsets of a tile: the channel digit's;
    (PARAM_FULL) the output's; (PARAM_NC) n * stride_n + c * stride_c of each parameter, with
    ``PS`` = (PG, weight's n and c strides, bias's), n = row // PG and c = rh + ch (a (C,)
    parameter beside a per-sample one has stride_n = 0); (PARAM_NC == 2) n * stride_n +
    d * stride_d with d the column (= co: the launcher checks the output's column stride is 1);
    (PARAM_NC == 3) n * stride_n + c * stride_c with ``PS`` = (the output's N stride, weight's n
    and c strides, bias's), n from the row and column output offsets and c = rh (the row's
    channel: rows are channels, or channel-major segments)."""
    wr, wc, br, bc = rh, ch, rh, ch
    if PARAM_FULL:
        wr, wc, br, bc = ro, co, ro, co
    if PARAM_NC == 3:
        sn, wsn, wsc, bsn, bsc = PS
        rn = ro // sn
        cn = co // sn
        wr, wc = rn * wsn + rh * wsc, cn * wsn
        br, bc = rn * bsn + rh * bsc, cn * bsn
    elif PARAM_NC == 2:
        pg, wsn, wsd, bsn, bsd = PS
        n = rows // pg
        wr, wc = n * wsn, co * wsd
        br, bc = n * bsn, co * bsd
    elif PARAM_NC:
        pg, wsn, wsc, bsn, bsc = PS
        n = rows // pg
        wr, wc = n * wsn + rh * wsc, ch * wsc
        br, bc = n * bsn + rh * bsc, ch * bsc
    return wr, wc, br, bc


@triton.jit
def sample_row_block(tb, n, P, BLOCK_P: tl.constexpr, INT64: tl.constexpr, RG, PS):
    """Row block ``tb`` of sample ``n`` (PARAM_NC == 2's backward): rows n*PG + tb*BLOCK_P ...,
    masked at the sample's end, so a block never spans two samples; as row_block returns."""
    pg, wsn, wsd, bsn, bsd = PS
    if INT64:
        tb = tl.cast(tb, tl.int64)
        n = tl.cast(n, tl.int64)
    t = tb * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = n * pg + t
    rmask = (t < pg) & (rows < P)
    rx, ro, rt, rh = side_offsets(rows, RG)
    return rows, rmask, rx, ro, rt, rh


@triton.jit
def store_param_grads(DW, DB, ro, co, gz, xhat, mask, PARAM_FULL: tl.constexpr, NEED_DW: tl.constexpr,
                      NEED_DB: tl.constexpr):
    """PARAM_FULL: the per-element gradients of a weight and bias laid out like the output
    (gz * xhat and gz); autograd sums them over the broadcast axes."""
    if PARAM_FULL:
        if NEED_DW:
            store2d(DW, ro, co, gz * xhat, mask, "")
        if NEED_DB:
            store2d(DB, ro, co, gz, mask, "")
