"""The benchmark suite on a GPU: every (case, dtype, mode) timed for every provider.

Rows carry the bytes moved (``bytes_model``), the plan tritonorm ran, and per provider the
median/p20/p80 time, the timing method, GB/s and the fraction of the device-to-device copy
bandwidth measured in the same run; ``summarize`` computes the targets from the rows.
"""

from __future__ import annotations

import math

import torch

from . import bytes_model, providers, shapes
from .cpu import _leaves, plans
from .progress import progress_bar
from .table import format_table


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


def predicted(case, x, kw, mode: str) -> dict | None:
    """The cost model's launches and time for this row (tritonorm.explain(...).cost), printed
    beside the measurement so every GPU run checks the model."""
    import tritonorm

    xm = x.detach()
    kwm = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ops = {"fwd": ("forward",), "bwd": ("backward",), "fwd+bwd": ("forward", "backward")}[mode]
    costs = [tritonorm.explain(xm, case.scope, op=op, **kwm).cost for op in ops]
    if any(c is None for c in costs):
        return None
    return {"us": sum(c.predicted_us for c in costs), "launches": sum(c.launches for c in costs),
            "bytes_ratio": sum(c.bytes for c in costs) / max(1, sum(c.ideal for c in costs))}


def measure_row(case, dt: str, mode: str, names, copy: float, device="cuda", timer=None) -> dict:
    """One benchmark row: bytes, plan, the cost model's prediction and every provider's timing.

    ``timer(fns, bytes_moved) -> timing.Timing`` defaults to ``timing.time_fns``: device time by
    CUDA-graph replay over ``timing.input_sets`` input sets in rotation, and the wall time per call
    launched back to back (the GPU report's dry run passes a fake one, to rehearse this path
    without a GPU)."""
    from . import timing

    real = timer is None
    timer = timer or timing.time_fns
    dtype = shapes.DTYPES[dt]
    x, kw = shapes.make_inputs(case, dtype, device, requires_grad=mode != "fwd")
    nbytes = bytes_model.bytes_moved(case, x.element_size(), mode)
    row = {"suite": case.suite, "case": case.name, "kind": case.kind, "shape": list(case.shape),
           "channels_last": case.channels_last, "dtype": dt, "mode": mode, "bytes": nbytes,
           "plan": plans(case, x, kw, None), "model": predicted(case, x, kw, mode), "providers": {}}
    sets = [(x, kw)] + [shapes.make_inputs(case, dtype, device, requires_grad=mode != "fwd")
                        for _ in range(timing.input_sets(nbytes) - 1 if real else 0)]
    if "compile" in names:
        # Each row is a new shape under dynamic=False; without a reset, dynamo stops recompiling
        # after its recompile limit and silently runs the eager code for later rows.
        torch._dynamo.reset()
    for name in names:
        made = [providers.make(name, case, xi, kwi) for xi, kwi in sets]
        if any(f is None for f in made):
            continue
        try:
            t = timer([_mode_fn(f, mode, xi, kwi) for f, (xi, kwi) in zip(made, sets)], nbytes)
        except Exception as exc:  # a provider failing on a shape is a result, not a crash
            row["providers"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        gbps = nbytes / (t.ms * 1e-3) / 1e9
        row["providers"][name] = {"ms": t.ms, "p20": t.p20, "p80": t.p80, "method": t.method,
                                  "wall_ms": t.wall_ms, "calls": t.calls, "sets": t.sets,
                                  "gbps": gbps, "copy_frac": gbps / copy}
    ok = {k: v for k, v in row["providers"].items() if "ms" in v}
    if "tritonorm" in ok:
        t = ok["tritonorm"]["ms"]
        for base in ("eager", "compile"):
            if base in ok:
                row[f"speedup_{base}"] = ok[base]["ms"] / t
                if ok[base].get("wall_ms") and ok["tritonorm"].get("wall_ms"):
                    row[f"wall_speedup_{base}"] = ok[base]["wall_ms"] / ok["tritonorm"]["wall_ms"]
    return row


def run_gpu(case_list, dtypes, modes, names, progress: bool = True) -> tuple[list[dict], float]:
    """(rows, copy GB/s); prints the table and the targets summary."""
    from . import timing

    copy = timing.copy_gbps()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write bytes / median time, 1 GiB)")
    rows = []
    work = [(c, d, m) for c in case_list for d in dtypes for m in modes]
    bar = progress_bar(len(work), "bench", "row", progress)
    for case, dt, mode in work:
        rows.append(measure_row(case, dt, mode, names, copy))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    print_table(rows)
    print_summary(summarize(rows))
    return rows, copy


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
    head = ["case", "dtype", "mode", "MB", "plan"]
    for n in names:
        head += [f"{n} us", "GB/s", "copy%"]
    head += ["model us", "x eager", "x compile"]
    body = []
    for r in rows:
        line = [r["case"], r["dtype"], r["mode"], round(r["bytes"] / 1e6, 1), r["plan"]]
        for n in names:
            p = r["providers"].get(n)
            if p is None or "ms" not in p:
                line += ["-" if p is None else "error", None, None]
            else:
                line += [round(p["ms"] * 1e3, 1), round(p["gbps"]), round(100 * p["copy_frac"])]
        model = r.get("model")
        line += [round(model["us"], 1) if model else None, r.get("speedup_eager"), r.get("speedup_compile")]
        body.append(line)
    print(f"bytes model: {bytes_model.MODEL}")
    print(format_table(head, body))


def print_summary(s: dict) -> None:
    print("targets:")
    for k, v in s.items():
        if k == "losing_rows":
            print(f"  {k}: {len(v)}" + (f" ({'; '.join(v[:10])}{' ...' if len(v) > 10 else ''})" if v else ""))
        else:
            print(f"  {k}: {v if not isinstance(v, float) else round(v, 3)}")
