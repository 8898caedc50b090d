"""The GPU report (python -m tritonorm.gpu_report) rehearsed on CPU: the dry run end to end in a
temporary folder, the budget's skip path, the 8-file rule, and the pytest plugin that stops the
test stage at its deadline. No GPU, and nothing timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tritonorm.gpu_report import main as report, proc, selection, summary

ROOT = Path(__file__).resolve().parent.parent


def _run(args, timeout):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the report sets it per stage
    return subprocess.run([sys.executable, "-m", "tritonorm.gpu_report", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = _run(["--dry-run", "--quick", "--out", str(out)], timeout=170)
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert 0 < len(files) <= proc.MAX_FILES
    assert all(proc.NAME_OK.match(name) for name in files)
    assert {"report.log", "summary.json", "tests.xml", "bench.json", "checks.json", "host.json"} <= set(files)
    doc = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in doc["stages"]] == [s for s, _, _ in report.STAGES]
    assert all(s["status"] == "ok" for s in doc["stages"]), doc["stages"]
    assert doc["dry_run"] and doc["files"] == files
    # the subset collected, and the one test run passed
    assert doc["tests"]["passed"] == 1 and doc["tests"]["failures"] == 0
    # the bench rows carry made-up numbers, marked so in the rows and the provenance
    bench = json.loads((out / "bench.json").read_text())
    assert bench["provenance"]["dry_run"] and "made-up" in bench["provenance"]["note"]
    assert bench["rows"] and all(r["dry_run"] and r["providers"]["tritonorm"]["method"].startswith("dry-run")
                                 for r in bench["rows"])
    checks = json.loads((out / "checks.json").read_text())
    assert checks["launches"] and all(isinstance(r.get("measured"), int) for r in checks["launches"])
    # the summary is the last thing printed, and the log holds the same lines
    lines = res.stdout.rstrip("\n").splitlines()
    assert lines[-1].startswith("gpu_report: ok in ")
    assert any(ln.startswith("stage ") and "status" in ln for ln in lines[-30:])
    assert (out / "report.log").read_text().rstrip("\n").splitlines()[-1] == lines[-1]
    print(f"dry run: {wall:.1f} s wall, stages {[(s['name'], s.get('seconds')) for s in doc['stages']]}")


def test_stages_that_do_not_fit_are_skipped_with_a_note(tmp_path, capsys):
    code = report.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "10"])
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert code == 0
    for stage in doc["stages"]:
        assert stage["status"] == "skipped" and "s left" in stage["note"], stage
    assert capsys.readouterr().out.rstrip("\n").splitlines()[-1].startswith("gpu_report: ok")


def test_enforce_limits_removes_the_reports_own_extras(tmp_path):
    log = proc.Log(tmp_path / "report.log")
    for i in range(9):
        (tmp_path / f"extra{i}.png").write_text("x")
    (tmp_path / "bad name.json").write_text("x")
    res = proc.enforce_limits(tmp_path, ["report.log"], log)
    log.close()
    assert len(res["files"]) == proc.MAX_FILES and "report.log" in res["files"]
    assert any("bad name.json" in p for p in res["problems"])


def test_junit_counts(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="boom"/></testcase>'
        '</testsuite></testsuites>')
    counts = summary.junit(tmp_path / "j.xml")
    assert (counts["passed"], counts["failures"], counts["skipped"]) == (2, 1, 1)
    assert counts["failing"] == ["tests.test_a::test_bad"]


def test_budget_plugin_stops_pytest_and_keeps_the_junit_file(tmp_path):
    (tmp_path / "test_three.py").write_text("def test_a(): pass\ndef test_b(): pass\ndef test_c(): pass\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITONORM_TEST_DEADLINE=str(time.time() - 1))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                          "tritonorm.gpu_report.pytest_budget", f"--junitxml={tmp_path / 'j.xml'}",
                          "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_three.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout  # interrupted after the first test
    counts = summary.junit(tmp_path / "j.xml")
    assert counts["passed"] == 1


@pytest.mark.parametrize("node", selection.node_ids() + list(selection.DRY_RUN_TESTS))
def test_selection_names_existing_files(node):
    assert (ROOT / node.split("::")[0]).is_file()


def test_tune_budget_keeps_whole_problems_only(monkeypatch):
    from tritonorm import dispatch
    from tritonorm.tuning import sweep

    profile = dispatch.profile_named("h200")
    tasks = sweep.tasks(["sd-unet"], ["bf16"], ["forward"], profile)[:2]
    calls = []

    def fake_measure(task, plan, device):  # no GPU: a made-up time, after a real pause
        calls.append(plan)
        time.sleep(0.01)
        return 1.0 + 0.01 * len(calls)

    monkeypatch.setattr(sweep, "measure", fake_measure)
    everything = sweep.tune(tasks, profile, "cpu")
    assert len(everything) == 2 and len(calls) == sum(len(sweep.candidates(t.problem, profile, t.heuristic)) for t in tasks)
    calls.clear()
    cut = sweep.tune(tasks, profile, "cpu", deadline=time.monotonic() + 0.03)
    assert cut == {} and 0 < len(calls) < len(sweep.candidates(tasks[0].problem, profile, tasks[0].heuristic))


def test_bench_rows_beside_the_l2_model(tmp_path):
    """bf16 rows of calls the L2 model covers get the cost model's us less the served bytes at
    the h200 bandwidth; other dtypes and uncovered cases do not."""
    from tritonorm import dispatch

    doc = {"rows": [{"case": "bn 64x112^2 b32",
                     "fwd": {"modelled": True, "planned@1": {"l2_served_mib": 10.0}},
                     "bwd": {"modelled": True, "planned@1": {"l2_served_mib": 20.0}}},
                    {"case": "ln 4096x4096", "fwd": {"modelled": False}, "bwd": {"modelled": False}}]}
    (tmp_path / "l2-h200-bf16-2026-01-01.json").write_text(json.dumps({"rows": []}))
    (tmp_path / "l2-h200-bf16-2026-12-01.json").write_text(json.dumps(doc))  # the newest is read
    served = summary.l2_served(tmp_path)
    assert served[("bn 64x112^2 b32", "fwd")] == 10 * 2**20
    assert served[("bn 64x112^2 b32", "fwd+bwd")] == 30 * 2**20
    assert served[("ln 4096x4096", "fwd")] == 0.0

    def row(case, dtype, mode, ms, model_us):
        return {"suite": "s", "case": case, "dtype": dtype, "mode": mode, "bytes": 1,
                "providers": {"tritonorm": {"ms": ms}}, "model": {"us": model_us, "launches": 2}}

    bench = {"rows": [row("bn 64x112^2 b32", "bf16", "fwd+bwd", 0.1, 90.0),
                      row("bn 64x112^2 b32", "fp32", "fwd+bwd", 0.1, 90.0),
                      row("ln 4096x4096", "bf16", "fwd", 0.02, 10.0)]}
    lines = summary.beside(bench, None, None, served)
    gbps = dispatch.PROFILES["h200"].hbm_gbps
    assert lines[0]["l2_model_us"] == pytest.approx(90.0 - 30 * 2**20 / (gbps * 1e3))
    assert lines[0]["measured_over_l2_model"] == pytest.approx(100.0 / lines[0]["l2_model_us"])
    assert "l2_model_us" not in lines[1] and "l2_model_us" not in lines[2]
    assert "L2 model us" in summary.beside_table(lines)
    # The dry run's rows are scaled down: the suite shapes' served bytes do not apply (they
    # exceeded its tiny model us, and the ratio divided by zero at the end of the dry run); a
    # served figure past the model us gives 0 and no ratio.
    scaled = dict(row("bn 64x112^2 b32", "bf16", "fwd+bwd", 0.001, 8.0), dry_run=True)
    over = row("bn 64x112^2 b32", "bf16", "fwd+bwd", 0.001, 1.0)
    lines = summary.beside({"rows": [scaled, over]}, None, None, served)
    assert "l2_model_us" not in lines[0] and "measured_over_l2_model" not in lines[0]
    assert lines[1]["l2_model_us"] == 0.0 and "measured_over_l2_model" not in lines[1]
    summary.beside_table(lines)
