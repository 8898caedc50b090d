"""The GPU report's summary: read the stages' files, join what belongs together (bench rows with
the cost model, the launch check and the host cost of the same case), and print the short table
that ends the run's output (the device tool returns only its last 12,000 characters)."""

from __future__ import annotations

import json
import math
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

from ..bench.table import format_table


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit(path: Path) -> dict | None:
    """Counts and failing test ids from a junit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {k: sum(int(s.get(k, 0) or 0) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["failing"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                      if c.find("failure") is not None or c.find("error") is not None][:50]
    return out


def _geo(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _ours(row):
    p = row.get("providers", {}).get("tritonorm", {})
    return p if "ms" in p else None


# The L2 model's figures for the h200 profile (python -m tritonorm.bench.l2 --json; committed):
# the newest such file is read.
L2_MODEL_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "model"


def l2_served(directory: Path = L2_MODEL_DIR) -> dict:
    """(case, mode) -> bytes of one bf16 call's reads that the L2 model says the L2 serves
    ("fwd": the forward's; "fwd+bwd": both), from the newest l2-h200-bf16-*.json; {} when none."""
    files = sorted(directory.glob("l2-h200-bf16-*.json"))
    doc = _load(files[-1]) if files else None
    out = {}
    for r in (doc or {}).get("rows", []):
        served = {ph: (r.get(ph) or {}).get("planned@1", {}).get("l2_served_mib", 0.0) * 2**20
                  if (r.get(ph) or {}).get("modelled") else 0.0 for ph in ("fwd", "bwd")}
        out[(r["case"], "fwd")] = served["fwd"]
        out[(r["case"], "fwd+bwd")] = served["fwd"] + served["bwd"]
    return out


def beside(bench: dict | None, checks: dict | None, host: dict | None, served: dict | None = None) -> list[dict]:
    """One line per bench row: bytes, measured us, the cost model's us and launches, the launches
    counted on the device, and the host CPU us per call of the same case (host bench). ``served``
    (l2_served): bf16 rows also get ``l2_model_us``, the cost model's us less the bytes the L2
    model says the L2 serves, at the h200 profile's bandwidth."""
    if not bench:
        return []
    from .. import dispatch

    gbps = dispatch.PROFILES["h200"].hbm_gbps
    served = l2_served() if served is None else served
    launched = {(r["case"], r["mode"]): r.get("measured") for r in (checks or {}).get("launches", [])}
    host_us = {r["case"]: r for r in (host or {}).get("rows", [])}
    out = []
    for r in bench.get("rows", []):
        ours, model = _ours(r), r.get("model") or {}
        h = host_us.get(r["case"], {}) if r.get("dtype") == "bf16" else {}
        line = {"suite": r["suite"], "case": r["case"], "dtype": r["dtype"], "mode": r["mode"],
                "bytes": r.get("bytes"), "us": ours["ms"] * 1e3 if ours else None,
                "model_us": model.get("us"), "model_launches": model.get("launches"),
                "launches": launched.get((r["case"], r["mode"])) if r.get("dtype") == "bf16" else None,
                "host_us": h.get("ours_fwd_us" if r["mode"] == "fwd" else "ours_fwd_bwd_us"),
                "x_eager": r.get("speedup_eager"), "x_compile": r.get("speedup_compile"),
                "wall_us": ours["wall_ms"] * 1e3 if ours and ours.get("wall_ms") else None,
                "wall_x_eager": r.get("wall_speedup_eager"),
                "copy_frac": ours.get("copy_frac") if ours else None}
        if line["us"] and line["model_us"]:
            line["measured_over_model"] = line["us"] / line["model_us"]
        # The L2 model's figures are the suite shapes': not the dry run's scaled-down rows.
        got = served.get((r["case"], r["mode"])) if r.get("dtype") == "bf16" and not r.get("dry_run") else None
        if got and line["model_us"]:
            line["l2_model_us"] = max(0.0, line["model_us"] - got / (gbps * 1e3))
            if line["us"] and line["l2_model_us"] > 0:
                line["measured_over_l2_model"] = line["us"] / line["l2_model_us"]
        out.append(line)
    return out


def beside_table(lines: list[dict]) -> str:
    """The bench rows with what the CPU side predicted for them: the cost model's us (and, for
    the two-sweep bf16 calls, the same less what the L2 model says the L2 serves) and launches,
    the launches counted on the device, the host CPU us per call; last, the wall us per call
    launched back to back (host included) and eager's wall over ours."""
    def r(v, nd=1):
        return None if v is None else round(v, nd)

    body = [(ln["case"], ln["dtype"], ln["mode"], r((ln["bytes"] or 0) / 1e6), r(ln["us"]), r(ln["model_us"]),
             r(ln.get("measured_over_model"), 2), r(ln.get("l2_model_us")), ln["model_launches"], ln["launches"],
             r(ln["host_us"]),
             r(ln["x_eager"], 2), r(ln["x_compile"], 2), r(ln["copy_frac"], 3), r(ln.get("wall_us")),
             r(ln.get("wall_x_eager"), 2)) for ln in lines]
    head = ("case", "dtype", "mode", "MB", "us", "model us", "us/model", "L2 model us", "launches model",
            "launches seen",
            "host us", "x eager", "x compile", "copy", "wall us", "wall x eager")
    return "bench rows beside the CPU-side predictions:\n" + format_table(head, body)


def per_suite(lines: list[dict]) -> list[tuple]:
    rows = []
    for suite in sorted({ln["suite"] for ln in lines}):
        sel = [ln for ln in lines if ln["suite"] == suite and ln["us"]]
        if not sel:
            continue
        fracs = [ln["copy_frac"] for ln in sel if ln["copy_frac"]]
        ratios = [ln.get("measured_over_model") for ln in sel]
        rows.append((suite, len(sel), _geo([ln["x_eager"] for ln in sel]), _geo([ln["x_compile"] for ln in sel]),
                     statistics.median(fracs) if fracs else None, min(fracs) if fracs else None, _geo(ratios)))
    return rows


def worst(lines: list[dict], n: int = 5) -> list[tuple]:
    """The rows where tritonorm loses most to the better of eager and torch.compile."""
    scored = []
    for ln in lines:
        bases = [v for v in (ln["x_eager"], ln["x_compile"]) if v]
        if bases:
            scored.append((min(bases), ln))
    scored.sort(key=lambda t: t[0])
    return [(f"{ln['case']} {ln['dtype']} {ln['mode']}", ln["us"], ln["x_eager"], ln["x_compile"], ln["copy_frac"])
            for _, ln in scored[:n]]


def plot(lines: list[dict], bench: dict | None, path: Path) -> str:
    """One PNG: fraction of the copy ceiling against bytes moved, a panel per mode, a colour per
    provider. Returns a note (written, or why not)."""
    rows = (bench or {}).get("rows", [])
    if not rows:
        return "no bench rows to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    colours = {"tritonorm": "tab:red", "eager": "tab:blue", "compile": "tab:green"}
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes) + 2, 4.5), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        for prov, colour in colours.items():
            for dt, marker in (("bf16", "s"), ("fp32", "o")):
                pts = [(r["bytes"], r["providers"][prov]["copy_frac"]) for r in rows
                       if r["mode"] == mode and r["dtype"] == dt and "copy_frac" in r.get("providers", {}).get(prov, {})]
                if pts:
                    ax.scatter(*zip(*pts), color=colour, marker=marker, s=22, label=f"{prov} {dt}")
        ax.axhline(1.0, color="gray", linestyle="-.", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(mode)
        ax.set_xlabel("bytes moved (each input read once, each output written once)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("fraction of the device-to-device copy bandwidth")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    dry = " (DRY RUN: made-up numbers)" if (bench.get("provenance") or {}).get("dry_run") else ""
    fig.suptitle(f"{(bench.get('provenance') or {}).get('device', '?')}{dry}")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f"plot: {path.name}"


def print_summary(log, doc: dict, lines: list[dict]) -> None:
    """The last lines of the run's output."""
    prov = doc.get("provenance", {})
    log("")
    log("=" * 100)
    log(f"tritonorm GPU report{' (DRY RUN: no GPU, made-up timings)' if doc.get('dry_run') else ''}: "
        f"{prov.get('device')} | driver {prov.get('driver')} | torch {prov.get('torch')} | "
        f"triton {prov.get('triton')} | commit {str(prov.get('commit'))[:10]}{' (dirty)' if prov.get('dirty') else ''}")
    stage_rows = [(s["name"], s["status"], round(s.get("seconds", 0), 1), s.get("note", "")[:110])
                  for s in doc["stages"]]
    log(format_table(("stage", "status", "s", "note"), stage_rows))
    suites = per_suite(lines)
    if suites:
        log("per suite (tritonorm rows timed): x eager / x compile are geomean speed-ups (>1: faster), "
            "copy = fraction of the copy ceiling, model = measured us / cost model us")
        log(format_table(("suite", "rows", "x eager", "x compile", "copy median", "copy min", "model"), suites))
    bad = worst(lines)
    if bad:
        log("worst rows (lowest speed-up against the better baseline):")
        log(format_table(("row", "us", "x eager", "x compile", "copy"), bad))
    checks = doc.get("checks") or {}
    if checks:
        log(f"predictions: launches {checks.get('launches_ok')}; JIT variants {checks.get('variants_ok')}")
    log(f"files ({len(doc['files'])}): {' '.join(doc['files'])}"
        + (f" | PROBLEMS: {'; '.join(doc['file_problems'])}" if doc.get("file_problems") else ""))
    log(f"gpu_report: {doc['status']} in {doc['seconds']:.0f} s (budget {doc['budget_s']:.0f} s), out dir {doc['out']}")
