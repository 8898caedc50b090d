"""The ``tritonorm`` command: accurate help, --version, tune without a GPU, --dry-run, explain,
and bad input: one line naming the argument, exit status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tritonorm
from tritonorm import cli

ROOT = Path(__file__).resolve().parent.parent


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("bench", "tune", "explain", "--version"):
        assert word in out


@pytest.mark.parametrize("command,words", [
    ("tune", ["--suite", "--dry-run", "resnet50", "sd-unet", "llm", "all", "local"]),
    ("bench", ["--suite", "--dtype", "--mode", "--providers", "--no-plots", "--out", "--json", "--quiet",
               "--model", "--memory", "--host"]),
    ("explain", ["--shape", "--scope", "--device", "--groups"]),
])
def test_subcommand_help(capsys, command, words):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tritonorm {tritonorm.__version__}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tune_without_gpu_says_so_and_exits_cleanly(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONORM_CACHE_DIR", str(tmp_path))
    assert cli.main(["tune", "--suite", "llm"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out and "nothing was tuned" in out
    assert not list(tmp_path.iterdir())


def test_tune_dry_run_lists_problems(capsys):
    assert cli.main(["tune", "--suite", "resnet50", "--dtype", "bf16", "--dry-run", "--device", "h200"]) == 0
    out = capsys.readouterr().out
    assert "would tune" in out and "h200" in out and "nothing was run" in out
    lines = [ln.split() for ln in out.splitlines() if "|" in ln]  # table rows end with the key
    assert any(" ".join(ln).startswith("resnet50 bn 64x112^2 b32") for ln in lines)
    keys = [ln[-1] for ln in lines]
    assert len(keys) == len(set(keys))  # keys are deduplicated
    # The closing count is the sum of the listed candidates, not a figure typed anywhere.
    counts = [int(ln[-3]) for ln in lines]
    assert f"{len(lines)} problems, {sum(counts)} candidate plans in all" in out


# Bad input: (argv, the option the one-line error must name).
BAD = [
    (["tune", "--suite", "vgg"], "--suite"),
    (["bench", "--dtype", "fp64"], "--dtype"),
    (["bench", "--mode", "fwd,sideways"], "--mode"),
    (["tune", "--limit", "0", "--dry-run"], "--limit"),
    (["tune", "--limit", "many", "--dry-run"], "--limit"),
    (["tune", "--device", "a100", "--dry-run"], "--device"),
    (["explain", "--shape", "1,320,64,64", "--groups", "33"], "--groups"),
    (["explain", "--shape", "1,320,64,64", "--groups", "0"], "--groups"),
    (["explain", "--shape", "1,320,64,64", "--device", "a100"], "--device"),
    (["explain", "--shape", "1,320,64,64", "--device", "tpu"], "--device"),
    (["explain", "--shape", "1,320,64,64", "--scope", "bogus"], "--scope"),
    (["explain", "--shape", "1,320,64,64", "--scope", "instance", "--groups", "4"], "--groups"),
    (["explain", "--shape", "1,320,64,64", "--activation", "swish9"], "--activation"),
    (["explain", "--shape", "1,320,sixty,64"], "--shape"),
    (["explain", "--shape", "7"], "--shape"),
    (["explain", "--shape", "1,2,3,4,5,6"], "--shape"),
    (["explain", "--shape", "2,8", "--channels-last"], "--channels-last"),
    (["explain"], "--shape"),
    (["frobnicate"], "frobnicate"),
]
if not torch.cuda.is_available():
    BAD += [(["explain", "--shape", "1,320,64,64", "--device", "cuda"], "--device"),
            (["tune", "--device", "local", "--dry-run"], "--device"),
            (["tune", "--device", "local"], "--device")]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_naming_the_argument(capsys, argv, flag):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("tritonorm") and "error:" in err, err
    assert flag in err, err
    assert "Traceback" not in captured.err + captured.out


def test_bench_filter_matching_nothing_is_an_error(capsys):
    assert cli.main(["bench", "--filter", "no such case"]) == 2
    assert "--filter" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_bench_output_paths_of_the_wrong_kind(capsys, tmp_path, flag):
    target = tmp_path / "exists"
    if flag == "--out":
        target.write_text("a file where a folder is wanted")
    else:
        target.mkdir()
    assert cli.main(["bench", flag, str(target)]) == 2
    assert flag in capsys.readouterr().err


def test_bench_model_prints_the_cost_model_of_each_case(capsys, tmp_path):
    out_json = tmp_path / "model.json"
    assert cli.main(["bench", "--model", "h100", "--suite", "llm", "--filter", "ln 4096x16384",
                     "--dtype", "bf16,fp32", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "h100 profile" in out and "forward: " in out and "backward: " in out
    import json

    rows = json.loads(out_json.read_text())
    assert [r["dtype"] for r in rows] == ["bfloat16", "float32"]
    for r in rows:
        for op in ("forward", "backward"):
            c = r[op]
            assert c["bytes"] >= c["ideal"] > 0 and c["ratio"] == c["bytes"] / c["ideal"] and c["us"] > 0
        # 16384 wide rows, past the backward's fused limit: the WIDE fused kernel (two tile
        # programs a row, each sweeping the row for its sums; the bytes requested count x and dy
        # three times, of which the L2 serves two: bench --l2), then the finish of the partials.
        assert (r["backward"]["kernel"], r["backward"]["launches"]) == ("fused", 2), r
        assert 2.3 < r["backward"]["ratio"] < 2.4, r
    assert cli.main(["bench", "--model", "h300"]) == 2
    assert "--model" in capsys.readouterr().err


def test_explain_command(capsys):
    assert cli.main(["explain", "--shape", "1,320,64,64", "--groups", "32", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "kernel: split" in out and "reason: heuristic" in out


@pytest.mark.parametrize("shape", ["1x320x64x64", "1,320,64,64", "1 320 64 64"])
def test_explain_shape_spellings(capsys, shape):
    assert cli.main(["explain", "--shape", shape, "--groups", "32"]) == 0
    assert "kernel: split" in capsys.readouterr().out


@pytest.mark.parametrize("channels,groups", [(320, 32), (20, 20), (24, 24), (48, 24), (7, 7), (37, 1)])
def test_explain_default_groups_work_on_any_shape(capsys, channels, groups):
    assert cli.main(["explain", "--shape", f"2,{channels},8,8"]) == 0
    out = capsys.readouterr().out
    assert f"num_groups: {groups} (default" in out and "kernel:" in out
    assert channels % groups == 0 and groups <= 32


@pytest.mark.parametrize("argv", [["--shape", "4,64", "--scope", "C"], ["--shape", "2,8,4,4,4", "--scope", "instance",
                                  "--channels-last", "--device", "local"], ["--shape", "8,64", "--scope", "layer"]])
def test_explain_other_scopes_need_no_groups(capsys, argv):
    assert cli.main(["explain", *argv]) == 0
    out = capsys.readouterr().out
    assert "num_groups" not in out and "kernel:" in out


def test_console_entry_point_runs_as_module():
    res = subprocess.run([sys.executable, "-m", "tritonorm", "--version"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"tritonorm {tritonorm.__version__}"


def test_closed_stdout_pipe_is_quiet():
    """`tritonorm ... | head -c 1`: the reader is gone before we write; no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        res = subprocess.run([sys.executable, "-m", "tritonorm", "explain", "--shape", "1,320,64,64"],
                             cwd=ROOT, env=_env(), stdout=write_end, stderr=subprocess.PIPE, text=True,
                             timeout=120)
    finally:
        os.close(write_end)
    assert res.returncode == 1 and res.stderr == "", res.stderr


def test_sweep_keeps_the_fastest_candidate_and_ranks_the_field(monkeypatch):
    """sweep.tune with the GPU timing replaced by a made-up cost per plan (no GPU here): the
    stored plan is the argmin, failed candidates (inf) are left out, the heuristic's time is kept
    and ``ranking`` lists the fastest ascending."""
    import random

    from tritonorm import dispatch
    from tritonorm.tuning import sweep

    profile = dispatch.profile_named("h200")
    task = sweep.tasks(["resnet50"], ["bf16"], ["forward"], profile)[0]
    plans = sweep.candidates(task.problem, profile, task.heuristic)
    rng = random.Random(7)
    cost = {id(p): (float("inf") if i % 5 == 3 else rng.uniform(0.1, 2.0)) for i, p in enumerate(plans)}
    monkeypatch.setattr(sweep, "candidates", lambda problem, prof, heuristic=None: plans)
    monkeypatch.setattr(sweep, "measure", lambda t, plan, device: cost[id(plan)])
    entry = sweep.tune([task], profile, "cpu")[task.key]
    finite = sorted((c, p) for p in plans if (c := cost[id(p)]) != float("inf"))
    best_ms, best = finite[0][0], finite[0][1]
    assert (entry["kernel"], entry["config"]) == (best.kernel, dict(best.config))
    assert entry["time_us"] == round(best_ms * 1000, 2)
    heur = [p for p in plans if p.reason.startswith("heuristic")]
    assert entry["heuristic_us"] == (round(cost[id(heur[0])] * 1000, 2) if heur and cost[id(heur[0])] != float("inf")
                                     else None)
    times = [float(part.rsplit(": ", 1)[1]) for part in entry["ranking"].split("; ")]
    assert times == sorted(times) and len(times) == min(6, len(finite))
    assert times[0] == round(best_ms * 1000, 1)


def test_filter_keeps_the_order_of_its_texts():
    """--filter of bench and tune (suites.by_name): comma-separated texts, the first text's
    matches first, each case once, none when nothing matches."""
    from tritonorm.tuning import suites

    all_cases = suites.cases("all")
    got = suites.by_name(all_cases, "rms 32x4096, bn 64x112^2 b32,rms 32x4096")
    names = [c.name for c in got]
    assert names[0] == "rms 32x4096" and names.count("rms 32x4096") == 1
    assert all("bn 64x112^2 b32" in n for n in names[1:]) and len(names) >= 2
    assert suites.by_name(all_cases, None) == all_cases
    assert suites.by_name(all_cases, "no such case") == []
