"""The GPU report's ``wall`` stage rehearsed on CPU: its dry run in the interpreter on the
first (scaled) case, the JSON's structure, the launch counters counting real launches and
leaving Triton as they found it; the same counters on compiled-mode Triton with the launch
stubbed (the host benchmark's stand-in driver), where launches go direct; and the fold of
wall.json into the summary when the report would have more files than the device tool
returns. No GPU, and nothing timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tritonorm.gpu_report import main as report, proc, wall_stage


def _launchers_hooks():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from tritonorm.kernels import fastlaunch

    return JITFunction.__dict__["run"], InterpretedFunction.__dict__["run"], fastlaunch.ON_DIRECT_LAUNCH[0]


def test_every_case_is_in_the_suites():
    assert [(c.suite, c.name) for c in wall_stage.build_cases(False, None)] == list(wall_stage.CASES)


def test_dry_run_structure_and_counts(tmp_path, capsys):
    before = _launchers_hooks()
    path = tmp_path / "wall.json"
    calls = 2
    assert wall_stage.main(["--json", str(path), "--dry-run", "--cases", "1", "--calls", str(calls),
                            "--profile-calls", "1"]) == 0
    assert _launchers_hooks() == before  # Triton's run and fastlaunch's hook put back
    doc = json.loads(path.read_text())
    assert doc["dry_run"] and doc["meaningful"] is False and "NOT meaningful" in doc["note"]
    assert doc["stopped"] is None
    rows = doc["rows"]
    assert [(r["case"], r["mode"]) for r in rows] == [("rms 32x4096", m) for m in wall_stage.MODES]
    per_call = {}
    for r in rows:
        assert "error" not in r, r
        for label in ("tritonorm", "tritonorm fastlaunch off", "eager"):
            m = r[label]
            assert "error" not in m, (label, m)
            assert m["calls"] == calls and m["wall_us"] > 0 and m["enqueue_us"] <= m["wall_us"]
            assert m["events_us"] is None  # no CUDA events without a GPU
        ours = r["tritonorm"]
        # the interpreter has no compiled kernel: every launch goes through run, counted by kernel
        assert ours["run_per_call"] >= 1 and ours["direct_per_call"] == 0
        assert sum(ours["run_kernels"].values()) == ours["run_per_call"] * calls
        assert r["tritonorm fastlaunch off"]["run_per_call"] == ours["run_per_call"]
        assert r["eager"]["run_per_call"] == 0 and r["eager"]["direct_per_call"] == 0  # torch's own not counted
        assert r["sync_probe"]["tritonorm"] == {"skipped": "no GPU"} and r["sync_debug"] == {"skipped": "no GPU"}
        per_call[r["mode"]] = ours["run_per_call"]
    fb = rows[1]
    # fwd+bwd's halves add up to its launches
    assert fb["tritonorm fwd (grad)"]["run_per_call"] + fb["tritonorm bwd"]["run_per_call"] == per_call["fwd+bwd"]
    assert per_call["fwd+bwd"] > per_call["fwd"]
    # the profiles see tritonorm's call path; torch.profiler sees its autograd function
    assert [(p["case"], p["mode"]) for p in doc["profiles"]] == [("rms 32x4096", m) for m in wall_stage.MODES]
    for p in doc["profiles"]:
        assert "error" not in p, p
        assert "tritonorm/core.py" in p["cumulative"] and "Ordered by: internal time" in p["tottime"]
    assert "_NormFunction" in doc["torch_profile"]["table"]
    lc = doc["launch_costs"]
    assert lc["kernel[grid]"]["run"] == calls and lc["launcher"]["run"] == calls and lc["launcher"]["usable"] is False
    assert "error" not in doc["launchers"], doc["launchers"]
    assert doc["launchers"]["alive"] > 0 and doc["launchers"]["usable"] == 0
    assert doc["sleep"] == {"cycles": None, "ms": None}
    out = capsys.readouterr().out
    assert "ours wall" in out and "fl-off wall" in out  # the table, in the stage's output


def test_wall_json_folds_into_the_summary_when_over_the_file_limit(tmp_path):
    log = proc.Log(tmp_path / report.FILES["log"])
    ctx = report.Context(tmp_path, True, log)
    wall = {"rows": [{"case": "x"}]}
    ctx.path("wall").write_text(json.dumps(wall))
    doc = {}
    report._fold_extras(ctx, doc)  # 3 files: stays
    assert ctx.path("wall").exists() and "wall" not in doc
    for key in ("tests", "bench", "checks", "tune", "host", "plot"):
        ctx.path(key).write_text("{}")
    report._fold_extras(ctx, doc)  # 9 with the summary to come: folded
    log.close()
    assert not ctx.path("wall").exists() and doc["wall"] == wall
    assert len(list(tmp_path.iterdir())) + 1 == proc.MAX_FILES


_STUBBED = """
import json
import tritonorm.bench.host as host  # compiled-mode Triton, the launch stubbed
from tritonorm.gpu_report import wall_stage as ws
from tritonorm.kernels import fastlaunch
from tritonorm.tuning import suites

case = [c for c in suites.cases("llm") if c.name == "ln 4096x4096"][0].scaled()
env = ws.Env(False, 3)
out = {}
with host.stubbed():
    ws.COUNTS.install()
    try:
        fn = ws.functions(case, "fwd+bwd", "cpu")["tritonorm"]
        out["on"] = env.wall(fn)
        with fastlaunch.enabled(False):
            out["off"] = env.wall(fn)
        out["launchers"] = ws.launchers()
        out["costs"] = ws.launch_costs(env, 3)
    finally:
        ws.COUNTS.uninstall()
print(json.dumps(out))
"""


def test_counters_on_compiled_triton_see_direct_launches():
    """What the stage counts on the GPU, rehearsed with the stubbed launch: after warm-up every
    launch goes direct, none through run; with direct launches off, all through run."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _STUBBED], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    on, off = out["on"], out["off"]
    assert on["direct_per_call"] >= 2 and on["run_per_call"] == 0  # forward and backward kernels
    assert sum(on["direct_kernels"].values()) == on["direct_per_call"] * on["calls"]
    assert off["direct_per_call"] == 0 and off["run_per_call"] == on["direct_per_call"]
    assert out["launchers"]["usable"] == out["launchers"]["alive"] > 0 and not out["launchers"]["unusable_kernels"]
    assert out["costs"]["launcher"]["direct"] == 3 and out["costs"]["launcher"]["usable"] is True
    assert out["costs"]["kernel[grid]"]["run"] == 3 and out["costs"]["kernel[grid]"]["direct"] == 0
