"""Plans for the whole-pixel kernels of channels_last GroupNorm/InstanceNorm (kernels/pixels.py,
kernels/pixels_backward.py): when they apply, the channel block, and the regime. Plain Python
(no Triton import), so ``explain()`` can plan for a GPU on any machine.
"""

from __future__ import annotations

from . import dispatch

# Off: channels_last GroupNorm/InstanceNorm run the row/column kernels (for comparisons).
ENABLED = True

_MIN_RUN_BYTES = 128  # a channel block spans at least this much of a pixel (a warp's coalesced run)



# The backward's split at most: its apply programs each add their block's SPLIT partials of CB
# channels (SPLIT^2 across a block). The GPU report's A/B stage measures 64 against it.
BACKWARD_SPLIT_CAP = 16
# The forward's pixel tile is the row kernels' tile over this (see choose); the A/B stage
# measures 1 (twice the pixels a step) against it.
FORWARD_TILE_DIV = 2
# The forward's split apply programs each merge their block's SPLIT partials of GB groups:
# SPLIT^2 * GB * 8 bytes across a block, at most this share of the block's x bytes (see choose).
FORWARD_MERGE_SHARE = 0.05

def _channels_last_strides(shape) -> tuple[int, ...]:
    """Dense channels_last strides of (N, C, *spatial): C fastest, then the spatial axes."""
    strides = [0] * len(shape)
    step = 1
    for axis in [1] + list(range(len(shape) - 1, 1, -1)) + [0]:
        strides[axis] = step
        step *= shape[axis]
    return tuple(strides)


def _same_strides(shape, a, b) -> bool:
    return all(n == 1 or s == t for n, s, t in zip(shape, a, b))


def geometry(shape, spec) -> tuple[int, int, int, int]:
    """(N, C, pixels, groups) of a channels_last GroupNorm/InstanceNorm input (InstanceNorm: a
    group per channel)."""
    hw = 1
    for s in shape[2:]:
        hw *= s
    return shape[0], shape[1], hw, (spec.num_groups if spec.reduces_c else shape[1])


def block_channels(C: int, G: int, elem_bytes: int) -> int | None:
    """Channels a program takes: the fewest whole groups whose bytes are a multiple of 16 (so
    every pixel's run is 16-byte aligned) and at least _MIN_RUN_BYTES; None if no group count
    dividing G gives a multiple of 16 bytes."""
    cg = C // G
    fallback = None
    for gb in range(1, G + 1):
        cb = gb * cg
        if G % gb or (cb * elem_bytes) % 16:
            continue
        if cb * elem_bytes >= _MIN_RUN_BYTES:
            return cb
        fallback = cb
    return fallback


def applies(shape, x_stride, out_stride, spec, elem_bytes: int) -> bool:
    """channels_last GroupNorm (or InstanceNorm) with a channel count per group that is not a
    multiple of 16: the case the row/column kernels read one element at a time
    (docs/compiled.md)."""
    if not ENABLED or len(shape) < 3 or spec.reduces_n or spec.sample_groups != 1:
        return False
    if not all(spec.reduces_spatial(i) for i in range(len(shape) - 2)):
        return False
    C = shape[1]
    G = spec.num_groups if spec.reduces_c else C
    # Cg a multiple of 16: Triton knows the group's run is contiguous, the row kernels are wide.
    # Otherwise (Cg = 10, 20, 40, even 8) it cannot tell and reads element by element.
    if C % G or (C // G) % 16 == 0:
        return False
    cl = _channels_last_strides(shape)
    if not (_same_strides(shape, x_stride, cl) and _same_strides(shape, out_stride, cl)):
        return False
    return block_channels(C, G, elem_bytes) is not None


def _merge_bounded(split: int, tile_hw: int, warps: int, cb: int, cg: int, HW: int, elem_bytes: int,
                   profile: dispatch.DeviceProfile, blocks: int = 0) -> tuple[int, int, int]:
    """The forward split with its merges (SPLIT^2 * GB * 8 bytes a block, quadratic in SPLIT:
    every apply program merges all its block's partials) at most FORWARD_MERGE_SHARE of the
    block's x bytes: the split shrinks by a step while the tile grows by it and the program's
    warps with it, so the device holds as many warps (and each program as many tiles) as
    before, in fewer, larger programs that merge fewer partials. Stops where the warps would
    not grow in step (max_warps), the split would reach 1 (that would be another regime) or the
    ``blocks`` x split programs would no longer give every SM one (SMs left idle cost more
    than merges that mostly hit L2: SD 320x64^2 b1 stays at 256 programs, not 64)."""
    step = 2 if profile.interpreter else 4
    cb_pad = dispatch._pow2(cb)
    while (split // step >= 2 and split * split * (cb // cg) * 8 > FORWARD_MERGE_SHARE * cb * HW * elem_bytes
           and (profile.interpreter or blocks * (split // step) >= profile.sm_count)
           and tile_hw * step <= dispatch._pow2(HW)
           and dispatch._warps(tile_hw * step * cb_pad, profile) == warps * step):
        split, tile_hw, warps = split // step, tile_hw * step, warps * step
    return split, tile_hw, warps


def choose(shape, spec, elem_bytes: int, profile: dispatch.DeviceProfile, op: str = "forward") -> dispatch.Plan:
    """The regime and launch parameters for an ``applies`` case (a dispatch.Plan, as
    ``explain`` and the cost model read it), with dispatch.choose's rules: fused when a channel
    block's pixels fit one program and the blocks fill the SMs or the call is launch-bound; else
    one program per block sweeping twice (looped) when the blocks fill half the warp slots; else
    a split over pixel chunks (the forward's bounded in its merges: _merge_bounded). A forced
    regime (dispatch.forced) is honoured where it can run.
    ``op="backward"`` (pixels_backward.py): the backward's fused limit and half the tile (it
    holds x, dy and their products)."""
    N, C, HW, G = geometry(shape, spec)
    cb = block_channels(C, G, elem_bytes)
    cb_pad = dispatch._pow2(cb)
    blocks = N * (C // cb)
    fused_max = profile.fused_limit(elem_bytes, op)
    # Half the row kernels' tile: each thread also holds five per-channel vectors (pivot, mean,
    # rstd, weight, bias) across its channels; full 4096-element tiles on 8 warps spilled 16-28 B
    # at sm_90a in 3 of 40 variants (ptxas kept them at 64 registers).
    tile_hw = max(1, min(dispatch._pow2(HW), profile.tile // (FORWARD_TILE_DIV if op == "forward" else 4) // cb_pad))
    force = dispatch.forced_state()
    forced = None
    if force is not None and force[1] in (None, op) and force[0] != dispatch.NATIVE:
        forced = force[0], dict(force[2])
        if "block_m" in forced[1]:
            tile_hw = max(1, min(dispatch._pow2(HW), dispatch._pow2(forced[1]["block_m"]) // cb_pad))
    fits = dispatch._pow2(HW) * cb_pad <= fused_max
    total_bytes = N * C * HW * elem_bytes
    base = dict(cb=cb, block_hw=tile_hw)
    if forced is None and fits and (blocks >= profile.sm_count or total_bytes < profile.split_min_bytes) \
            or forced is not None and forced[0] == "fused" and fits:
        block = dispatch._pow2(HW)
        return dispatch.Plan("fused", dict(base, block_hw=block, split=1,
                                           num_warps=dispatch._warps(block * cb_pad, profile)),
                             f"channels_last pixel tiles: {cb} channels x {HW} pixels in one program")
    # As dispatch.choose: whole blocks filling half the device's warp slots sweep twice in one
    # launch; fewer split their pixels (powers of four on a GPU, so the batch moves the split,
    # and the merge's compiled BLOCK_S, little).
    tiles = -(-HW // tile_hw)
    warps = dispatch._warps(tile_hw * cb_pad, profile)
    fill = profile.sm_count * profile.programs_per_sm if profile.interpreter else dispatch._fill(warps, profile)
    split = 1
    if forced is not None and forced[0] == "split":
        split = max(1, min(tiles, int(forced[1].get("split", 4))))
    elif forced is None and blocks < fill // 2 and tiles > 1:
        # At least 4 tiles a program; the backward's apply programs each add their block's
        # SPLIT partials of CB channels (SPLIT^2 across a block), so at most 16 there.
        cap = dispatch.MAX_SPLIT if op == "forward" else BACKWARD_SPLIT_CAP
        split = min(cap, max(1, tiles // 4), dispatch._pow2(-(-fill // blocks)))
        if not profile.interpreter:
            split = 1 << (2 * ((split.bit_length() - 1 + 1) // 2))
        while split > tiles:
            split //= 2 if profile.interpreter else 4
        split = max(1, split)
        if op == "forward":
            split, tile_hw, warps = _merge_bounded(split, tile_hw, warps, cb, C // G, HW, elem_bytes, profile,
                                                   blocks)
    chunk = -(-(-(-HW // split)) // tile_hw) * tile_hw
    split = -(-HW // chunk)
    if split == 1:
        return dispatch.Plan("looped", dict(base, split=1, chunk=HW, num_warps=warps),
                             f"channels_last pixel tiles: {blocks} blocks of {cb} channels, two sweeps each")
    return dispatch.Plan("split", dict(base, block_hw=tile_hw, split=split, chunk=chunk, num_warps=warps),
                         f"channels_last pixel tiles: {blocks} blocks of {cb} channels x {split} pixel chunks")
