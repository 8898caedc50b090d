"""channels_last GroupNorm/InstanceNorm with groups of other than 16k channels: the whole-pixel
kernels (kernels/pixels.py, pixels_backward.py), every regime, forward and backward against the
float64 reference."""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import check_case, make_inputs
from helpers import record_launches
from tritonorm import dispatch, pixel_plan, scope as scopes
from tritonorm.kernels import launch

# Tiles of a few pixels.
REGIMES = {"fused": {}, "looped": {"block_m": 256}, "split": {"block_m": 256, "split": 3}}
KERNELS = {"fused": ["_pixels_fwd_kernel"], "looped": ["_pixels_fwd_kernel"],
           "split": ["_pixels_partial_kernel", "_pixels_apply_kernel"]}
# Backward: dweight/dbias from the pass that reads x and dy; 2 launches in every regime.
BACKWARD = {"fused": ["_pixels_bwd_kernel", "_finish_kernel"], "looped": ["_pixels_bwd_kernel", "_finish_kernel"],
            "split": ["_pixels_bwd_sums_kernel", "_pixels_bwd_apply_kernel"]}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)
    launch.clear()


def _cl(shape, dtype, **kw):
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    x, w, b, r, dy = make_inputs(shape, dtype, memory_format=fmt, **kw) if fmt else make_inputs(shape, dtype, **kw)
    if fmt is None:  # (N, C, L) with C fastest
        x = x.detach().transpose(1, 2).contiguous().transpose(1, 2)
    return x, w, b, r, dy


def _kernels(monkeypatch, x, w, scope, groups, regime):
    """Kernels launched by the forward, then by a backward asking for dx and dweight."""
    names = record_launches(monkeypatch)
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    with dispatch.forced(regime, **REGIMES[regime]):
        y = tritonorm.norm(x, scope, num_groups=groups, weight=w, backend="triton")
        fwd = list(names)
        y.backward(torch.randn_like(y))
    return fwd, names[len(fwd):]


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("shape,scope,groups,dtype", [
    ((2, 40, 5, 7), "group", 4, torch.float32),      # Cg = 10: 40-byte groups
    ((3, 80, 3, 3), "group", 8, torch.bfloat16),     # Cg = 10: 20-byte groups, two channel blocks
    ((2, 24, 4, 3), "group", 8, torch.float16),      # Cg = 3: 48-channel blocks
    ((2, 32, 6, 2), "instance", None, torch.float32),
    ((2, 40, 2, 3, 4), "group", 4, torch.bfloat16),  # 3-D spatial
    ((2, 40, 9), "group", 4, torch.float32),         # 1-D spatial, C fastest
])
def test_pixels_forward_and_backward(monkeypatch, shape, scope, groups, dtype, regime):
    x, w, b, r, dy = _cl(shape, dtype, residual=True)
    spec = scopes.parse(scope, x.dim(), groups, x.shape[1])
    assert pixel_plan.applies(tuple(x.shape), x.stride(), x.stride(), spec, x.element_size())
    assert _kernels(monkeypatch, x, w, scope, groups, regime) == (KERNELS[regime], BACKWARD[regime])
    with dispatch.forced(regime, **REGIMES[regime]):
        check_case(x, scope, num_groups=groups, weight=w, bias=b, residual=r, dy=dy, activation="silu")


@pytest.mark.parametrize("regime", list(REGIMES))
def test_pixels_without_affine_uncentred_and_offset(regime):
    # |mean| >> std: the per-group pivot keeps the mean exact; center=False: mean square.
    with dispatch.forced(regime, **REGIMES[regime]):
        x, _, _, _, dy = _cl((2, 40, 3, 5), torch.float32, offset=1e4, affine=False)
        check_case(x, "group", num_groups=4, dy=dy)
        x, w, _, _, dy = _cl((2, 40, 3, 5), torch.bfloat16)
        check_case(x, "group", num_groups=4, weight=w, dy=dy, center=False)


def test_pixels_not_taken_where_rows_are_already_wide():
    # 16 channels a group (Triton then knows the run is contiguous), NCHW, or no channel block
    # of whole groups that is a multiple of 16 bytes: the row/column kernels run.
    cases = [((2, 64, 4, 4), "group", 4, torch.float32, torch.channels_last),
             ((2, 40, 4, 4), "group", 4, torch.float32, torch.contiguous_format),
             ((2, 6, 4, 4), "group", 2, torch.float32, torch.channels_last)]
    for shape, scope, groups, dtype, fmt in cases:
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
        spec = scopes.parse(scope, x.dim(), groups, x.shape[1])
        assert not pixel_plan.applies(tuple(x.shape), x.stride(), x.stride(), spec, x.element_size())


def test_block_channels_are_whole_aligned_groups():
    for C, G, eb in [(320, 32, 2), (640, 32, 2), (1280, 32, 2), (320, 32, 4), (96, 32, 2), (64, 64, 2)]:
        cb = pixel_plan.block_channels(C, G, eb)
        assert cb % (C // G) == 0 and G % (cb // (C // G)) == 0
        assert (cb * eb) % 16 == 0 and C % cb == 0


def test_pixels_plan_for_a_gpu_is_wide():
    # The plans for an H200: Stable Diffusion's channels_last GroupNorms; fused needs the block's
    # pixels in one program, else split over pixels with enough programs to fill the device.
    prof = dispatch.PROFILES["h200"]
    spec = scopes.parse("group", 4, 32, 320)
    plan = pixel_plan.choose((2, 320, 64, 64), spec, 2, prof)
    assert plan.kernel == "split" and plan.config["cb"] == 80
    # At least 8 warps an SM on average (the split's programs are bounded by their merges:
    # tests/test_pixels_partials.py).
    assert 2 * (320 // 80) * plan.config["split"] * plan.config["num_warps"] >= 8 * prof.sm_count
    plan = pixel_plan.choose((2, 1280, 4, 4), scopes.parse("group", 4, 32, 1280), 2, prof)
    assert plan.kernel == "fused"


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("wants", ["x", "w", "b", "wb", "res"])
def test_pixels_backward_gradient_subsets(regime, wants):
    # Only some gradients asked for: the kernels skip dx or dweight/dbias, and what they do
    # write matches the float64 reference.
    from tritonorm import reference
    x, w, b, r, dy = _cl((2, 40, 3, 5), torch.float32, residual=True)
    leaves = {"x": x, "w": w, "b": b, "res": r}
    asked = [w, b] if wants == "wb" else [leaves[wants]]
    inputs = [t.detach().requires_grad_(any(t is a for a in asked)) for t in (x, w, b, r)]
    with dispatch.forced(regime, **REGIMES[regime]):
        y = tritonorm.norm(inputs[0], "group", num_groups=4, weight=inputs[1], bias=inputs[2], residual=inputs[3],
                           activation="gelu", backend="triton")
        grads = torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy)
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    spec = scopes.parse("group", 4, 4, 40)
    y64 = reference.norm(ref_in[0], spec, ref_in[1], ref_in[2], 1e-5, True, "gelu", ref_in[3])
    ref = torch.autograd.grad(y64, [t for t in ref_in if t.requires_grad], dy.double())
    assert len(grads) == len(ref) == len(asked)
    for ours, theirs in zip(grads, ref):
        assert (ours.double() - theirs).abs().max() <= 2e-5 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("kinds", [("nc", "nc"), ("c", "nc"), ("nc", None), (None, "nc-strided")])
def test_pixels_per_sample_weight_and_bias(monkeypatch, regime, kinds):
    # AdaGroupNorm / scale_shift / AdaIN: (N, C, 1, 1) weight and bias (the bias possibly the
    # strided half of a (N, 2C, 1, 1) chunk) read in place by the whole-pixel kernels; their
    # gradients are the per-(sample, channel) sums, a (C,) one beside is summed over N.
    from tritonorm import activations
    x = torch.randn(2, 40, 3, 5, dtype=torch.float64).to(torch.float32).contiguous(memory_format=torch.channels_last)
    N, C = 2, 40

    def param(kind, scale):
        if kind is None:
            return None
        if kind == "c":
            return torch.randn(C) * scale + 1
        if kind == "nc-strided":
            return (torch.randn(N, 2 * C, 1, 1) * scale)[:, C:]
        return torch.randn(N, C, 1, 1) * scale + 1
    w, b = param(kinds[0], 0.5), param(kinds[1], 1.0)
    dy = torch.randn(x.shape)
    leaves = [t for t in (x, w, b) if t is not None]
    ours = [t.detach().requires_grad_() for t in leaves]
    it = iter(ours)
    xo, wo, bo = next(it), (next(it) if w is not None else None), (next(it) if b is not None else None)
    names = record_launches(monkeypatch)
    with dispatch.forced(regime, **REGIMES[regime]):
        y = tritonorm.norm(xo, "group", num_groups=4, weight=wo, bias=bo, activation="silu", backend="triton")
        grads = torch.autograd.grad(y, ours, dy)
    assert names[:len(KERNELS[regime])] == KERNELS[regime], names
    assert all(n.startswith("_pixels") or n == "_finish_kernel" for n in names), names
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_in)
    x64, w64, b64 = next(it), (next(it) if w is not None else None), (next(it) if b is not None else None)
    z = tritonorm.norm(x64, "group", num_groups=4, backend="reference")
    if w64 is not None:
        z = z * (w64.view(1, C, 1, 1) if w64.dim() == 1 else w64)
    if b64 is not None:
        z = z + b64
    y64 = activations.apply("silu", z)
    ref = torch.autograd.grad(y64, ref_in, dy.double())
    assert (y.double() - y64).abs().max() <= 2e-5 * y64.abs().max()
    for g, r in zip(grads, ref):
        assert g.shape == r.shape
        assert (g.double() - r).abs().max() <= 2e-5 * max(1.0, r.abs().max().item())
