"""The benchmark suite without a GPU: the scaled-down correctness-and-dispatch report, and the
pieces the GPU run uses (bytes model, summary) on synthetic rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonorm.bench import bytes_model, cpu, gpu, runner, shapes
from tritonorm.bench.table import combine_passes, format_table, pass_cell

ROOT = Path(__file__).resolve().parent.parent


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
        res = cpu.check_case(small, dt)
        if dt == "fp32":
            assert res["err_y"] < 1e-5 and res["err_grad"] < 1e-4
        else:  # within a few roundings of eager PyTorch's own error
            assert res["err_y"] <= 4 * res["eager_err_y"] + 2 * torch.finfo(torch.bfloat16).eps
        assert "/" in res["plan_here"]


def _interpreter():
    pytest.importorskip("triton")
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("checks the no-GPU report (TRITON_INTERPRET=1)")


def test_cpu_report_subset(capsys, tmp_path):
    _interpreter()
    result = runner.run(suite="llm", name_filter="rms 1x", cpu_dtypes=("fp32",), progress=False,
                        out_dir=tmp_path / "out")
    out = capsys.readouterr().out
    assert "no CUDA GPU here, so nothing is timed" in out and "rms 1x4096" in out and "fused/fused" in out
    rows = result["rows"]
    assert rows and rows[0]["plan_h100"] == "fused/fused" and rows[0]["tiles_h100"] is None
    (written,) = (tmp_path / "out").glob("cpu-report-*.json")  # --out alone: a dated file in it
    data = json.loads(written.read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    prov = data["provenance"]
    assert prov["timed"] is False and "interpreter" in prov["device"]
    assert prov["torch"] == torch.__version__ and prov["tritonorm"] and prov["triton"]
    assert "commit" in prov


def test_looped_regime_really_loops():
    """A row that says its h100 plan (looped/split) was checked ran that kernel over several tiles."""
    _interpreter()
    (case,) = [c for c in shapes.select() if c.name == "ln 4096x16384"]
    small = case.scaled()
    res = cpu.check_case(small, "fp32", [("looped", "looped"), ("split", "split")])
    for pair in ("looped/looped", "split/split"):
        checked = res["regimes"][pair]
        assert checked["tiles"] >= 2 and checked["err"] < 1e-5


def test_bench_runs_outside_the_source_tree(tmp_path):
    """`tritonorm bench` from a directory whose own `benchmarks` package would shadow ours if we
    imported one; --out and --json are honoured."""
    _interpreter()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("raise ImportError('the user project')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "tritonorm", "bench", "--suite", "llm", "--filter", "rms 1x",
                          "--dtype", "fp32", "--quiet", "--out", "results", "--json", "rows.json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "rms 1x4096" in res.stdout and res.stderr == ""  # quiet: no progress bar
    data = json.loads((tmp_path / "rows.json").read_text())
    assert data["provenance"]["command"].startswith("tritonorm bench") and len(data["rows"]) == 1
    assert not (tmp_path / "results").exists()  # --json chose the file; no plots without a GPU


def test_the_bench_package_ships_in_the_wheel():
    setuptools = pytest.importorskip("setuptools")
    found = setuptools.find_packages(str(ROOT), include=["tritonorm*"])
    assert "tritonorm.bench" in found and "tritonorm.tuning" in found
    assert not (ROOT / "benchmarks" / "__init__.py").exists()  # nothing importable as `benchmarks`


def test_format_table_fits_every_cell():
    text = format_table(("case", "err"), [("a very long case name indeed", 1.5e-7), ("b", None)])
    lines = text.splitlines()
    assert len({len(ln) for ln in lines[:2]}) == 1  # header as wide as the widest row
    assert lines[1].endswith("1.5e-07") and lines[2].endswith("-")


def _synthetic_gpu_rows():
    """Made-up rows in the GPU run's format (no measurement): two layouts, two dtypes, a failed
    and a missing provider."""
    rows = []
    for i, (cl, dt) in enumerate([(False, "fp32"), (True, "fp32"), (False, "bf16"), (True, "bf16")]):
        provs = {"tritonorm": {"ms": 1.0 + i, "gbps": 1000.0 + i, "copy_frac": 0.5, "p20": 1, "p80": 1,
                               "method": "do_bench"},
                 "eager": {"ms": 2.0, "gbps": 500.0, "copy_frac": 0.25, "p20": 2, "p80": 2, "method": "do_bench"}}
        if i == 3:
            provs["compile"] = {"error": "RuntimeError: made up"}
        rows.append({"suite": "sd-unet", "case": f"gn {i}", "kind": "group_norm", "shape": [1, 320, 8, 8],
                     "channels_last": cl, "dtype": dt, "mode": "fwd", "bytes": 10**6 * (i + 1),
                     "plan": "fused/fused", "providers": provs, "speedup_eager": 2.0 / (1.0 + i)})
    return rows


def test_gpu_table_and_plots_on_synthetic_rows(tmp_path, capsys):
    rows = _synthetic_gpu_rows()
    gpu.print_table(rows)
    out = capsys.readouterr().out
    assert "error" in out and "tritonorm us" in out and out.count("gn ") == 4
    pytest.importorskip("matplotlib")
    from tritonorm.bench.plots import plot

    (path,) = plot(rows, 3000.0, tmp_path / "plots", "synthetic")
    assert path.name == "synthetic-group_norm-fwd.png" and path.stat().st_size > 10_000
    import matplotlib.pyplot as plt
    from tritonorm.bench.plots import DTYPE_STYLES, PROVIDER_COLOURS, figure

    fig = figure(rows, 3000.0, "t")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["NCHW", "channels_last"]  # one panel per layout
    for ax in panels:
        lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1 or ln.get_marker() != "None"]
        styles = {(ln.get_color(), ln.get_linestyle()) for ln in lines}
        assert (PROVIDER_COLOURS["tritonorm"], DTYPE_STYLES["fp32"][0]) in styles
        assert (PROVIDER_COLOURS["eager"], DTYPE_STYLES["bf16"][0]) in styles
    (legend,) = fig.legends  # outside the panels: its left edge is right of every panel
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert all(box.x0 >= ax.get_window_extent().x1 for ax in panels)
    plt.close(fig)


@pytest.mark.parametrize("with_json", [False, True])
def test_gpu_run_writes_json_and_plots_where_asked(tmp_path, monkeypatch, capsys, with_json):
    """The GPU branch of runner.run with the timing replaced by synthetic rows: --out and --json
    decide where the files go, and the provenance names the device."""
    from types import SimpleNamespace

    rows = _synthetic_gpu_rows()
    monkeypatch.setattr(runner, "on_gpu", lambda: True)
    monkeypatch.setattr(gpu, "run_gpu", lambda *a, **k: (rows, 3000.0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name="Made-up GPU", major=9, minor=0, multi_processor_count=132))
    json_path = tmp_path / "elsewhere" / "rows.json" if with_json else None
    result = runner.run(suite="sd-unet", out_dir=tmp_path / "out", json_path=json_path, progress=False)
    written = json_path if with_json else next((tmp_path / "out").glob("made-up-gpu-*.json"))
    data = json.loads(written.read_text())
    assert data["provenance"]["device"] == "Made-up GPU" and data["provenance"]["timed"] is True
    assert data["provenance"]["copy_gbps"] == 3000.0 and len(data["rows"]) == len(rows)
    assert data["summary"] == json.loads(json.dumps(result["summary"]))
    # The plot needs matplotlib (the bench extra; a GPU machine may lack it: then no plot).
    try:
        import matplotlib  # noqa: F401
        plots = [".png"]
    except ImportError:
        plots = []
    assert [p.suffix for p in (tmp_path / "out").glob("*.png")] == plots


def test_summary_on_synthetic_rows():
    def row(suite, mode, tr, eager, comp, shape=(4096, 4096), dtype="bf16"):
        return {"suite": suite, "case": f"{suite}-{mode}", "mode": mode, "dtype": dtype, "shape": list(shape),
                "providers": {"tritonorm": {"ms": tr, "copy_frac": 0.9}, "eager": {"ms": eager},
                              "compile": {"ms": comp}},
                "speedup_eager": eager / tr, "speedup_compile": comp / tr}
    rows = [row("llm", "fwd+bwd", 1.0, 2.0, 1.5), row("sd-unet", "fwd", 1.0, 3.0, 0.8)]
    s = gpu.summarize(rows)
    assert s["rows_at_least_as_fast_as_best_baseline"] == "1/2"
    assert s["losing_rows"] == ["sd-unet-fwd bf16 fwd"]
    assert math.isclose(s["train_fwd_bwd_geomean_vs_eager"], 2.0)
    assert math.isclose(s["sd_groupnorm_silu_geomean_vs_eager"], 3.0)


def test_bench_test_file_is_not_collected_by_make_test():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert (ROOT / "benchmarks" / "test_bench.py").is_file()


def test_host_passes_combine_into_medians_with_their_runs():
    # python -m tritonorm.bench.host --repeat N: each figure the median of the passes, the runs kept
    passes = [[{"case": "a", "ours_fwd_us": v, "eager_fwd_us": 2.0 * v}, {"case": "m", "ours_fwd_us": 40.0 + v}]
              for v in (10.0, 30.0, 20.0)]
    rows = combine_passes(passes, ("ours_fwd_us", "eager_fwd_us", "ours_fwd_bwd_us"))
    assert [r["case"] for r in rows] == ["a", "m"]
    assert rows[0]["ours_fwd_us"] == 20.0 and rows[0]["ours_fwd_us_runs"] == [10.0, 30.0, 20.0]
    assert rows[0]["eager_fwd_us"] == 40.0 and "ours_fwd_bwd_us" not in rows[0]
    assert rows[1]["ours_fwd_us"] == 60.0
    assert pass_cell(rows[0], "ours_fwd_us") == "10.0-30.0 (20.0)"
    assert pass_cell(rows[0], "ours_fwd_bwd_us") == ""
    one = combine_passes(passes[:1], ("ours_fwd_us",))
    assert one == passes[0] and pass_cell(one[0], "ours_fwd_us") == "10.0"
