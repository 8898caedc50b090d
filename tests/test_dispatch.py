"""The dispatcher: plans for the model suites on a GPU profile (made on any machine), shape
buckets that keep compiled block sizes independent of the batch size, and the plan sources
(forced > cache > shipped table > heuristic)."""

from __future__ import annotations

import json

import pytest
import torch

from tritonorm import dispatch
from tritonorm.explain import explain
from tritonorm.tuning import cache, suites


def _meta_kwargs(case, dtype):
    kw = {"num_groups": case.num_groups, "center": case.center, "activation": case.activation,
          "sample_groups": case.sample_groups}
    if case.affine:
        kw["weight"] = torch.empty(case.shape[1], dtype=dtype, device="meta")
        if case.center:
            kw["bias"] = torch.empty(case.shape[1], dtype=dtype, device="meta")
    return kw


def _plan(case, dtype=torch.float32, op="forward", device="h100"):
    x = suites.meta_input(case, dtype)
    return explain(x, case.scope, device=device, op=op, **_meta_kwargs(case, dtype))


def _case(name):
    (case,) = [c for c in suites.cases() if c.name == name]
    return case


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONORM_CACHE_DIR", str(tmp_path / "cache"))
    cache.reset()
    yield
    cache.reset()


# Expected regimes on the h100 profile, with why each is the sensible one.
EXPECTED = [
    # 64 channels of 401408 elements: one program per channel would leave 68 of 132 SMs idle.
    ("bn 64x112^2 b32", "forward", "split"),
    ("bn 64x112^2 b256", "backward", "split"),
    ("bn 64x112^2 b256 cl", "forward", "split"),
    # 2048 channels of 1568 elements: whole statistics fit in registers, enough programs.
    ("bn 2048x7^2 b32", "forward", "fused"),
    # Stable Diffusion at batch 1: 32 statistics of 40960 elements -> split, not 32 programs.
    ("gn32+silu 320x64^2 b1", "forward", "split"),
    ("gn32+silu 320x64^2 b1 cl", "backward", "split"),
    # Small tensors (80 KiB): launch-latency bound, one fused launch.
    ("gn32+silu 1280x8^2 b1", "forward", "fused"),
    # LLM rows: statistic in registers, thousands of rows.
    ("ln 4096x4096", "forward", "fused"),
    ("rms 4096x8192", "backward", "fused"),
    ("ln 1x4096", "forward", "fused"),
    # A 16384-wide fp32 row is past the backward's register budget: fused WIDE, two column
    # tiles a row, each program summing the whole rows first (dispatch.wide_plan).
    ("ln 4096x16384", "backward", "fused"),
    ("in3d 32x128^3 b2", "forward", "split"),
]


@pytest.mark.parametrize("name,op,kernel", EXPECTED)
def test_suite_plans_on_h100(name, op, kernel):
    plan = _plan(_case(name), op=op)
    assert plan.kernel == kernel, plan
    # channels_last GroupNorm with 10-40 channels a group: kernels/pixels.py's plan; NCHW
    # BatchNorm at 7^2/14^2: kernels/planes.py's
    assert plan.reason.startswith(("heuristic", "channels_last pixel tiles", "NCHW channel planes"))
    assert "h100" in plan.reason


def test_fp32_fused_forward_rows_of_8192_take_8_warps():
    """Triton 3.6's ptxas spilled the fused LayerNorm 4096x8192 fp32 forward on 16 warps
    (docs/compiled.md): fp32 blocks of up to 8192 elements run on 8; 16-bit rows and wider
    fp32 ones keep the tile rule."""
    for name, dtype, warps in (("ln 4096x8192", torch.float32, 8), ("ln 4096x8192", torch.bfloat16, 16),
                               ("rms 4096x8192", torch.float32, 8), ("ln 4096x16384", torch.float32, 16)):
        plan = _plan(_case(name), dtype=dtype, device="h200")
        assert plan.kernel == "fused" and plan.config["num_warps"] == warps, (name, dtype, plan)
    # The backward holds x and dy and has its own limits: unchanged.
    assert _plan(_case("ln 4096x8192"), dtype=torch.float32, op="backward",
                 device="h200").config["num_warps"] == 16


def test_every_suite_shape_gets_a_runnable_plan():
    programs_seen = set()
    for case in suites.cases():
        for dtype in (torch.float32, torch.bfloat16):
            for op in ("forward", "backward", "dwdb"):
                plan = _plan(case, dtype, op)
                cfg = plan.config
                assert plan.kernel in dispatch.REGIMES
                if "cb" in cfg:  # the whole-pixel kernels (channels_last GroupNorm, kernels/pixels.py)
                    assert op != "dwdb" and case.channels_last and case.kind in ("group_norm", "instance_norm")
                    hw = _plan_problem(case, dtype, op).M // (case.shape[1] // (case.num_groups or case.shape[1]))
                    assert (cfg["cb"] * dtype.itemsize) % 16 == 0 and case.shape[1] % cfg["cb"] == 0
                    for k in ("block_hw", "num_warps"):
                        assert cfg[k] >= 1 and cfg[k] & (cfg[k] - 1) == 0, (case.name, plan)
                    assert (plan.kernel == "fused") == (cfg["block_hw"] >= hw)
                    assert (cfg["split"] > 1) == (plan.kernel == "split")
                    continue
                if "planes" in cfg:  # flat channel blocks (NCHW BatchNorm, H*W not 16k: kernels/planes.py)
                    # (Ghost BatchNorm too: a program per channel block and sample group)
                    assert op != "dwdb" and not case.channels_last and case.kind.endswith("batch_norm")
                    hw = case.shape[2] * case.shape[3]
                    assert hw % 16 and (cfg["planes"] * hw * dtype.itemsize) % 16 == 0
                    assert case.shape[1] % cfg["planes"] == 0
                    for k in ("block_n", "num_warps"):
                        assert cfg[k] >= 1 and cfg[k] & (cfg[k] - 1) == 0, (case.name, plan)
                    assert (plan.kernel == "fused") == (cfg["block_n"] >= case.shape[0] // case.sample_groups)
                    continue
                for k in ("block_p", "block_m", "num_warps"):
                    assert cfg[k] >= 1 and cfg[k] & (cfg[k] - 1) == 0, (case.name, plan)
                if plan.kernel == "fused":
                    # WIDE (rows past the fused limit): its column tiles cover the row
                    tiles = cfg.get("wide", 1)
                    assert 1 <= tiles <= dispatch.WIDE_MAX_TILES and (tiles == 1 or op == "backward")
                    assert tiles * cfg["block_m"] >= _plan_problem(case, dtype, op).M
                    assert cfg["block_p"] * cfg["block_m"] <= 32768
                else:
                    assert 1 <= cfg["split"] <= dispatch.MAX_SPLIT
                    assert (cfg["split"] > 1) == (plan.kernel == "split")
                programs_seen.add((plan.kernel, tuple(sorted(cfg.items()))))
    # Distinct plans across the suites, not one configuration for everything.
    assert len({k for k, _ in programs_seen}) == 3
    assert len(programs_seen) >= 10


def _plan_problem(case, dtype, op):
    from tritonorm.tuning.sweep import problem_of

    return problem_of(case, {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype], op)


def test_no_program_per_statistic_starvation():
    """The classic failures: one program per channel (ResNet BN at 112^2) or per (sample, group)
    (SD GroupNorm at batch 1) leaves most SMs idle."""
    sms = dispatch.PROFILES["h100"].sm_count
    for name in ("bn 64x112^2 b32", "gn32+silu 320x64^2 b1", "gn32+silu 640x32^2 b1"):
        case = _case(name)
        plan = _plan(case)
        problem = _plan_problem(case, torch.float32, "forward")
        programs = -(-problem.P // plan.config["block_p"]) * plan.config.get("split", 1)
        assert programs >= 2 * sms, (name, plan)


@pytest.mark.parametrize("shape_a,shape_b", [
    ((32, 64, 112, 112), (256, 64, 112, 112)),   # BN: batch changes M only
    ((2, 320, 64, 64), (8, 320, 64, 64)),         # GN: batch changes P
    ((3000, 4096), (4096, 4096)),                 # LN rows in the same bucket
])
def test_block_sizes_do_not_follow_the_batch(shape_a, shape_b):
    """Compiled parameters (BLOCK_P, BLOCK_M, num_warps) depend on M and the bucket of P only, so
    a new batch size does not recompile; split is a runtime argument (a power of two)."""
    scope = {4: "batch", 2: "C"}[len(shape_a)] if shape_a[1] != 320 else "group"
    plans = [explain(torch.empty(s, device="meta"), scope, device="h100") for s in (shape_a, shape_b)]
    a, b = (p.config for p in plans)
    if scope != "group":
        assert (a["block_p"], a["block_m"], a["num_warps"]) == (b["block_p"], b["block_m"], b["num_warps"])
    for cfg in (a, b):
        split = cfg.get("split", 1)
        assert split & (split - 1) == 0


def test_plan_is_pure_and_bucketed():
    p = dispatch.Problem("forward", P=3000, M=1000, elem_bytes=2)
    q = dispatch.Problem("forward", P=4096, M=1024, elem_bytes=2)
    prof = dispatch.PROFILES["h200"]
    assert dispatch.choose(p, prof) == dispatch.choose(p, prof)
    assert dispatch.choose(p, prof).config == dispatch.choose(q, prof).config
    assert p.key().endswith("P4096|M1024") and p.key() == q.key()


def test_explain_matches_what_the_launcher_runs(device):
    """explain(x) on this machine equals the plan plan_for sees inside the launcher."""
    if device.type != "cuda":
        pytest.importorskip("triton")
    seen = []
    real = dispatch.plan_for

    def spy(problem, profile):
        plan = real(problem, profile)
        seen.append((problem.op, plan))
        return plan

    x = torch.randn(2, 8, 6, 6, device=device)  # NCHW: the row/column kernels' plan
    w = torch.randn(8, device=device)
    expected = explain(x, "group", num_groups=4, weight=w, activation="silu")
    try:
        dispatch.plan_for = spy
        import tritonorm

        tritonorm.norm(x, "group", num_groups=4, weight=w, activation="silu")
    finally:
        dispatch.plan_for = real
    fwd = [p for op, p in seen if op == "forward"]
    assert fwd and fwd[0].kernel == expected.kernel and fwd[0].config == expected.config


def test_explain_matches_the_whole_pixel_plans(device):
    """channels_last GroupNorm with 2 channels a group runs kernels/pixels.py: explain shows the
    plan the launcher's forward and backward plans hold."""
    if device.type != "cuda":
        pytest.importorskip("triton")
    from tritonorm.kernels import launch

    x = torch.randn(2, 8, 6, 6, device=device).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(8, device=device, requires_grad=True)
    launch.clear()
    import tritonorm

    tritonorm.norm(x, "group", num_groups=4, weight=w, activation="silu").sum().backward()
    (plan,) = [p for p in launch._PLANS.values() if isinstance(p, launch.ForwardPlan)]
    assert plan.pixels is not None
    for op, ran in (("forward", plan.plan), ("backward", next(iter(plan._backward.values())).pixels.plan)):
        expected = explain(x, "group", num_groups=4, weight=w, activation="silu", op=op)
        assert (ran.kernel, ran.config) == (expected.kernel, expected.config), op


def test_explain_matches_the_planes_plans_with_sample_groups(device):
    """Ghost BatchNorm in NCHW at 7^2 runs kernels/planes.py with a program per (channel block,
    sample group): explain shows the plans the launcher's forward and backward plans hold, and
    counts their launches (the backward's second: the finish adding the [2, S, C] partials)."""
    if device.type != "cuda":
        pytest.importorskip("triton")
    import tritonorm
    from tritonorm.kernels import launch

    # 2 blocks of 4 channels x S groups of 2 samples: S enough for half the device's SMs.
    s = max(2, -(-dispatch.profile_for_device(device).sm_count // 4))
    x = torch.randn(2 * s, 8, 7, 7, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    kw = dict(sample_groups=s, weight=w, activation="relu", running_mean=rm, running_var=rv)
    launch.clear()
    tritonorm.norm(x, "batch", **kw).sum().backward()
    (plan,) = [p for p in launch._PLANS.values() if isinstance(p, launch.ForwardPlan)]
    assert plan.planes is not None
    bplan = next(iter(plan._backward.values()))
    for op, ran, launches in (("forward", plan.plan, plan.launches), ("backward", bplan.planes.plan, bplan.launches)):
        expected = explain(x, "batch", op=op, **kw)
        assert (ran.kernel, ran.config) == (expected.kernel, expected.config), op
        assert expected.cost.launches == launches == (1 if op == "forward" else 2), op


def test_explain_reference_and_errors():
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    assert explain(x, "group", num_groups=4).kernel == "reference"
    assert explain(torch.empty(0, 8, 4, 4, device="meta"), "group", num_groups=4,
                   device="h100").kernel == "none"
    with pytest.raises(ValueError, match="not a known profile"):
        explain(torch.empty(2, 8, device="meta"), "C", device="a100x")
    with pytest.raises(ValueError, match="op="):
        explain(torch.empty(2, 8, device="meta"), "C", device="h100", op="sideways")
    with pytest.raises(ValueError, match="num_groups"):
        explain(torch.empty(2, 6, 3, device="meta"), "group", num_groups=4, device="h100")


def test_forced_overrides_and_restricts_to_op():
    prob_f = dispatch.Problem("forward", P=64, M=1000, elem_bytes=4)
    prob_b = dispatch.Problem("backward", P=64, M=1000, elem_bytes=4)
    prof = dispatch.PROFILES["h100"]
    with dispatch.forced("split", block_m=64, split=4):
        assert dispatch.plan_for(prob_f, prof).config["split"] == 4
        assert dispatch.plan_for(prob_b, prof).kernel == "split"
    with dispatch.forced("looped", op="backward", num_warps=8):
        assert dispatch.plan_for(prob_f, prof).reason.startswith("heuristic")
        plan = dispatch.plan_for(prob_b, prof)
        assert plan.kernel == "looped" and plan.config["num_warps"] == 8
    with pytest.raises(ValueError):
        with dispatch.forced("bogus"):
            pass


def _write_table(path, entries, capability="9.0"):
    path.write_text(json.dumps({"format": cache.FORMAT, "version": cache.VERSION, "kind": "table",
                                "validators": {"capability": capability}, "provenance": {},
                                "entries": entries}))


def test_shipped_tables_are_honest():
    for name in ("h100", "h200"):
        table = cache.shipped_table(name)
        assert table.provenance.get("status") in ("not yet tuned", "tuned")
        if table.provenance["status"] == "not yet tuned":
            assert len(table) == 0
        else:  # measured: when, how (tuning/build_tables.py writes both)
            assert len(table) > 0 and table.provenance.get("date") and table.provenance.get("command")


def test_table_then_cache_take_precedence(tmp_path, monkeypatch):
    case = _case("gn32+silu 320x64^2 b1")
    problem = _plan_problem(case, torch.float32, "forward")
    key = problem.key()
    tpath = tmp_path / "h100.json"
    _write_table(tpath, {key: {"kernel": "looped", "config": {"block_p": 1, "block_m": 2048,
                                                             "num_warps": 8, "split": 1}}})
    monkeypatch.setattr(cache, "table_path", lambda name: tpath)
    cache.reset()
    plan = _plan(case)
    assert plan.kernel == "looped" and plan.reason.startswith("shipped table h100")
    # A table entry that cannot run this problem (fused block narrower than M) is skipped.
    _write_table(tpath, {key: {"kernel": "fused", "config": {"block_p": 1, "block_m": 1024, "num_warps": 4}}})
    cache.reset()
    assert _plan(case).reason.startswith("heuristic")
    # A live device's user cache beats the table; the torch regime is selectable from it.
    live = dispatch.replace(dispatch.PROFILES["h100"], gpu_name="NVIDIA H100 80GB HBM3", live=True)
    cache.user_cache(live).put(key, "torch", {})
    plan = _plan(case, device=live)
    assert plan.kernel == "torch" and plan.reason.startswith("cache hit")
    # ... but a profile made on a CPU for "h100" never reads the user's cache.
    assert _plan(case).kernel != "torch"


def test_native_regime_runs(device):
    """The torch regime (selected only by measurements or forced) gives the same results."""
    pytest.importorskip("triton")
    import tritonorm

    x = torch.randn(2, 8, 5, 5, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    for scope, kw in (("group", {"num_groups": 4}), ("batch", {}), ("HW", {"center": False})):
        with dispatch.forced("torch"):
            y = tritonorm.norm(x, scope, weight=w, bias=b if kw.get("center", True) else None,
                               activation="gelu", **kw)
            g = torch.autograd.grad(y.square().sum(), (x, w))
        yr = tritonorm.norm(x, scope, weight=w, bias=b if kw.get("center", True) else None,
                            activation="gelu", backend="reference", **kw)
        gr = torch.autograd.grad(yr.square().sum(), (x, w))
        torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
        for a, r in zip(g, gr):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_profile_from_properties_uses_real_sm_count():
    prof = dispatch.profile_from_properties("NVIDIA H100 PCIe", 114, (9, 0))
    assert prof.table == "h100" and prof.sm_count == 114 and prof.live
    other = dispatch.profile_from_properties("NVIDIA A100-SXM4-80GB", 108, (8, 0))
    assert other.table is None and other.sm_count == 108


def test_explain_dwdb_says_when_the_call_runs_no_sweep_of_its_own():
    w = torch.empty(4096, dtype=torch.bfloat16, device="meta")
    rows = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    # LayerNorm rows: dweight/dbias come out of the dx pass (fused: per-program column sums).
    assert "not run by this call" in explain(rows, "layer", weight=w, bias=w, device="h200",
                                                       op="dwdb").reason
    assert "no weight or bias" in explain(rows, "layer", device="h200", op="dwdb").reason
    # GroupNorm at SD's 320x64^2: the looped/split backward's sums kernel on the segment view runs.
    x = torch.empty(2, 320, 64, 64, dtype=torch.bfloat16, device="meta")
    wc = torch.empty(320, dtype=torch.bfloat16, device="meta")
    plan = explain(x, "group", num_groups=32, weight=wc, bias=wc, device="h200", op="dwdb")
    assert "not run" not in plan.reason
