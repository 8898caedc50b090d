"""Plans for the flat channel-block kernels of NCHW BatchNorm (kernels/planes.py): when they
apply, the channel block, and the regime. Plain Python (no Triton import), as pixel_plan.py, so
``explain()`` can plan for a GPU on any machine.
"""

from __future__ import annotations

import math

from . import dispatch

# Off: BatchNorm NCHW at any H*W runs the row/column kernels (for comparisons).
ENABLED = True


def _plane(shape) -> int:
    return math.prod(shape[2:])


def block_channels(C: int, HW: int, elem_bytes: int) -> int | None:
    """The fewest channels (dividing C) whose planes together are a multiple of 16 bytes, so every
    sample's block is a 16-byte aligned run; None if no divisor of C gives one."""
    for cb in range(1, C + 1):
        if C % cb == 0 and (cb * HW * elem_bytes) % 16 == 0:
            return cb
    return None


def applies(shape, x_stride, out_stride, spec, elem_bytes: int, profile: dispatch.DeviceProfile) -> bool:
    """Dense NCHW BatchNorm, or Ghost BatchNorm (S sample groups), whose plane H*W is not a
    multiple of 16: the case the row/column kernels read one element at a time
    (docs/compiled.md). Not under a forced regime (tests and tuning force the row/column
    kernels' regimes), and only with enough programs to fill half the SMs (one program a
    channel block and sample group)."""
    if not ENABLED or dispatch.forced_state() is not None or len(shape) < 3:
        return False
    if not spec.allows_running_stats or spec.reduces_c or shape[0] % spec.sample_groups:
        return False
    HW = _plane(shape)
    if HW < 2 or HW % 16 == 0:
        return False  # a multiple of 16: Triton knows each plane is a contiguous run, rows are wide
    dense, step = [0] * len(shape), 1
    for axis in range(len(shape) - 1, -1, -1):
        dense[axis] = step
        step *= shape[axis]
    if not all(n == 1 or (s == d and t == d) for n, s, t, d in zip(shape, x_stride, out_stride, dense)):
        return False
    cb = block_channels(shape[1], HW, elem_bytes)
    if cb is None or dispatch._pow2(cb * HW) > profile.tile:
        return False
    return (shape[1] // cb) * spec.sample_groups >= max(1, profile.sm_count // 2)


def choose(shape, elem_bytes: int, profile: dispatch.DeviceProfile, op: str = "forward",
           groups: int = 1) -> dispatch.Plan:
    """The launch parameters of an ``applies`` case: fused when every sample of a block (of its
    sample group, with ``groups`` S > 1) fits one tile, else looped over tiles of BLOCK_N
    samples, two sweeps. BLOCK_N takes two values per layer whatever the batch, so a new batch
    compiles no new variant beyond three per kernel: the streaming tile's (the profile's tile,
    half in the backward, which holds x and dy), fused when the batch fits it or looped; or the
    fused limit's, for batches between the two."""
    N, C, HW = shape[0] // groups, shape[1], _plane(shape)
    cb = block_channels(C, HW, elem_bytes)
    t_pad = dispatch._pow2(cb * HW)
    base = dict(planes=cb, split=1)
    chans = f"{cb} channel{'s' if cb > 1 else ''}"
    if groups > 1:  # Ghost BatchNorm: a program per (channel block, sample group)
        chans += f" x {groups} sample groups"
    stream_n = max(1, (profile.tile // (1 if op == "forward" else 2)) // t_pad)
    # The backward holds x and dy; in 16 bits the forward's limit fits it here (sm_90a: the planes
    # backward at 32 x 512 padded positions, 16 warps, 128 registers and no spill at 14^2 and 7^2),
    # and one sweep beats two (Ghost BatchNorm 2048x7^2: the looped planes backward read x twice).
    fused_n = profile.fused_limit(elem_bytes, "forward" if elem_bytes == 2 else op) // t_pad
    block_n = stream_n if N <= stream_n else (fused_n if N <= fused_n else 0)
    if block_n:
        return dispatch.Plan("fused", dict(base, block_n=block_n, num_warps=dispatch._warps(block_n * t_pad, profile)),
                             f"NCHW channel planes: {C // cb} blocks of {chans} x {N} samples in one tile")
    return dispatch.Plan("looped", dict(base, block_n=stream_n, num_warps=dispatch._warps(stream_n * t_pad, profile)),
                         f"NCHW channel planes: {C // cb} blocks of {chans}, tiles of {stream_n} samples, "
                         "two sweeps")
