"""Stage 3 of the GPU report: the benchmark suites, trimmed and in priority order, through the
bench runner's own row code (``tritonorm.bench.gpu.measure_row``): bytes, plan, cost-model
prediction, tritonorm / eager / torch.compile times and the copy ceiling measured in the same
run. The JSON is rewritten after every row, so a stop at the time limit keeps what was done.

Dry run (no GPU): the first cases, scaled down, on CPU tensors through the interpreter; every
provider's function is run once, then a fake timer returns made-up numbers, marked as such in
every row and in the provenance. torch.compile uses its "eager" backend there (tracing without
code generation), so the compile provider's path is exercised in seconds.

    python -m tritonorm.gpu_report.bench_stage --json PATH --budget-s S [--dry-run]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from tritonorm.gpu_report.proc import write_json as write

# (suite, case name): most telling first. bf16 rows for all of them, then fp32 for the first
# FP32_FIRST; fwd then fwd+bwd for each.
PRIORITY = (
    ("sd-unet", "gn32+silu 320x64^2 b2"),
    ("resnet50", "bn 64x112^2 b32"),
    ("llm", "ln 4096x4096"),
    ("llm", "rms 4096x4096"),
    ("nnunet", "in3d 32x128^3 b2"),
    ("sd-unet", "gn32+silu 320x64^2 b2 cl"),
    ("resnet50", "bn 64x112^2 b256 cl"),
    ("ghost-bn", "gbn 64x112^2 b256/32"),
    ("prenorm", "add+rms 4096x4096"),
    ("adaptive", "adaLN 1024x1152 b8"),
    ("adaptive", "scale_shift gn32+silu 320x64^2 b2"),
    ("llm", "rms 32x4096"),
    ("sd-unet", "gn32+silu 1280x8^2 b8"),
    ("resnet50", "bn 2048x7^2 b256 cl"),
    ("nnunet", "in3d 320x8^3 b2"),
    ("llm", "ln 4096x16384"),
    ("llm", "ln 1x4096"),
    ("resnet50", "bn 512x28^2 b256"),
    ("sd-unet", "gn32+silu 1280x16^2 b2"),
)
FP32_FIRST = 6
MODES = ("fwd", "fwd+bwd")
NAMES = ("tritonorm", "eager", "compile")
DRY_RUN_CASES = 3
DRY_RUN_NOTE = "dry-run: fake timer, made-up numbers (no GPU); only the code path is real"


def work_list(dry_run: bool, dry_cases: int = DRY_RUN_CASES) -> tuple[list, list[str]]:
    """[(case, dtype, mode)] in priority order, and the priority names not found in the suites."""
    from tritonorm.tuning import suites

    by_name = {(c.suite, c.name): c for s in suites.SUITES for c in suites.cases(s)}
    missing = [f"{s}: {n}" for s, n in PRIORITY if (s, n) not in by_name]
    found = [by_name[k] for k in PRIORITY if k in by_name]
    if dry_run:
        found = [c.scaled() for c in found[:dry_cases]]
        return [(c, "bf16", m) for c in found for m in MODES], missing
    work = [(c, "bf16", m) for c in found for m in MODES]
    work += [(c, "fp32", m) for c in found[:FP32_FIRST] for m in MODES]
    return work, missing


def fake_timer(fns, nbytes: int):
    """Runs each function once (the path must work), then returns made-up times: bytes at
    ~3 TB/s, and 20 us more per call for the wall figure."""
    from tritonorm.bench.timing import Timing

    for fn in fns:
        fn()
    ms = max(nbytes / 3e9, 1e-3)
    return Timing(ms, ms * 0.98, ms * 1.03, "dry-run (fake timer)", ms + 0.02, 1, len(fns))


def _compile_eager_backend(case, x, kw):
    import torch

    from tritonorm.bench import providers

    eager = providers._eager(case, x, kw)
    return None if eager is None else torch.compile(eager, dynamic=False, backend="eager")



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tritonorm.gpu_report.bench_stage")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=180.0)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--dry-run-cases", type=int, default=DRY_RUN_CASES, help="cases in a dry run")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.budget_s

    import torch

    from tritonorm.bench import gpu, providers, runner, timing

    if not args.dry_run and not runner.on_gpu():
        print("no CUDA GPU (or TRITON_INTERPRET=1): use --dry-run to rehearse without one")
        return 2
    work, missing = work_list(args.dry_run, args.dry_run_cases)
    for m in missing:
        print(f"priority case not in the suites (skipped): {m}")
    if args.dry_run:
        providers.PROVIDERS["compile"] = _compile_eager_backend
        copy, device, timer = 4000.0, "cpu", fake_timer
        print(DRY_RUN_NOTE)
    else:
        copy, device, timer = timing.copy_gbps(), "cuda", None
    print(f"device-to-device copy: {copy:.0f} GB/s; {len(work)} rows planned, budget {args.budget_s:.0f} s")
    prov = runner.provenance(None if args.dry_run else copy)
    prov.update(dry_run=args.dry_run, budget_s=args.budget_s, copy_gbps=copy,
                command=" ".join(["python -m tritonorm.gpu_report.bench_stage", *sys.argv[1:]]))
    if args.dry_run:
        prov["note"] = DRY_RUN_NOTE
    doc = {"provenance": prov, "rows": [], "planned": len(work), "missing": missing, "stopped": None}
    write(args.json, doc)
    last = 0.0
    for i, (case, dt, mode) in enumerate(work):
        left = deadline - time.monotonic()
        if left < max(5.0, 1.2 * last):  # the next row would likely not finish in time
            doc["stopped"] = f"time budget: {i} of {len(work)} rows done"
            print(doc["stopped"])
            break
        t0 = time.monotonic()
        try:
            row = gpu.measure_row(case, dt, mode, NAMES, copy, device=device, timer=timer)
        except Exception as exc:  # one row failing (inputs, plan) is a result; the next still runs
            row = {"suite": case.suite, "case": case.name, "kind": case.kind, "shape": list(case.shape),
                   "channels_last": case.channels_last, "dtype": dt, "mode": mode,
                   "error": f"{type(exc).__name__}: {exc}"[:300], "providers": {}}
        last = time.monotonic() - t0
        row["wall_s"] = round(last, 2)
        # Python threads alive (torch.compile's workers stay after their first row): they compete
        # for the GIL our backward takes in autograd's device thread; the wall figures may show it.
        row["python_threads"] = threading.active_count()
        if args.dry_run:
            row["dry_run"] = True
        doc["rows"].append(row)
        ours = row["providers"].get("tritonorm", {})
        print(f"[{i + 1}/{len(work)}] {case.suite}: {case.name} {dt} {mode}: "
              + (f"tritonorm {ours['ms'] * 1e3:.1f} us ({ours['method']}; wall {(ours.get('wall_ms') or 0) * 1e3:.1f}), "
                 f"x eager {row.get('speedup_eager', 0):.2f}, x compile {row.get('speedup_compile', 0):.2f}"
                 if "ms" in ours
                 else f"tritonorm {ours.get('error', row.get('error', 'not timed'))}")
              + f" ({last:.1f} s)", flush=True)
        doc["summary"] = gpu.summarize(doc["rows"])
        write(args.json, doc)
        if device == "cuda":
            torch.cuda.empty_cache()
    ok_rows = [r for r in doc["rows"] if "model" in r]
    if ok_rows:
        gpu.print_table(ok_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
