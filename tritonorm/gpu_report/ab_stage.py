"""The GPU report's A/B stage: planning choices made without a GPU, measured both ways.

Each experiment names one switch (a module constant or profile field the launcher reads), the
suite cases it should move, and what was predicted before measuring
(benchmarks/results/h200/NOTES.md). For every case the stage times tritonorm with the switch at
its shipped value (A) and at the alternative (B): device time by CUDA-graph replay over rotating
input sets and the wall time per call (``bench.timing.time_fns``), and checks that A and B
compute the same outputs and gradients (a switch changes grids and tiles, never the function).

Dry run (no GPU): each experiment's first case, scaled, in the interpreter (under the
experiment's ``dry_force`` regime where the switch needs one to matter there), run once per side
and A compared with B; no timing.

    python -m tritonorm.gpu_report.ab_stage --json PATH [--dry-run] [--budget-s S]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tritonorm.gpu_report.proc import write_json as write


@dataclass
class Experiment:
    name: str
    what: str  # the switch, A -> B
    predicted: str
    cases: tuple  # (suite, case name, mode)
    switch: object = field(repr=False, default=None)  # context manager factory: B inside
    # Dry run only: the regime forced on both sides (dispatch.forced keywords), so that the scaled
    # cases take the path the switch changes in the interpreter too.
    dry_force: dict | None = None
    dtype: str = "bf16"  # the inputs' dtype ("bf16" or "fp32")


def _setting(module, attr, value):
    @contextlib.contextmanager
    def cm():
        from tritonorm.kernels import launch

        old = getattr(module, attr)
        setattr(module, attr, value)
        launch.clear()
        try:
            yield
        finally:
            setattr(module, attr, old)
            launch.clear()
    return cm


def _profile_field(name, value):
    @contextlib.contextmanager
    def cm():
        import dataclasses

        from tritonorm import dispatch
        from tritonorm.kernels import launch

        real = dispatch.profile_for_device
        dispatch.profile_for_device = lambda d: dataclasses.replace(real(d), **{name: value})
        launch.clear()
        try:
            yield
        finally:
            dispatch.profile_for_device = real
            launch.clear()
    return cm


def experiments() -> list[Experiment]:
    from tritonorm import dispatch, pixel_plan

    return [
        Experiment("apply_fill", "split-regime apply programs: several tiles each (A) -> one tile each (B)",
                   "A faster where split is large: bn 64x112^2 b32 fwd ~70 us (B ~105), bn cl b256 fwd ~400 us",
                   (("resnet50", "bn 64x112^2 b32", "fwd"), ("resnet50", "bn 64x112^2 b256 cl", "fwd")),
                   _setting(dispatch, "APPLY_FILL", False),
                   dry_force=dict(kernel="split", block_p=4, block_m=256, split=4)),
        Experiment("apply_reverse", "apply passes and looped kernels' second sweeps after a sweep of the same "
                   "data: that sweep run backwards (A) -> in its own order (B, the old order)",
                   "A faster where x and dy are about the L2's size or more: A's re-read starts with what the "
                   "sweep left in the L2 (the L2 model, bench --l2: bn 64x112^2 b32 fwd+bwd 49 MiB, HBM bytes "
                   "1.46/1.67x -> 1.26/1.45x ideal; SD 320x64^2 b8 channels_last bwd 1.43x -> 1.15x; the planes "
                   "kernels' looped bn 2048x7^2 b256 1.47/1.64x -> 1.24/1.42x)",
                   (("resnet50", "bn 64x112^2 b32", "fwd+bwd"), ("sd-unet", "gn32+silu 320x64^2 b8 cl", "fwd+bwd"),
                    ("resnet50", "bn 2048x7^2 b256", "fwd+bwd")),
                   _setting(dispatch, "APPLY_REVERSE", False),
                   dry_force=dict(kernel="split", block_p=4, block_m=256, split=4)),
        Experiment("evict_first", "second passes over data past half the L2 load and store with "
                   "eviction_policy='evict_first' (A) -> no hint (B)",
                   "A faster on 49-64 MiB tensors: what the second pass reads and writes no longer displaces "
                   "the lines it has yet to re-read (the L2 model, bench --l2: bn 64x112^2 b32 fwd/bwd "
                   "1.26/1.45x -> 1.00/1.33x ideal in HBM bytes; in3d 64x64^3 1.32/1.56x -> 1.11/1.41x)",
                   (("resnet50", "bn 64x112^2 b32", "fwd+bwd"), ("nnunet", "in3d 64x64^3 b2", "fwd+bwd")),
                   _setting(dispatch, "EVICT_FIRST", False),
                   dry_force=dict(kernel="split", block_p=4, block_m=256, split=4)),
        Experiment("strided_rows_block", "channels_last BatchNorm tiles 16 x 1024 (A) -> 32 x 128 (B, the old rule)",
                   "A ~3x faster forward (the sweep: 0.47 against 1.49 ms); backward unmeasured",
                   (("resnet50", "bn 64x112^2 b256 cl", "fwd+bwd"),),
                   _profile_field("strided_rows_block", (32, 128))),
        Experiment("pixel_bwd_split_cap", "channels_last GroupNorm backward split at most 16 (A) -> 64 (B)",
                   "B faster: A runs 128 programs of 2 warps for 320x64^2 b2 (~100 us backward)",
                   (("sd-unet", "gn32+silu 320x64^2 b2 cl", "fwd+bwd"),),
                   _setting(pixel_plan, "BACKWARD_SPLIT_CAP", 64)),
        Experiment("pixel_fwd_tile", "channels_last GroupNorm forward pixel tile: half the row tile (A) -> the "
                   "whole row tile (B)",
                   "B faster: A's 16 pixels x 80 channels (2.5 KB) a step leave ~10 KB in flight an SM (run 2: "
                   "31 us against the model's 10)",
                   (("sd-unet", "gn32+silu 320x64^2 b2 cl", "fwd"),),
                   _setting(pixel_plan, "FORWARD_TILE_DIV", 1)),
        Experiment("ln_bwd_rows", "fused LayerNorm backward: the heuristic's 1 row a step (A) -> 2 rows (B)",
                   "B faster: one 4096-wide row of x and dy is 16 KB in flight a program, under the ~36 KB "
                   "an SM needs (run 2: 90 us against the model's 51)",
                   (("llm", "ln 4096x4096", "fwd+bwd"),),
                   lambda: dispatch.forced("fused", op="backward", block_p=2, num_warps=8)),
        Experiment("ln_bwd_programs", "persistent LayerNorm-row backward: 1 program an SM (A) -> 2 (B)",
                   "B faster: one 8-warp program an SM keeps one row of x and dy (16 KB) in flight",
                   (("llm", "ln 4096x4096", "fwd+bwd"),),
                   _setting(dispatch, "COL_PROGRAMS_PER_SM", 2)),
        Experiment("rows_per_program", "LayerNorm-row backward: >= 8 row blocks a program (A) -> 1 (B)",
                   "B faster at 32-256 rows (fewer serial iterations a program; the partials stay in L2)",
                   (("llm", "rms 32x4096", "fwd+bwd"), ("llm", "rms 256x4096", "fwd+bwd")),
                   _setting(dispatch, "ROWS_PER_PROGRAM", 1)),
        Experiment("bn_split", "BatchNorm NCHW 64x112^2 b32 forward: the heuristic's split 256 (A) -> 64 (B)",
                   "B faster: at 256 a partial program reads 1.5 tiles of 1024",
                   (("resnet50", "bn 64x112^2 b32", "fwd"),),
                   lambda: dispatch.forced("split", op="forward", block_p=1, block_m=1024, split=64, num_warps=2)),
        Experiment("ln_fp32_warps", "LayerNorm 4096x8192 fp32 forward: one row on 8 warps (A; 75 registers, no "
                   "spill) -> 16 warps (B, the old plan; Triton 3.6 spills 16 bytes at 40 registers)",
                   "A no slower: 32 fp32 a thread fit, as many bytes in flight an SM, nothing through local memory",
                   (("llm", "ln 4096x8192", "fwd"),),
                   lambda: dispatch.forced("fused", op="forward", block_p=1, num_warps=16), dtype="fp32",
                   dry_force=dict(kernel="fused", op="forward", block_p=1)),
        # Last: the bench stage times the WIDE default on this case anyway (run 2 timed the looped plan).
        Experiment("wide_rows", "backward of rows past the fused limit (LayerNorm 4096x16384): one pass, each "
                   "of a row's 2 tile programs sweeping the row for its sums (A) -> the looped two stages (B)",
                   "A faster: HBM bytes 1.66x -> ~1.05x the ideal (x and dy read once; the L2 serves the other "
                   "tile's sweep, bench --l2), if 1 program of 16 warps an SM (100-126 registers) keeps enough bytes "
                   "in flight (run 2, the looped plan: fwd+bwd 307 us, fwd 81; the ideal bytes of the backward take ~95 us)",
                   (("llm", "ln 4096x16384", "fwd+bwd"),),
                   _setting(dispatch, "WIDE_ROWS", False)),
    ]


def _inputs(case, mode, device, seed, dtype="bf16"):
    """The case's inputs drawn on the host from ``seed`` (the same for A and B)."""
    import torch

    from tritonorm.tuning.suites import make_inputs

    torch.manual_seed(seed)
    return make_inputs(case, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype], device,
                       requires_grad=mode != "fwd", host_rng=True)


def _outputs(case, mode, device, seed, dtype="bf16"):
    """A function returning tritonorm's outputs for the case (y, and every gradient for fwd+bwd)."""
    import torch

    from tritonorm.bench import providers

    x, kw = _inputs(case, mode, device, seed, dtype)
    f = providers.make("tritonorm", case, x, kw)
    leaves = [t for t in (x, kw.get("weight"), kw.get("bias"), kw.get("add_residual")) if t is not None]
    torch.manual_seed(seed + 1)
    y0 = f()
    dy = torch.randn(y0.shape).to(y0)

    def result():
        if mode == "fwd":
            with torch.no_grad():
                return [f()]
        y = f()
        return [y.detach(), *torch.autograd.grad(y, leaves, dy)]

    return result


def _same(a, b) -> dict:
    import torch

    worst = 0.0
    for u, v in zip(a, b):
        u, v = u.double(), v.double()
        if not torch.equal(torch.isfinite(u), torch.isfinite(v)):
            return {"same": False, "why": "non-finite values differ"}
        scale = max(1e-6, u.abs().max().item())
        worst = max(worst, (u - v).abs().max().item() / scale)
    # bf16 outputs: A and B sum in different orders; a rounding step of bf16 is 2^-8 relative.
    return {"same": worst <= 2.0 ** -6, "max_rel_diff": worst}


def run_case(exp: Experiment, case, mode: str, cuda: bool) -> dict:
    from tritonorm import dispatch
    from tritonorm.bench import bytes_model, timing

    device = "cuda" if cuda else "cpu"
    row = {"experiment": exp.name, "suite": case.suite, "case": case.name, "mode": mode, "dtype": exp.dtype}
    force = exp.dry_force if exp.dry_force and not cuda else None

    def forced():
        return dispatch.forced(**force) if force else contextlib.nullcontext()

    def timed():
        nbytes = bytes_model.bytes_moved(case, 4 if exp.dtype == "fp32" else 2, mode)
        fns = [_timed(case, mode, device, s, exp.dtype) for s in range(timing.input_sets(nbytes))]
        t = timing.time_fns(fns, nbytes)
        return {"us": t.ms * 1e3, "wall_us": (t.wall_ms or 0) * 1e3, "method": t.method}

    with forced():
        a = _outputs(case, mode, device, 1234, exp.dtype)()
    with exp.switch():
        with forced():
            b = _outputs(case, mode, device, 1234, exp.dtype)()
        row["check"] = _same(a, b)
        if cuda:
            row["B"] = timed()
    if cuda:
        row["A"] = timed()
        row["B_over_A"] = row["B"]["us"] / row["A"]["us"]
    return row


def _timed(case, mode, device, seed, dtype="bf16"):
    from tritonorm.bench import providers
    from tritonorm.bench.gpu import _mode_fn

    x, kw = _inputs(case, mode, device, 100 + seed, dtype)
    return _mode_fn(providers.make("tritonorm", case, x, kw), mode, x, kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tritonorm.gpu_report.ab_stage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: scaled cases in the interpreter, A == B only")
    ap.add_argument("--budget-s", type=float, default=30.0, help="start no new case after this")
    ap.add_argument("--only", default=None, help="comma-separated experiment names")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    from tritonorm.bench import runner
    from tritonorm.tuning import suites

    cuda = not args.dry_run
    if cuda and not runner.on_gpu():
        print("no CUDA GPU (or TRITON_INTERPRET=1): use --dry-run to rehearse without one")
        return 2
    by_name = {(c.suite, c.name): c for s in suites.SUITES for c in suites.cases(s)}
    exps = experiments()
    if args.only:
        keep = set(args.only.split(","))
        exps = [e for e in exps if e.name in keep]
    doc = {"dry_run": args.dry_run, "experiments": [{"name": e.name, "what": e.what, "predicted": e.predicted}
                                                    for e in exps], "rows": [], "stopped": None}
    # The dry run takes each experiment's first case only (the interpreter is slow).
    work = [(e, by_name[(s, n)], m) for e in exps for s, n, m in (e.cases[:1] if args.dry_run else e.cases)
            if (s, n) in by_name]
    last = 0.0
    for i, (exp, case, mode) in enumerate(work):
        if time.monotonic() - t0 + max(1.0, 1.3 * last) > args.budget_s:
            doc["stopped"] = f"time budget: {i} of {len(work)} rows done"
            print(doc["stopped"])
            break
        t1 = time.monotonic()
        case_run = case.scaled() if args.dry_run else case
        try:
            row = run_case(exp, case_run, mode, cuda)
        except Exception as exc:  # one row failing is a result; the next still runs
            row = {"experiment": exp.name, "case": case.name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:300]}
        last = time.monotonic() - t1
        row["seconds"] = round(last, 2)
        doc["rows"].append(row)
        write(args.json, doc)
        a, b = row.get("A", {}), row.get("B", {})
        print(f"[{i + 1}/{len(work)}] {exp.name}: {case.name} {mode}: "
              + (f"A {a['us']:.1f} us, B {b['us']:.1f} us (B/A {row['B_over_A']:.2f})" if a and b else "")
              + f" A==B {row.get('check', {}).get('same')}" + (f" ERROR {row['error']}" if "error" in row else "")
              + f" ({last:.1f} s)", flush=True)
    write(args.json, doc)
    bad = [r for r in doc["rows"] if "error" in r or not r.get("check", {}).get("same", False)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
