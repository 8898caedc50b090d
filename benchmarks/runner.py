"""The benchmark runner behind ``tritonorm bench`` / ``make bench``.

On a GPU: every (case, dtype, mode) timed for every provider, a table on stdout, JSON with
provenance under benchmarks/results/, PNG plots. Without one: the same suite scaled down, run
through Triton's interpreter, as a correctness-and-dispatch report (no timings).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import bytes_model, providers, shapes

RESULTS = Path(__file__).resolve().parent / "results"


def _progress(items, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr)
    except ImportError:
        return items


def _leaves(x, kw):
    return [t for t in (x, kw.get("weight"), kw.get("bias")) if t is not None and t.requires_grad]


def _mode_fn(f, mode: str, x, kw):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return f()
        return fwd
    leaves = _leaves(x, kw)
    y = f()
    dy = torch.randn_like(y)
    if mode == "bwd":
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
    return lambda: torch.autograd.grad(f(), leaves, dy)


def _explain_kw(case, kw):
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _plans(case, x, kw, device) -> str:
    from tritonorm.explain import explain

    xm = x.detach()
    ekw = _explain_kw(case, kw)
    f = explain(xm, case.scope, device=device, **ekw).kernel
    b = explain(xm, case.scope, device=device, op="backward", **ekw).kernel
    return f"{f}/{b}"


# ---------------------------------------------------------------------------------------- GPU


def provenance(copy_gbps: float | None = None) -> dict:
    import triton

    import tritonorm

    props = torch.cuda.get_device_properties(0)
    root = Path(__file__).resolve().parent.parent
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "tritonorm": tritonorm.__version__,
            "cuda": torch.version.cuda, "commit": commit, "dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "copy_gbps": copy_gbps, "bytes_model": bytes_model.MODEL}


def run_gpu(case_list, dtypes, modes, names, out_dir: Path, plots: bool = True) -> dict:
    from . import timing

    copy = timing.copy_gbps()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write bytes / median time, 1 GiB)")
    rows = []
    work = [(c, d, m) for c in case_list for d in dtypes for m in modes]
    for case, dt, mode in _progress(work, "bench"):
        dtype = shapes.DTYPES[dt]
        x, kw = shapes.make_inputs(case, dtype, "cuda", requires_grad=mode != "fwd")
        nbytes = bytes_model.bytes_moved(case, x.element_size(), mode)
        row = {"suite": case.suite, "case": case.name, "kind": case.kind, "shape": list(case.shape),
               "channels_last": case.channels_last, "dtype": dt, "mode": mode, "bytes": nbytes,
               "plan": _plans(case, x, kw, None), "providers": {}}
        for name in names:
            f = providers.make(name, case, x, kw)
            if f is None:
                continue
            try:
                med, p20, p80, method = timing.time_ms(_mode_fn(f, mode, x, kw), nbytes)
            except Exception as exc:  # a provider failing on a shape is a result, not a crash
                row["providers"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            gbps = nbytes / (med * 1e-3) / 1e9
            row["providers"][name] = {"ms": med, "p20": p20, "p80": p80, "method": method,
                                      "gbps": gbps, "copy_frac": gbps / copy}
        ok = {k: v for k, v in row["providers"].items() if "ms" in v}
        if "tritonorm" in ok:
            t = ok["tritonorm"]["ms"]
            for base in ("eager", "compile"):
                if base in ok:
                    row[f"speedup_{base}"] = ok[base]["ms"] / t
        rows.append(row)
        del x, kw
    result = {"provenance": provenance(copy), "rows": rows, "summary": summarize(rows)}
    print_table(rows)
    print_summary(result["summary"])
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", result["provenance"]["gpu"].lower()).strip("-")
    stem = f"{slug}-{datetime.date.today().isoformat()}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"JSON: {path}")
    if plots:
        from .plots import plot

        for p in plot(rows, copy, out_dir, stem):
            print(f"plot: {p}")
    return result


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(rows: list[dict]) -> dict:
    """The issue's targets, computed from the rows (None where no row applies)."""
    beats = [r for r in rows if "speedup_eager" in r]
    at_least = [r for r in beats if min(r.get("speedup_eager", 0), r.get("speedup_compile", math.inf)) >= 1.0]
    train = [r["speedup_eager"] for r in beats if r["mode"] == "fwd+bwd"]
    gn = [r["speedup_eager"] for r in beats if r["suite"] == "sd-unet"]
    big = [r["providers"]["tritonorm"]["copy_frac"] for r in rows
           if r["mode"] == "fwd" and "ms" in r["providers"].get("tritonorm", {})
           and math.prod(r["shape"]) * (4 if r["dtype"] == "fp32" else 2) >= 64 << 20]
    return {
        "rows_at_least_as_fast_as_best_baseline": f"{len(at_least)}/{len(beats)}",
        "losing_rows": [f"{r['case']} {r['dtype']} {r['mode']}" for r in beats if r not in at_least],
        "train_fwd_bwd_geomean_vs_eager": _geomean(train), "target_train": 1.5,
        "sd_groupnorm_silu_geomean_vs_eager": _geomean(gn), "target_sd": 2.0,
        "min_copy_fraction_tensors_ge_64MB": min(big) if big else None, "target_copy_fraction": 0.85,
    }


def print_table(rows: list[dict]) -> None:
    names = [n for n in providers.DEFAULT if any(n in r["providers"] for r in rows)]
    head = f"{'case':32s} {'dtype':5s} {'mode':8s} {'MB':>8s} {'plan':14s}" + "".join(
        f" {n + ' us':>13s} {'GB/s':>6s} {'copy%':>5s}" for n in names) + f" {'x eager':>8s} {'x compile':>9s}"
    print(f"bytes model: {bytes_model.MODEL}")
    print(head)
    for r in rows:
        line = f"{r['case']:32s} {r['dtype']:5s} {r['mode']:8s} {r['bytes'] / 1e6:8.1f} {r['plan']:14s}"
        for n in names:
            p = r["providers"].get(n)
            if p is None or "ms" not in p:
                line += f" {'-' if p is None else 'error':>13s} {'':>6s} {'':>5s}"
            else:
                line += f" {p['ms'] * 1e3:13.1f} {p['gbps']:6.0f} {100 * p['copy_frac']:5.0f}"
        line += f" {r.get('speedup_eager', float('nan')):8.2f} {r.get('speedup_compile', float('nan')):9.2f}"
        print(line)


def print_summary(s: dict) -> None:
    print("targets:")
    for k, v in s.items():
        if k == "losing_rows":
            print(f"  {k}: {len(v)}" + (f" ({'; '.join(v[:10])}{' ...' if len(v) > 10 else ''})" if v else ""))
        else:
            print(f"  {k}: {v if not isinstance(v, float) else round(v, 3)}")


# ---------------------------------------------------------------------------------------- CPU


def _err(a, ref) -> float:
    scale = max(ref.abs().max().item(), 1e-30)
    return (a.double() - ref).abs().max().item() / scale


def _run(small, x, kw, dy, regimes):
    """y and the gradients, with the forward/backward regimes forced when given."""
    import contextlib

    import tritonorm
    from tritonorm import dispatch

    fwd, bwd = regimes or (None, None)
    # Large tiles keep the interpreter fast; split 4 still exercises partials and the merge.
    cfg = {"block_m": 1024, "split": 4}
    with dispatch.forced(fwd, op="forward", **cfg) if fwd else contextlib.nullcontext():
        y = tritonorm.norm(x, small.scope, **kw)
    dy = torch.randn_like(y) if dy is None else dy
    with dispatch.forced(bwd, op="backward", **cfg) if bwd else contextlib.nullcontext():
        grads = torch.autograd.grad(y, _leaves(x, kw), dy)
    return y, grads, dy


def check_case(small, dt: str, gpu_regimes: tuple | None = None) -> dict:
    """Run one scaled case forward+backward in the interpreter; errors against float64.

    ``gpu_regimes``: (forward, backward) regimes the GPU profile picks for the full shape; the
    scaled case is run under them too, so the report checks the kernels the GPU would run.
    """
    import tritonorm

    dtype = shapes.DTYPES[dt]
    x, kw = shapes.make_inputs(small, dtype, "cpu", requires_grad=True)
    leaves = _leaves(x, kw)
    y, grads, dy = _run(small, x, kw, None, None)
    x64 = x.detach().double().requires_grad_(True)
    kw64 = {k: (v.detach().double().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
            for k, v in kw.items()}
    y64 = tritonorm.norm(x64, small.scope, backend="reference", **kw64)
    g64 = torch.autograd.grad(y64, _leaves(x64, kw64), dy.double())
    f_eager = providers.make("eager", small, x, kw)
    ye = f_eager()
    ge = torch.autograd.grad(ye, leaves, dy)
    out = {"err_y": _err(y, y64), "err_grad": max(_err(a, b) for a, b in zip(grads, g64)),
           "eager_err_y": _err(ye, y64), "eager_err_grad": max(_err(a, b) for a, b in zip(ge, g64)),
           "plan_here": _plans(small, x, kw, None)}
    if gpu_regimes is not None:
        yg, gg, _ = _run(small, x, kw, dy, gpu_regimes)
        out["err_gpu_regimes"] = max([_err(yg, y64)] + [_err(a, b) for a, b in zip(gg, g64)])
    return out


def _meta(full, dt):
    xm = shapes.meta_input(full, shapes.DTYPES[dt])
    mkw = {"num_groups": full.num_groups, "center": full.center, "activation": full.activation}
    if full.sample_groups > 1:
        mkw["sample_groups"] = full.sample_groups
    if full.affine:
        mkw["weight"] = torch.empty(full.shape[1], dtype=xm.dtype, device="meta")
        if full.center:
            mkw["bias"] = torch.empty(full.shape[1], dtype=xm.dtype, device="meta")
    return xm, mkw


def run_cpu(case_list, dtypes) -> list[dict]:
    """The correctness-and-dispatch report (interpreter; no timings)."""
    print("No CUDA GPU: running the suite scaled down through Triton's interpreter as a "
          "correctness-and-dispatch report.\nTimings need a GPU: run `make bench` on a CUDA machine "
          "for the table, JSON and plots.\n")
    print("error = max |out - float64 reference| / max |reference| over y and every gradient; "
          "eager = PyTorch's own ops in the same dtype.\nplan = forward/backward regime: 'here' for "
          "the scaled shape in the interpreter, 'h100' for the full model shape; 'err h100' = the\n"
          "largest error of y and gradients with the scaled shape run in the h100 plan's regimes.\n")
    head = (f"{'case (full shape)':34s} {'scaled':18s} {'dtype':5s} {'err y':>8s} {'eager':>8s} "
            f"{'err grad':>8s} {'eager':>8s} {'plan here':14s} {'plan h100':14s} {'err h100':>8s}")
    print(head)
    rows = []
    t0 = time.time()
    for small, fulls in shapes.scaled_unique(case_list):
        for dt in dtypes:
            h100s = [_plans(full, *_meta(full, dt), "h100") for full in fulls]
            # The GPU plan's regimes are checked once per shape (fp32): same kernels in every dtype.
            gpu = tuple(h100s[0].split("/")) if dt == dtypes[0] else None
            res = check_case(small, dt, gpu)
            for i, (full, h100) in enumerate(zip(fulls, h100s)):
                row = {"case": full.name, "suite": full.suite, "shape": list(full.shape),
                       "scaled": list(small.shape), "dtype": dt, "plan_h100": h100, **res}
                rows.append(row)
                scaled = "x".join(map(str, small.shape)) if i == 0 else '"'
                errs = (f"{res['err_y']:8.1e} {res['eager_err_y']:8.1e} {res['err_grad']:8.1e} "
                        f"{res['eager_err_grad']:8.1e}") if i == 0 else f"{'':35s}"
                gpu_err = f"{res['err_gpu_regimes']:8.1e}" if i == 0 and "err_gpu_regimes" in res else ""
                print(f"{full.name:34s} {scaled:18s} {dt:5s} {errs} {res['plan_here'] if i == 0 else '':14s} "
                      f"{h100:14s} {gpu_err:>8s}")
    worst = max(rows, key=lambda r: r["err_y"] / max(r["eager_err_y"], 1e-7)) if rows else None
    print(f"\n{len(rows)} suite shapes checked in {time.time() - t0:.0f} s on the interpreter.")
    if worst:
        print(f"largest error relative to eager's: {worst['case']} {worst['dtype']} "
              f"(ours {worst['err_y']:.1e}, eager {worst['eager_err_y']:.1e})")
    print("Timings need a GPU; none were measured here.")
    return rows


def run(suite="all", dtypes=None, modes=None, names=None, out_dir=None, plots=True,
        name_filter=None, cpu_dtypes=("fp32", "bf16")) -> object:
    case_list = shapes.select(suite, name_filter)
    if not case_list:
        raise SystemExit(f"no benchmark case matches suite={suite!r} filter={name_filter!r}")
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return run_gpu(case_list, dtypes or list(shapes.DTYPES), modes or list(shapes.MODES),
                       names or list(providers.DEFAULT), Path(out_dir or RESULTS), plots)
    return run_cpu(case_list, dtypes or list(cpu_dtypes))
