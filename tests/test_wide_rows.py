"""The WIDE backward of contiguous rows longer than one fused program holds (LayerNorm/RMSNorm at
D = 16384 on an H200): one launch over a (programs, column tiles) grid, each program sweeping
the whole rows for their sums before its own tile, then the finish of the per-column dweight/
dbias partials (kernels/backward.py, dispatch.wide_plan). Against the float64 reference in the
interpreter (small tiles forced, so the sweep takes several chunks and the last tile and chunk
are partial), with the plan the dispatcher makes and the launches it takes."""

from __future__ import annotations

import pytest
import torch
from cases import check_case

import tritonorm
from tritonorm import dispatch
from tritonorm.kernels import launch
from tritonorm.kernels import backward as bk


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """Poisoned outputs, fresh plans, every launch through JITFunction.run (where _launched sees
    it), and the device's profile with the interpreter's limits and 4 SMs: on CPU that is the
    interpreter's profile; on a GPU (the GPU report runs this file compiled) the same plans for
    these small shapes, rows of 5000 past a 4096-element backward limit."""
    from helpers import device_profile_overrides

    from tritonorm.kernels import fastlaunch

    monkeypatch.setattr(launch, "POISON", True)
    overrides: dict = {}
    device_profile_overrides(monkeypatch, overrides)
    overrides.update(fused_max_backward={4: 4096, 2: 4096}, tile=4096)
    launch.clear()
    with fastlaunch.enabled(False):
        yield
    launch.clear()


def _rows(shape, dtype, affine="wb", offset=0.0):
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + offset).to(dtype)
    d = shape[-1]
    w = (torch.rand(d, dtype=torch.float64) + 0.5).to(dtype) if "w" in affine else None
    b = torch.randn(d, dtype=torch.float64).to(dtype) if "b" in affine else None
    return x, w, b, torch.randn(shape, dtype=torch.float64).to(dtype)


def _launched(monkeypatch):
    """(kernel name, its WIDE constexpr, grid) of every launch while active."""
    seen = []
    cls = type(bk._bwd_fused_kernel)
    original = cls.run

    def run(kernel, *args, **kwargs):
        seen.append((kernel.fn.__name__, kwargs.get("WIDE", 0), tuple(kwargs.get("grid") or ())))
        return original(kernel, *args, **kwargs)
    monkeypatch.setattr(cls, "run", run)
    return seen


# 300 columns: wide=2 -> tiles of 256 (the second holds 44), wide=3 -> 128 (the last 44); the
# sweep's 128-column chunks end on a partial one. 17 rows on the interpreter profile's 4 SMs:
# 2 (or 1) programs along the rows, each taking several row blocks.
@pytest.mark.parametrize("tiles,center,affine,dtype", [
    (2, True, "wb", torch.float32), (2, True, "w", torch.bfloat16), (2, True, "", torch.float32),
    (2, False, "w", torch.bfloat16), (3, True, "wb", torch.bfloat16), (3, False, "w", torch.float32),
], ids=["2-layer-wb-fp32", "2-layer-w-bf16", "2-layer-plain-fp32", "2-rms-w-bf16", "3-layer-wb-bf16",
        "3-rms-w-fp32"])
def test_wide_backward_matches_the_reference(tiles, center, affine, dtype, monkeypatch):
    seen = _launched(monkeypatch)
    x, w, b, dy = _rows((17, 300), dtype, affine, offset=6.0 if center else 0.0)
    check_case(x, "layer", weight=w, bias=None if not center else b, dy=dy, center=center,
               regime="fused", config=dict(op="backward", wide=tiles, block_a=128))
    wide = [s for s in seen if s[0] == "_bwd_fused_kernel"]
    assert wide and all(s[1] == 128 for s in wide), seen
    progs, t = wide[-1][2]
    assert t == tiles and progs * t <= 4  # every program at once (dispatch.wide_programs)
    finishes = [s for s in seen if s[0] == "_finish_kernel"]
    assert len(finishes) == (1 if (w is not None or (b is not None and center)) else 0), seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wide_backward_with_residual_and_activation(dtype, monkeypatch):
    # The residual enters before the activation: the sweep recomputes act'(pre) per chunk, and
    # dresidual is written by the tile pass.
    x, w, b, dy = _rows((9, 200), dtype)
    r = torch.randn(9, 200, dtype=torch.float64).to(dtype)
    check_case(x, "layer", weight=w, bias=b, residual=r, dy=dy, activation="silu",
               regime="fused", config=dict(op="backward", wide=2, block_a=64))


def test_one_row_stores_dweight_from_each_tile(monkeypatch):
    # One row: each tile's program stores its columns of dweight/dbias itself (no finish).
    seen = _launched(monkeypatch)
    x, w, b, dy = _rows((1, 300), torch.float32)
    check_case(x, "layer", weight=w, bias=b, dy=dy, regime="fused",
               config=dict(op="backward", wide=2, block_a=64))
    assert [s[0] for s in seen if s[0] != "_fwd_fused_kernel"] == ["_bwd_fused_kernel"], seen


def test_compiled_layer_norm_takes_the_wide_backward(monkeypatch):
    """torch.compile(fullgraph) of layer_norm + SiLU: the registered op's backward plans as the
    eager call does (WIDE), and the gradients match the float64 reference."""
    from helpers import FP32_RTOL, max_err, scale

    from tritonorm import functional as tf

    torch._dynamo.reset()
    seen = _launched(monkeypatch)
    x, w, b, dy = _rows((3, 5000), torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.double().requires_grad_() for t in (x, w, b)]

    def f(x, w, b):
        return torch.nn.functional.silu(tf.layer_norm(x, (5000,), w, b))

    try:
        torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves).backward(dy)
    finally:
        torch._dynamo.reset()
    torch.nn.functional.silu(torch.nn.functional.layer_norm(ref[0], (5000,), ref[1], ref[2])).backward(dy.double())
    assert ("_bwd_fused_kernel", 4096, (1, 2)) in seen, seen
    for name, got, want in zip(("dx", "dweight", "dbias"), leaves, ref):
        err, sc = max_err(got.grad, want.grad), scale(want.grad)
        assert err <= FP32_RTOL * sc + 1e-7, (name, err, sc)


@pytest.mark.parametrize("rd", [None, torch.float32])
def test_add_norm_takes_the_wide_backward(rd, monkeypatch):
    # add_norm: dx gets the incoming gradient of h (ADD_DH) and, with a float32 residual
    # stream, is stored a second time in its dtype (DX_TWICE).
    seen = _launched(monkeypatch)
    shape = (9, 300)
    x, w, b, dy = _rows(shape, torch.bfloat16)
    r = torch.randn(shape, dtype=torch.float64).to(rd or torch.bfloat16)
    dh = torch.randn(shape, dtype=torch.float64).to(rd or torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    with dispatch.forced("fused", op="backward", wide=2, block_a=128):
        y, h = tritonorm.add_norm(leaves[0], leaves[1], "layer", weight=leaves[2], bias=leaves[3],
                                  backend="triton", residual_dtype=rd)
        grads = torch.autograd.grad([y, h], leaves, [dy, dh])
    assert any(s[0] == "_bwd_fused_kernel" and s[1] == 128 for s in seen), seen
    ref = [t.double().requires_grad_() for t in (x, r, w, b)]
    h64 = ref[0] + ref[1]
    y64 = torch.nn.functional.layer_norm(h64, (shape[1],), ref[2], ref[3], 1e-5)
    g64 = torch.autograd.grad([y64, h64], ref, [dy.double(), dh.double()])
    for name, g, e in zip(("dx", "dresidual", "dweight", "dbias"), grads, g64):
        tol = 0.03 * e.abs().max().item() + 0.02
        assert (g.double() - e).abs().max().item() < tol, name
    # dx and dresidual are the same gradient, each in its input's dtype
    assert grads[0].dtype == x.dtype and grads[1].dtype == r.dtype


def test_the_interpreter_plans_wide_rows_between_one_and_two_fused_limits(monkeypatch):
    # The interpreter profile fuses 4096 columns: 5000 take 2 tiles of 4096, the sweep in
    # 4096-column chunks (the last partial); 9000 would take 3: the looped plan.
    seen = _launched(monkeypatch)
    x, w, b, dy = _rows((3, 5000), torch.float32)
    check_case(x, "layer", weight=w, bias=b, dy=dy)
    assert ("_bwd_fused_kernel", 4096, (1, 2)) in seen, seen
    plan = tritonorm.explain(x, "layer", weight=w, bias=b, op="backward", device="interpreter")
    assert plan.kernel == "fused" and plan.config["wide"] == 2 and plan.config["block_m"] == 4096
    x9 = torch.empty(3, 9000)
    assert "wide" not in tritonorm.explain(x9, "layer", weight=torch.empty(9000), op="backward",
                                           device="interpreter").config


def test_h200_plans_and_their_cost():
    d = 16384
    x = torch.empty(4096, d, dtype=torch.bfloat16)
    w = torch.empty(d, dtype=torch.bfloat16)
    plan = tritonorm.explain(x, "layer", weight=w, bias=w, op="backward", device="h200")
    assert plan.kernel == "fused" and plan.config["wide"] == 2 and plan.config["block_m"] == 8192
    assert plan.config["block_a"] == 8192  # the sweep's chunk is the tile (dispatch.wide_plan)
    c = plan.cost
    # requested: x and dy by the two tiles' sweeps and the tiles' own pass (3 times), dx once,
    # the [2, 66, D] fp32 partials written and read back (dispatch.wide_programs: 132 SMs / 2)
    n = x.nbytes
    assert c.launches == 2
    assert 6 * n < c.bytes_read < 6 * n + 2 * 66 * d * 4 + (1 << 20)
    assert n + 2 * 66 * d * 4 <= c.bytes_written < n + 2 * 66 * d * 4 + (1 << 20)
    # the two sweeps after the first are the L2's by design: 4n of the reads, said apart
    prof = dispatch.profile_named("h200")
    assert c.l2_read == 4 * n and c.l2_us == pytest.approx(4 * n / (prof.hbm_gbps * 1e3))
    assert "meant to come from the L2" in c.summary() and (c.bytes - c.l2_read) / c.ideal < 1.1
    plain = tritonorm.explain(x[:, :8192], "layer", weight=w[:8192], op="backward", device="h200").cost
    assert plain.l2_read == 0 and "L2" not in plain.summary()
    # 8192 columns fuse; 32768 would take 4 tiles: the looped plan
    assert "wide" not in tritonorm.explain(x[:, :8192], "layer", weight=w[:8192], op="backward",
                                           device="h200").config
    x32 = torch.empty(64, 4 * 8192, dtype=torch.bfloat16)
    assert tritonorm.explain(x32, "layer", weight=torch.empty(4 * 8192, dtype=torch.bfloat16), op="backward",
                             device="h200").kernel in ("looped", "split")


def test_the_switch_restores_the_looped_plan(monkeypatch):
    x = torch.empty(4096, 16384, dtype=torch.bfloat16)
    w = torch.empty(16384, dtype=torch.bfloat16)
    monkeypatch.setattr(dispatch, "WIDE_ROWS", False)
    dispatch.clear_memo()
    plan = tritonorm.explain(x, "layer", weight=w, bias=w, op="backward", device="h200")
    assert plan.kernel in ("looped", "split") and "wide" not in plan.config
    assert plan.cost.launches == 2


def test_forced_wide_where_it_cannot_run_takes_the_heuristic(monkeypatch):
    # GroupNorm (per-segment dweight partials) and eval with running statistics cannot take
    # the WIDE kernel: forcing it plans as if nothing were forced, and the result is right.
    seen = _launched(monkeypatch)
    x = torch.randn(3, 4, 5, 6)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    check_case(x, "group", num_groups=2, weight=w, bias=b, dy=torch.randn(3, 4, 5, 6), regime="fused",
               config=dict(op="backward", wide=2, block_a=16))
    assert not any(s[1] for s in seen), seen
    # explain says what the launcher does: the heuristic's plan, not the WIDE one forced
    with dispatch.forced("fused", op="backward", wide=2, block_a=16):
        plan = tritonorm.explain(x, "group", num_groups=2, weight=w, bias=b, op="backward")
    assert "wide" not in plan.config and plan.reason.startswith("heuristic"), plan


def test_the_tuner_measures_the_wide_plan_and_its_neighbours():
    """The tuner's heuristic is the plan the launcher runs (WIDE for LayerNorm 4096x16384), and
    its field holds WIDE at 2 and 4 tiles, sweeping a tile or half a tile a step, beside the
    looped/split plans and torch; rows that fuse whole get no WIDE candidate."""
    from tritonorm.tuning import sweep

    prof = dispatch.profile_named("h200")
    by = {t.case.name: t for t in sweep.tasks(["llm"], ["bf16"], ["backward"], prof)}
    task = by["ln 4096x16384"]
    assert task.heuristic.config.get("wide") == 2 and task.heuristic.reason.startswith("heuristic")
    plans = sweep.candidates(task.problem, prof, task.heuristic)
    assert plans[0] is task.heuristic
    assert {(p.config["wide"], p.config["block_a"]) for p in plans if "wide" in p.config} == {
        (2, 8192), (2, 4096), (4, 4096), (4, 2048)}
    assert {"looped", "split", dispatch.NATIVE} <= {p.kernel for p in plans}
    assert sweep.ranking([(0.2, plans[0])]) == "fused 1x8192 t2 a8192 w16: 200.0"
    small = by["ln 4096x4096"]
    assert not any("wide" in p.config for p in sweep.candidates(small.problem, prof, small.heuristic))
    with pytest.MonkeyPatch.context() as mp:  # the switch off: the looped plan is the heuristic
        mp.setattr(dispatch, "WIDE_ROWS", False)
        assert "wide" not in sweep.heuristic(task.case, "bf16", "backward", task.problem, prof).config


def test_a_stored_wide_plan_is_taken(tmp_path, monkeypatch):
    """A tuned WIDE entry (the tuner's winner) is a well-formed cache entry, and the plan it
    stores is the one that runs (explain, which takes the launcher's decisions); a forward
    problem cannot take one."""
    from tritonorm.tuning import cache, suites, sweep

    monkeypatch.setenv("TRITONORM_CACHE_DIR", str(tmp_path / "cache"))
    cache.reset()
    dispatch.clear_memo()
    try:
        live = dispatch.replace(dispatch.PROFILES["h100"], gpu_name="NVIDIA H100 80GB HBM3", live=True)
        (case,) = [c for c in suites.cases("llm") if c.name == "ln 4096x16384"]
        key = sweep.problem_of(case, "bf16", "backward").key()
        cfg = {"block_p": 1, "block_m": 4096, "num_warps": 16, "wide": 4, "block_a": 2048}
        cache.user_cache(live).put(key, "fused", cfg)
        x = suites.meta_input(case, torch.bfloat16)
        w = torch.empty(case.shape[1], dtype=torch.bfloat16, device="meta")
        plan = tritonorm.explain(x, "layer", weight=w, bias=w, op="backward", device=live)
        assert plan.reason.startswith("cache hit") and plan.kernel == "fused"
        assert (plan.config["wide"], plan.config["block_m"], plan.config["block_a"]) == (4, 4096, 2048)
        fwd = sweep.problem_of(case, "bf16", "forward")
        assert dispatch.fit(dispatch.Plan("fused", cfg, "t"), fwd, live) is None
    finally:
        cache.reset()
        dispatch.clear_memo()


def test_wide_plan_tiles_and_programs():
    prof = dispatch.PROFILES["h200"]
    prob = dispatch.Problem("backward", 4096, 12288, 2, col_run=12288)
    plan = dispatch.wide_plan(prob, prof)
    assert plan.config["wide"] == 2 and plan.config["block_m"] == 8192  # the second tile 4096 of 8192
    assert dispatch.wide_plan(dispatch.Problem("backward", 4096, 8192, 2, col_run=8192), prof) is None
    assert dispatch.wide_plan(dispatch.Problem("forward", 4096, 12288, 2, col_run=12288), prof) is None
    # columns not one contiguous run (BatchNorm NCHW), or statistics along the unit stride: never
    assert dispatch.wide_plan(dispatch.Problem("backward", 64, 12544 * 2, 2, col_run=12544), prof) is None
    assert dispatch.wide_plan(dispatch.Problem("backward", 64, 12288, 2, rows_unit_stride=True,
                                               col_run=12288), prof) is None
    assert dispatch.wide_programs(4096, 2, 132) == 66
    assert dispatch.wide_programs(32, 2, 132) == 4  # at least 8 row blocks a program
    assert dispatch.wide_programs(1, 3, 132) == 1
