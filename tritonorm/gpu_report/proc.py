"""The report's plumbing: a log that tees every line to stdout and a file as it comes, child
processes streamed through it with a hard time limit, and the device tool's rules for what
comes back from $OUT (at most 8 files, names in letters, digits, '.', '_' and '-')."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

MAX_FILES = 8
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


class Log:
    """Lines to stdout and to ``path``, each flushed at once (a run killed at its limit still
    leaves everything printed so far on disk)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self._lock:
            for part in str(line).split("\n"):
                sys.stdout.write(part + "\n")
                self._file.write(part + "\n")
            sys.stdout.flush()
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_json(path: Path, doc: dict) -> None:
    """``doc`` as JSON at ``path``, replaced atomically (a stage killed at its limit leaves the
    previous version, never half a file)."""
    import json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def child_env(interpret: bool) -> dict:
    """The environment of a stage's process: unbuffered output, this checkout importable, and
    TRITON_INTERPRET set (dry run: kernels in the interpreter) or cleared (compiled)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["TRITON_INTERPRET"] = "1" if interpret else "0"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 3.6 ignores it
    return env


def run_child(cmd: list[str], log: Log, timeout_s: float, env: dict, prefix: str = "  ") -> tuple[int | None, bool]:
    """Run ``cmd``, streaming its output (stdout and stderr merged) into ``log`` line by line.

    Killed (its whole process group: pytest's workers too) after ``timeout_s``. Returns
    (exit status or None when it could not start, timed_out)."""
    log(f"$ {' '.join(cmd)}   (limit {timeout_s:.0f} s)")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env=env, start_new_session=True, errors="replace")
    except OSError as exc:
        log(f"{prefix}could not start: {exc}")
        return None, False
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    timer = threading.Timer(max(1.0, timeout_s), kill)
    timer.start()
    try:
        for line in proc.stdout:
            log(prefix + line.rstrip("\n"))
        proc.wait()
    finally:
        timer.cancel()
    if timed_out.is_set():
        log(f"{prefix}killed at its time limit ({timeout_s:.0f} s)")
    return proc.returncode, timed_out.is_set()


def out_files(out: Path) -> list[Path]:
    """Every file under ``out``, deepest last."""
    return sorted((p for p in out.rglob("*") if p.is_file()), key=lambda p: (len(p.parts), str(p)))


def enforce_limits(out: Path, ours: list[str], log: Log) -> dict:
    """Check the out dir against the device tool's rules. Files the report did not plan (by
    name, ``ours``) are removed when they are the report's own extras (in ``out`` itself,
    written by a stage); anything else is only reported. Returns {"files", "problems"}."""
    problems = []
    for p in out_files(out):
        rel = p.relative_to(out)
        if len(rel.parts) > 3 or not all(NAME_OK.match(part) for part in rel.parts):
            problems.append(f"{rel}: would not come back (name or depth)")
    files = out_files(out)
    if len(files) > MAX_FILES:
        extras = [p for p in files if p.parent == out and p.name not in ours]
        for p in extras[: len(files) - MAX_FILES]:
            log(f"removing {p.name}: more than {MAX_FILES} files in the out dir")
            p.unlink()
        files = out_files(out)
        if len(files) > MAX_FILES:
            problems.append(f"{len(files)} files in the out dir; only {MAX_FILES} come back")
    return {"files": [str(p.relative_to(out)) for p in files], "problems": problems}


class Clock:
    """The run's total budget and each stage's share of what is left."""

    def __init__(self, total_s: float):
        self.total = total_s
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()
