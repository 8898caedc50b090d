"""The benchmark suite without a GPU: the scaled-down correctness-and-dispatch report, and the
pieces the GPU run uses (bytes model, summary) on synthetic rows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bytes_model, runner, shapes  # noqa: E402


def test_registry_covers_the_issue_shapes():
    names = {c.name for c in shapes.select()}
    for stage in ("64x112^2", "256x56^2", "512x28^2", "1024x14^2", "2048x7^2"):
        assert f"bn {stage} b32" in names and f"bn {stage} b256" in names
    for b in (1, 2, 8):
        assert f"gn32+silu 320x64^2 b{b}" in names and f"gn32+silu 1280x8^2 b{b} cl" in names
    for d in (1024, 16384):
        assert f"ln 4096x{d}" in names and f"rms 4096x{d}" in names
    for rows in (1, 32, 256):
        assert f"ln {rows}x4096" in names
    assert any(c.kind == "instance_norm" and len(c.shape) == 5 for c in shapes.select())


def test_bytes_model():
    case = [c for c in shapes.select("llm") if c.name == "ln 4096x1024"][0]
    t = 4096 * 1024 * 2
    stats = 4096 * 8
    assert bytes_model.bytes_moved(case, 2, "fwd") == 2 * t + 2 * 1024 * 2
    assert bytes_model.bytes_moved(case, 2, "bwd") == 3 * t + 1024 * 2 + 2 * 1024 * 2 + stats
    assert bytes_model.bytes_moved(case, 2, "fwd+bwd") == (bytes_model.bytes_moved(case, 2, "fwd")
                                                          + bytes_model.bytes_moved(case, 2, "bwd"))


@pytest.mark.parametrize("name", ["bn 64x112^2 b32", "gn32+silu 320x64^2 b1 cl", "rms 4096x1024",
                                  "in3d 64x64^3 b2"])
def test_scaled_case_is_correct_in_the_interpreter(name):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not __import__("os").environ.get("TRITON_INTERPRET"):
        pytest.skip("needs the interpreter or a GPU")
    (case,) = [c for c in shapes.select() if c.name == name]
    small = case.scaled()
    assert small.numel <= 20000 and small.scope == case.scope and small.channels_last == case.channels_last
    for dt in ("fp32", "bf16"):
        res = runner.check_case(small, dt)
        if dt == "fp32":
            assert res["err_y"] < 1e-5 and res["err_grad"] < 1e-4
        else:  # within a few roundings of eager PyTorch's own error
            assert res["err_y"] <= 4 * res["eager_err_y"] + 2 * torch.finfo(torch.bfloat16).eps
        assert "/" in res["plan_here"]


def test_cpu_report_subset(capsys):
    pytest.importorskip("triton")
    rows = runner.run(suite="llm", name_filter="rms 1x", cpu_dtypes=("fp32",))
    out = capsys.readouterr().out
    assert "Timings need a GPU" in out and "rms 1x4096" in out and "fused/fused" in out
    assert rows and rows[0]["plan_h100"] == "fused/fused"


def test_summary_on_synthetic_rows():
    def row(suite, mode, tr, eager, comp, shape=(4096, 4096), dtype="bf16"):
        return {"suite": suite, "case": f"{suite}-{mode}", "mode": mode, "dtype": dtype, "shape": list(shape),
                "providers": {"tritonorm": {"ms": tr, "copy_frac": 0.9}, "eager": {"ms": eager},
                              "compile": {"ms": comp}},
                "speedup_eager": eager / tr, "speedup_compile": comp / tr}
    rows = [row("llm", "fwd+bwd", 1.0, 2.0, 1.5), row("sd-unet", "fwd", 1.0, 3.0, 0.8)]
    s = runner.summarize(rows)
    assert s["rows_at_least_as_fast_as_best_baseline"] == "1/2"
    assert s["losing_rows"] == ["sd-unet-fwd bf16 fwd"]
    assert math.isclose(s["train_fwd_bwd_geomean_vs_eager"], 2.0)
    assert math.isclose(s["sd_groupnorm_silu_geomean_vs_eager"], 3.0)


def test_bench_test_file_is_not_collected_by_make_test():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert (ROOT / "benchmarks" / "test_bench.py").is_file()
