"""The ``tritonorm`` command: accurate help, tune without a GPU, --dry-run, explain."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonorm import cli

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("bench", "tune", "explain"):
        assert word in out


@pytest.mark.parametrize("command,words", [
    ("tune", ["--suite", "--dry-run", "resnet50", "sd-unet", "llm", "all"]),
    ("bench", ["--suite", "--dtype", "--mode", "--providers", "--no-plots"]),
    ("explain", ["--shape", "--scope", "--device"]),
])
def test_subcommand_help(capsys, command, words):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    for word in words:
        assert word in out


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
    assert "bn 64x112^2 b32" in out and "heuristic: split" in out
    # Keys are deduplicated: batch 32 and 256 of a stage share P and M buckets only if equal.
    lines = [ln for ln in out.splitlines() if "key " in ln]
    keys = [ln.split("key ")[1] for ln in lines]
    assert len(keys) == len(set(keys))


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", "--suite", "vgg"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["bench", "--dtype", "fp64"])


def test_explain_command(capsys):
    assert cli.main(["explain", "--shape", "1,320,64,64", "--groups", "32", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "kernel: split" in out and "reason: heuristic" in out


def test_console_entry_point_runs_as_module():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "tritonorm", "tune", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--dry-run" in res.stdout
