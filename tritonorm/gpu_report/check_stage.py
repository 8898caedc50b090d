"""Stage 4 of the GPU report: do the CPU-side predictions hold on the GPU?

- Launches per call: the cost model's count (``explain(...).cost.launches``, forward, and
  forward + backward) against the launches a ``LaunchRecorder(launch=True)`` counts around one
  real call, after a warm-up call (compiles) outside the recorder.
- JIT variants: the compiles the host benchmark's stubbed launcher counts as the batch goes
  1..B (``tritonorm.bench.host.jit_variants``, no GPU needed) against the compiled variants
  Triton's caches hold after the same calls run for real.

The third prediction, the cost model's microseconds against measured ones, is in every bench
row (``model``); the report's summary puts the ratios side by side.

Dry run (no GPU): launches are counted with the launcher planning for the h200 profile and
every launch stubbed (``planning_for`` + ``LaunchRecorder(launch=False)``), on the scaled cases;
the real-variant side is skipped (nothing compiles without a GPU).

    python -m tritonorm.gpu_report.check_stage --json PATH [--dry-run] [--batches B]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

LAUNCH_CASES = (
    ("resnet50", "bn 64x112^2 b32"), ("resnet50", "bn 64x112^2 b256 cl"), ("resnet50", "bn 2048x7^2 b256 cl"),
    ("sd-unet", "gn32+silu 320x64^2 b2"), ("sd-unet", "gn32+silu 320x64^2 b2 cl"),
    ("sd-unet", "gn32+silu 1280x8^2 b8"), ("llm", "ln 4096x4096"), ("llm", "rms 32x4096"),
    ("llm", "ln 4096x16384"), ("nnunet", "in3d 32x128^3 b2"), ("nnunet", "in3d 320x8^3 b2"),
    ("ghost-bn", "gbn 64x112^2 b256/32"),
)
VARIANT_CASES = ("gn32+silu 320x64^2 b2", "ln 4096x4096")


def _cases(names, dry_run: bool):
    from tritonorm.tuning import suites

    by_name = {(c.suite, c.name): c for s in suites.SUITES for c in suites.cases(s)}
    found = [by_name[k] for k in names if k in by_name]
    return [c.scaled() for c in found] if dry_run else found


def _call(case, x, kw, mode):
    import torch

    import tritonorm

    if mode == "fwd":
        with torch.no_grad():
            tritonorm.norm(x, case.scope, **kw)
        return
    leaves = [t for t in (x, kw.get("weight"), kw.get("bias")) if t is not None]
    y = tritonorm.norm(x, case.scope, **kw)
    torch.autograd.grad(y, leaves, torch.ones_like(y))


def _predicted(case, x, kw, mode, device) -> int | None:
    import tritonorm

    xm = x.detach()
    kwm = {k: (v.detach() if hasattr(v, "detach") else v) for k, v in kw.items()}
    ops = ("forward",) if mode == "fwd" else ("forward", "backward")
    costs = [tritonorm.explain(xm, case.scope, op=op, device=device, **kwm).cost for op in ops]
    return None if any(c is None for c in costs) else sum(c.launches for c in costs)


def launches(dry_run: bool, rows: list, deadline: float, save) -> None:
    """Appends one row per (case, mode) to ``rows``, calling ``save`` after each; stops at
    ``deadline`` (time.monotonic)."""
    import torch

    from tritonorm.aot.record import LaunchRecorder, planning_for
    from tritonorm.tuning.suites import make_inputs

    device, profile = ("cpu", "h200") if dry_run else ("cuda", None)
    plan_ctx = (lambda: planning_for("h200")) if dry_run else contextlib.nullcontext
    for case in _cases(LAUNCH_CASES, dry_run):
        for mode in ("fwd", "fwd+bwd"):
            if time.monotonic() > deadline:
                print("launch check: time budget reached")
                return
            row = {"suite": case.suite, "case": case.name, "dtype": "bf16", "mode": mode}
            try:
                with plan_ctx():
                    x, kw = make_inputs(case, torch.bfloat16, device, requires_grad=mode != "fwd")
                    row["predicted"] = _predicted(case, x, kw, mode, profile)
                    if not dry_run:
                        _call(case, x, kw, mode)  # compile outside the count
                    with LaunchRecorder(describe=False, launch=not dry_run) as rec:
                        _call(case, x, kw, mode)
                    if not dry_run:
                        torch.cuda.synchronize()
                row["measured"] = rec.count
                row["match"] = row["predicted"] == row["measured"]
            except Exception as exc:  # recorded, and the next case still runs
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            save()
            print(f"launches {case.name} {mode}: predicted {row.get('predicted')}, measured "
                  f"{row.get('measured')}" + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)


def _real_variants(case, batches) -> dict:
    """Compiled variants per kernel after real calls at each batch size (on the GPU)."""
    import torch

    import tritonorm
    from tritonorm.bench.host import _forget_compiled
    from tritonorm.kernels import backward as bk, forward as fk

    _forget_compiled()
    for n in batches:
        shape = (n * max(1, case.sample_groups),) + tuple(case.shape[1:])
        x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        if case.channels_last:
            x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        x.requires_grad_()
        kw = dict(num_groups=case.num_groups, center=case.center, activation=case.activation)
        leaves = [x]
        if case.affine:
            kw["weight"] = torch.ones(shape[1], dtype=torch.bfloat16, device="cuda", requires_grad=True)
            leaves.append(kw["weight"])
            if case.center:
                kw["bias"] = torch.zeros(shape[1], dtype=torch.bfloat16, device="cuda", requires_grad=True)
                leaves.append(kw["bias"])
        y = tritonorm.norm(x, case.scope, **kw)
        torch.autograd.grad(y, leaves, torch.randn_like(y))
    torch.cuda.synchronize()
    out = {}
    for module in (fk, bk):
        for value in vars(module).values():
            caches = getattr(value, "device_caches", None)
            if caches:
                n = sum(len(c[0]) for c in caches.values())
                if n:
                    out[value.fn.__name__] = out.get(value.fn.__name__, 0) + n
    return out


def variants(dry_run: bool, batches: int, rows: list, deadline: float, save) -> None:
    from tritonorm.bench import host
    from tritonorm.tuning import suites

    chosen = [c for s in suites.SUITES for c in suites.cases(s) if c.name in VARIANT_CASES]
    for case in chosen:
        if time.monotonic() > deadline:
            print("JIT variant check: time budget reached")
            return
        row = {"case": case.name, "batches": [1, batches]}
        try:
            row["predicted"] = host.jit_variants(case, batches=range(1, batches + 1))
            if dry_run:
                row["measured"] = "skipped (dry-run: nothing compiles without a GPU)"
            else:
                row["measured"] = _real_variants(case, range(1, batches + 1))
                row["match"] = row["predicted"] == row["measured"]
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        save()
        print(f"JIT variants {case.name}, batch 1..{batches}: predicted {row.get('predicted')}, "
              f"measured {row.get('measured')}" + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tritonorm.gpu_report.check_stage")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--batches", type=int, default=8, help="JIT variants: batch sizes 1..B")
    ap.add_argument("--budget-s", type=float, default=60.0, help="start nothing new after this")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    # The stubbed variant count needs Triton's compiled-mode launcher: import it first (it sets
    # TRITON_INTERPRET=0 before triton loads), and count stub variants before anything compiles.
    import tritonorm.bench.host  # noqa: F401

    deadline = t0 + args.budget_s
    doc = {"dry_run": args.dry_run, "launches": [], "variants": []}

    def save():  # after every row: a kill at the stage's limit keeps what was checked
        doc["wall_s"] = round(time.monotonic() - t0, 1)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")

    # Launches first (real launches on the GPU), then variants: jit_variants' stubbed count
    # starts from empty kernel caches whatever ran before, and _real_variants empties them again.
    launches(args.dry_run, doc["launches"], deadline, save)
    variants(args.dry_run, args.batches, doc["variants"], deadline, save)
    save()
    bad = [r for r in doc["launches"] if r.get("match") is False or "error" in r]
    print(f"launch counts: {len(doc['launches']) - len(bad)}/{len(doc['launches'])} as predicted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
