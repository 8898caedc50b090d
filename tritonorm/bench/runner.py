"""The entry point behind ``tritonorm bench`` / ``make bench``.

On a GPU (``gpu``): every (case, dtype, mode) timed for every provider, a table on stdout, a
JSON file with provenance and PNG plots in the results folder. Without one (``cpu``): the same
suite scaled down, run through Triton's interpreter, as a correctness-and-dispatch report (no
timings); JSON only when asked for (``--json`` or ``--out``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from . import bytes_model, providers, shapes

DEFAULT_OUT = Path("tritonorm-bench")  # relative to the current directory


class NoCases(ValueError):
    """The suite and filter select no benchmark case."""


def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def source_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout tritonorm is imported from; (None, None) for an
    installed wheel (the current directory's repository is the user's, not ours)."""
    root = Path(__file__).resolve().parent.parent.parent
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root or not (root / "pyproject.toml").is_file():
        return None, None
    commit = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return commit, bool(dirty)


def provenance(copy_gbps: float | None = None) -> dict:
    """Where and with what the rows were produced: device, versions, source commit, command."""
    import tritonorm

    from ..tuning.cache import versions

    commit, dirty = source_commit()
    prov = {**versions(), "torch": torch.__version__, "tritonorm": tritonorm.__version__,
            "python": platform.python_version(), "commit": commit, "dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["tritonorm", *sys.argv[1:]]), "bytes_model": bytes_model.MODEL}
    if on_gpu():
        props = torch.cuda.get_device_properties(0)
        prov.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, cuda=torch.version.cuda, copy_gbps=copy_gbps,
                    timed=True)
    else:
        prov.update(device=f"cpu ({platform.processor() or platform.machine()}), Triton interpreter",
                    timed=False)
    return prov


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def write_json(path: Path, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"JSON: {path}")
    return path


def _stem(device: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return f"{slug}-{datetime.date.today().isoformat()}"


def run(suite="all", dtypes=None, modes=None, names=None, out_dir=None, json_path=None, plots=True,
        name_filter=None, progress=True, cpu_dtypes=("fp32", "bf16")) -> dict:
    """Run the suite; return {"provenance", "rows", ("summary")} as written to the JSON file."""
    case_list = shapes.select(suite, name_filter)
    if not case_list:
        raise NoCases(f"no benchmark case matches suite={suite!r} and filter={name_filter!r}")
    if on_gpu():
        from . import gpu

        rows, copy = gpu.run_gpu(case_list, dtypes or list(shapes.DTYPES), modes or list(shapes.MODES),
                                 names or list(providers.DEFAULT), progress)
        result = {"provenance": provenance(copy), "rows": rows, "summary": gpu.summarize(rows)}
        out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
        stem = _stem(result["provenance"]["device"])
        write_json(Path(json_path) if json_path else out / f"{stem}.json", result)
        if plots:
            from .plots import plot

            for p in plot(rows, copy, out, stem):
                print(f"plot: {p}")
        return result
    from . import cpu

    rows = cpu.run_cpu(case_list, dtypes or list(cpu_dtypes), progress)
    result = {"provenance": provenance(), "rows": rows}
    if json_path is not None or out_dir is not None:
        day = datetime.date.today().isoformat()
        write_json(Path(json_path) if json_path else Path(out_dir) / f"cpu-report-{day}.json", result)
    return result
