"""The split regime of the whole-pixel kernels (channels_last GroupNorm/InstanceNorm,
kernels/pixels.py, pixels_backward.py): its partials at several SPLIT values, more than one merge
step included (SPLIT > the apply kernels' 16 partials a step), uneven last chunks, against the
float64 reference; and the cost model's bytes against the grid and buffers the launchers use."""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import check_case, make_inputs
from tritonorm import activations, dispatch, pixel_plan, scope as scopes
from tritonorm.kernels import launch

# 40 pixels in 2-pixel tiles (fp32: 64 padded channels; bf16 Cg = 10: 128, 1-pixel tiles): a
# forced split s gives chunks of ceil(40 / s) pixels rounded up to whole tiles.
HW = (5, 8)
SPLITS = {3: 3, 5: 5, 20: 20}  # forced -> run (3: chunks of 14, 14 and 12 pixels)
# (scope, channels, groups): Cg = 10, 20, 40 (fp32: 40-channel blocks of 4, 2, 1 groups) and
# InstanceNorm (48-channel blocks, not a power of two).
LAYERS = {"cg10": ("group", 80, 8), "cg20": ("group", 80, 4), "cg40": ("group", 80, 2),
          "instance": ("instance", 48, None)}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)
    launch.clear()


def _split(split):
    return dispatch.forced("split", block_m=128, split=split)


def _x(C, dtype=torch.float32, N=2):
    return (torch.randn((N, C) + HW, dtype=torch.float64).to(dtype)).contiguous(memory_format=torch.channels_last)


def _ran():
    """The forward and backward whole-pixel launchers of the last call."""
    (plan,) = [p for p in launch._PLANS.values() if isinstance(p, launch.ForwardPlan)]
    back = [b.pixels for b in plan._backward.values()]
    return plan.pixels, back


def _reference(x, scope, groups, w, b, r, act):
    """act(xhat * w + b + r) in float64, w and b per channel ((C,)) or per (sample, channel)."""
    C = x.shape[1]
    z = tritonorm.norm(x, scope, num_groups=groups, backend="reference")
    if w is not None:
        z = z * (w.view(1, C, 1, 1) if w.dim() == 1 else w)
    if b is not None:
        z = z + (b.view(1, C, 1, 1) if b.dim() == 1 else b)
    if r is not None:
        z = z + r
    return activations.apply(act, z) if act else z


def _compare(x, scope, groups, w, b, r, act, asked, dy, split):
    """Forward and the gradients of ``asked`` (names among x, w, b, r) in the forced split,
    fp32, against float64; returns the backward launcher that ran."""
    leaves = {"x": x, "w": w, "b": b, "r": r}
    ours = {k: None if t is None else t.detach().requires_grad_(k in asked) for k, t in leaves.items()}
    with _split(split):
        y = tritonorm.norm(ours["x"], scope, num_groups=groups, weight=ours["w"], bias=ours["b"],
                           residual=ours["r"], activation=act, backend="triton")
        grads = torch.autograd.grad(y, [ours[k] for k in asked], dy)
    ref = {k: None if t is None else t.detach().double().requires_grad_(k in asked) for k, t in leaves.items()}
    y64 = _reference(ref["x"], scope, groups, ref["w"], ref["b"], ref["r"], act)
    want = torch.autograd.grad(y64, [ref[k] for k in asked], dy.double())
    assert (y.double() - y64).abs().max() <= 2e-5 * max(1.0, y64.abs().max().item())
    for k, g, g64 in zip(asked, grads, want):
        assert g.shape == g64.shape, k
        assert (g.double() - g64).abs().max() <= 2e-5 * max(1.0, g64.abs().max().item()), k
    fwd, back = _ran()
    assert fwd.plan.kernel == "split" and fwd.split == SPLITS[split]
    (bwd,) = back
    assert bwd.plan.kernel == "split" and bwd.split == SPLITS[split]
    return bwd


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward-order"])
@pytest.mark.parametrize("layer,split", [(layer, 3) for layer in LAYERS] + [("cg10", 5), ("cg10", 20)])
def test_split_partials_match_float64(layer, split, reverse, monkeypatch):
    """Both orders of the apply programs and tiles (dispatch.APPLY_REVERSE: the first stage's
    sweep run backwards, or as it ran)."""
    from tritonorm import dispatch
    from tritonorm.kernels import launch

    monkeypatch.setattr(dispatch, "APPLY_REVERSE", reverse)
    launch.clear()
    scope, C, groups = LAYERS[layer]
    x, w, b, r, dy = make_inputs((2, C) + HW, torch.float32, residual=True, memory_format=torch.channels_last)
    spec = scopes.parse(scope, 4, groups, C)
    assert pixel_plan.applies(tuple(x.shape), x.stride(), x.stride(), spec, 4)
    bwd = _compare(x, scope, groups, w, b, r, "silu", ["x", "w", "b", "r"], dy, split)
    fwd, _ = _ran()
    for plan in (fwd, bwd):
        first_pid, first_sp, tile0 = plan.order
        assert (first_sp == plan.split - 1 and tile0 == plan.chunk - plan.plan.config["block_hw"]
                and first_pid > 0) if reverse else plan.order == (0, 0, 0), plan.order
    launch.clear()


@pytest.mark.parametrize("layer,affine", [("cg10", "none"), ("instance", "w"), ("cg40", "b")])
def test_split_partials_with_and_without_weight_and_bias(layer, affine):
    scope, C, groups = LAYERS[layer]
    x, w, b, _, dy = make_inputs((2, C) + HW, torch.float32, memory_format=torch.channels_last)
    w = w if affine == "w" else None
    b = b if affine == "b" else None
    asked = ["x"] + (["w"] if w is not None else []) + (["b"] if b is not None else [])
    _compare(x, scope, groups, w, b, None, None, asked, dy, 5)


@pytest.mark.parametrize("asked", [["x"], ["w"], ["r"], ["x", "b"]])
def test_split_partials_for_a_subset_of_the_gradients(asked):
    # Only the planes asked for are allocated: none for dweight/dbias when only dx is; no group
    # partials without dx; no sums launch at all for dresidual alone.
    scope, C, groups = LAYERS["cg20"]
    x, w, b, r, dy = make_inputs((2, C) + HW, torch.float32, residual=True, memory_format=torch.channels_last)
    bwd = _compare(x, scope, groups, w, b, r, "gelu", asked, dy, 5)
    N, P, split = 2, 2 * groups, 5
    planes = ("w" in asked) + ("b" in asked)
    assert bwd.part_elems == planes * split * N * C + (2 * P * split if "x" in asked else 0)
    assert bwd.launches == 1 + (bwd.part_elems > 0)


@pytest.mark.parametrize("kinds,asked", [(("nc", "nc"), ["x", "w", "b"]), (("c", "nc"), ["x", "w", "b"]),
                                         (("nc", None), ["w"]), (("c", "nc"), ["b"]), ((None, "nc"), ["x"])])
def test_split_partials_with_per_sample_weight_and_bias(kinds, asked):
    # AdaGroupNorm's (N, C, 1, 1) weight/bias: their gradients are each sample's own chunk
    # partials; a (C,) one beside adds every sample's.
    scope, C, groups = LAYERS["cg10"]
    N = 2
    x = _x(C)
    dy = torch.randn(x.shape, dtype=torch.float64).float()

    def param(kind, scale):
        if kind is None:
            return None
        shape = (C,) if kind == "c" else (N, C, 1, 1)
        return (torch.randn(shape, dtype=torch.float64) * scale + 1).float()
    w, b = param(kinds[0], 0.5), param(kinds[1], 1.0)
    _compare(x, scope, groups, w, b, None, "silu", asked, dy, 5)


def test_split_partials_in_bf16_against_float64():
    # bf16 Cg = 10: 80-channel blocks of 8 groups; check_case judges bf16 against float64.
    x, w, b, r, dy = make_inputs((2, 80) + HW, torch.bfloat16, residual=True, memory_format=torch.channels_last)
    check_case(x, "group", num_groups=8, weight=w, bias=b, residual=r, dy=dy, activation="silu",
               regime="split", config=dict(block_m=128, split=5))
    fwd, (bwd,) = _ran()
    assert fwd.split == bwd.split == 5


@pytest.mark.parametrize("nc", [False, True])
def test_cost_model_bytes_are_the_launchers_grid_and_buffers(nc, monkeypatch):
    """The model's bytes for the split regime follow what runs: the forward's [2, P, SPLIT]
    partials written once and read by each of a block's SPLIT apply programs; the backward's one
    buffer (its size as allocated) written once, its per-channel planes read once, its
    [2, P, SPLIT] group partials read by each apply program."""
    allocated = []
    real = launch._empty

    def spy(shape, device, dtype=torch.float32):
        allocated.append(tuple(shape))
        return real(shape, device, dtype)
    monkeypatch.setattr(launch, "_empty", spy)
    scope, C, groups = LAYERS["cg10"]
    N = 2
    P = N * groups
    x = _x(C)
    w = torch.rand(N, C, 1, 1) + 0.5 if nc else torch.rand(C) + 0.5
    b = torch.randn(C)
    kw = dict(num_groups=groups, weight=w, bias=b, activation="silu")
    with _split(3):
        fwd_model = tritonorm.explain(x, scope, op="forward", **kw).cost
        bwd_model = tritonorm.explain(x, scope, op="backward", **kw).cost
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        y = tritonorm.norm(leaves[0], scope, backend="triton", **dict(kw, weight=leaves[1], bias=leaves[2]))
        fwd_allocs = list(allocated)
        allocated.clear()
        torch.autograd.grad(y, leaves, torch.randn_like(y))
    fwd, (bwd,) = _ran()
    n, params = x.numel() * 4, (w.numel() + b.numel()) * 4
    # Forward: partial grid (blocks, SPLIT), apply grid the same; [2, P, SPLIT] allocated.
    split = fwd.partial.grid[1]
    assert fwd.apply.grid == fwd.partial.grid and (2, P, split) in fwd_allocs
    fparts = 2 * P * split * 4
    assert fwd_model.bytes_read == 2 * n + params + fparts * fwd.apply.grid[1]
    assert fwd_model.bytes_written == n + 5 * P * 4 + fparts
    # Backward: the one partial buffer as allocated, of a plane per parameter and the groups.
    split = bwd.apply.grid[1]
    assert bwd.sums.grid == bwd.apply.grid
    (part,) = [s for s in allocated if len(s) == 1 and s[0] not in (C, N * C)]
    planes = 2 * split * N * C * 4
    groups_bytes = part[0] * 4 - planes
    assert groups_bytes == 2 * P * split * 4
    # x and dy read by both launches, the [3, P] statistics and the parameters once (the
    # apply's reads beyond the sums'), the planes once, each group partial by SPLIT programs.
    assert bwd_model.bytes_read == 2 * (2 * n) + 3 * P * 4 + params + planes + groups_bytes * split
    assert bwd_model.bytes_written == n + params + part[0] * 4
    assert (fwd_model.launches, bwd_model.launches) == (fwd.launches, bwd.launches) == (2, 2)


@pytest.mark.parametrize("profile", ["h200", "interpreter"])
def test_forward_split_bounds_its_merges_and_keeps_the_device_warps(profile, monkeypatch):
    """Each forward apply program merges its block's SPLIT partials: the plan keeps SPLIT^2 * GB
    * 8 bytes within FORWARD_MERGE_SHARE of the block's x bytes by trading split for tile
    height, so the warps on the device and the tiles per program stay those of the unbounded
    plan (Stable Diffusion 320x64^2 channels_last b8: 64 -> 16 chunks of 4x the pixels a tile),
    and never below one program an SM (b1 and b2 keep their 64 chunks)."""
    prof = dispatch.PROFILES[profile]
    cases = [((b, 320, 64, 64), 32, 2) for b in (1, 2, 8)] + [((2, 640, 32, 32), 32, 2), ((2, 320, 64, 64), 32, 4),
                                                              ((2, 64, 32, 32), None, 2)]
    changed = 0
    for shape, groups, eb in cases:
        spec = scopes.parse("group" if groups else "instance", 4, groups, shape[1])
        bounded = pixel_plan.choose(shape, spec, eb, prof)
        with monkeypatch.context() as m:
            m.setattr(pixel_plan, "FORWARD_MERGE_SHARE", float("inf"))
            free = pixel_plan.choose(shape, spec, eb, prof)
        assert free.kernel == bounded.kernel
        if free.kernel != "split":
            continue
        N, C, HW, G = pixel_plan.geometry(shape, spec)
        cfg, cfg0 = bounded.config, free.config
        cb, gb = cfg["cb"], cfg["cb"] // (C // G)
        assert cfg["split"] * cfg["num_warps"] == cfg0["split"] * cfg0["num_warps"]
        assert cfg["chunk"] // cfg["block_hw"] == cfg0["chunk"] // cfg0["block_hw"]
        assert cfg["split"] * cfg["block_hw"] == cfg0["split"] * cfg0["block_hw"]
        merges = cfg["split"] ** 2 * gb * 8
        step = 2 if prof.interpreter else 4
        within = merges <= pixel_plan.FORWARD_MERGE_SHARE * cb * HW * eb
        # Or a step more would leave SMs without a program (SD 320x64^2 b1, b2 on an H200).
        few = not prof.interpreter and N * (C // cb) * (cfg["split"] // step) < prof.sm_count
        assert within or few or cfg["split"] // step < 2 or cfg["num_warps"] * step > prof.max_warps, (shape, cfg)
        assert prof.interpreter or N * (C // cb) * cfg["split"] >= min(prof.sm_count, N * (C // cb) * cfg0["split"])
        changed += cfg != cfg0
    assert changed  # the bound binds somewhere in these cases
