"""The ``tritonorm`` command: ``bench``, ``tune`` and ``explain``.

    tritonorm bench [--suite S] [--dtype fp32,bf16] [--mode fwd,bwd] [--providers ...]
    tritonorm tune  [--suite S] [--dtype ...] [--op forward,backward] [--dry-run] [--output FILE]
    tritonorm explain --shape 1,320,64,64 --scope group --groups 32 [--device h100]

Nothing here imports triton before deciding whether the interpreter is needed (Triton reads
TRITON_INTERPRET when it is imported).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SUITE_CHOICES = ("resnet50", "sd-unet", "llm", "nnunet", "all")


def _csv(choices):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tritonorm", description="Triton normalization kernels: "
                                "benchmarks, tuning and dispatch plans.")
    sub = p.add_subparsers(dest="command", metavar="{bench,tune,explain}")
    sub.required = True

    b = sub.add_parser("bench", help="benchmark suite (GPU: timed table, JSON, plots; no GPU: "
                       "correctness-and-dispatch report through the interpreter)",
                       description="Times tritonorm against eager PyTorch and torch.compile (and apex/"
                       "Liger when importable) on model shapes. Without a GPU, runs the suite scaled "
                       "down in Triton's interpreter and reports errors and chosen kernels only.")
    b.add_argument("--suite", choices=SUITE_CHOICES, default="all", help="model suite (default: all)")
    b.add_argument("--dtype", type=_csv(("fp32", "bf16", "fp16")), default=None,
                   help="dtypes, comma-separated (default: fp32,bf16,fp16 on GPU; fp32,bf16 on CPU)")
    b.add_argument("--mode", type=_csv(("fwd", "bwd", "fwd+bwd")), default=None,
                   help="modes, comma-separated (default: all three; GPU only)")
    b.add_argument("--providers", type=_csv(("tritonorm", "eager", "compile", "apex", "liger")),
                   default=None, help="providers (default: all that are importable; GPU only)")
    b.add_argument("--filter", default=None, help="only cases whose name contains this text")
    b.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    t = sub.add_parser("tune", help="measure candidate plans on this GPU and store the fastest "
                       "in the tuning cache", description="Sweeps launch plans for the suite shapes on "
                       "the local CUDA GPU (triton.testing.do_bench) and writes the winners to the tuning "
                       "cache ($TRITONORM_CACHE_DIR, default ~/.cache/tritonorm). Without a GPU it says "
                       "so and exits; --dry-run lists what would be tuned on any machine.")
    t.add_argument("--suite", choices=SUITE_CHOICES, default="all", help="model suite (default: all)")
    t.add_argument("--dtype", type=_csv(("fp32", "bf16", "fp16")), default=["fp32", "bf16", "fp16"],
                   help="dtypes, comma-separated (default: fp32,bf16,fp16)")
    t.add_argument("--op", type=_csv(("forward", "backward")), default=["forward", "backward"],
                   help="ops, comma-separated (default: forward,backward)")
    t.add_argument("--dry-run", action="store_true", help="list the problems and candidate counts; run nothing")
    t.add_argument("--device", default=None, help="profile for --dry-run without a GPU (default: h100)")
    t.add_argument("--limit", type=int, default=None, help="tune only the first N problems")
    t.add_argument("--output", type=Path, default=None,
                   help="write a shipped-table file here instead of the user's cache")

    e = sub.add_parser("explain", help="print the plan tritonorm would run for a shape",
                       description="The dispatcher's plan (regime, launch config, reason) for an input "
                       "of the given shape, on a GPU profile or this machine; runs nothing.")
    e.add_argument("--shape", required=True, help="comma-separated, e.g. 1,320,64,64")
    e.add_argument("--scope", default="group", help="scope alias or axis letters (default: group)")
    e.add_argument("--groups", type=int, default=None, help="num_groups")
    e.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    e.add_argument("--channels-last", action="store_true")
    e.add_argument("--activation", default=None)
    e.add_argument("--rms", action="store_true", help="center=False")
    e.add_argument("--op", choices=("forward", "backward", "dwdb"), default="forward")
    e.add_argument("--device", default="h100", help="profile name (h100, h200, interpreter) or 'local'")
    return p


def _find_benchmarks():
    """Import the repository's benchmarks package (it is not installed with the wheel)."""
    try:
        from benchmarks import runner  # noqa: F401
        return runner
    except ImportError:
        pass
    root = Path(__file__).resolve().parent.parent
    if (root / "benchmarks" / "runner.py").is_file():
        sys.path.insert(0, str(root))
        from benchmarks import runner
        return runner
    return None


def cmd_bench(args) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    runner = _find_benchmarks()
    if runner is None:
        print("tritonorm bench: the benchmark suite lives in benchmarks/ of the source repository; "
              "run this from a checkout (`make bench`).", file=sys.stderr)
        return 2
    runner.run(suite=args.suite, dtypes=args.dtype, modes=args.mode, names=args.providers,
               out_dir=args.out, plots=not args.no_plots, name_filter=args.filter)
    return 0


def cmd_tune(args) -> int:
    import torch

    from . import dispatch
    from .tuning import sweep

    suites = ["resnet50", "sd-unet", "llm", "nnunet"] if args.suite == "all" else [args.suite]
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.dry_run:
        print("tritonorm tune: no CUDA GPU is visible (torch.cuda.is_available() is False). Tuning "
              "times kernels on the GPU it tunes for, so nothing was tuned. `tritonorm tune --dry-run` "
              "lists what would be tuned.")
        return 0
    if has_gpu and args.device is None:
        profile = dispatch.profile_for_device(torch.device("cuda"))
    else:
        profile = dispatch.profile_named(args.device or "h100")
    task_list = sweep.tasks(suites, args.dtype, args.op, profile)
    if args.limit is not None:
        task_list = task_list[: args.limit]
    if args.dry_run:
        total = 0
        print(f"would tune {len(task_list)} problems on profile {profile.name} "
              f"(suites: {', '.join(suites)}; dtypes: {','.join(args.dtype)}; ops: {','.join(args.op)}):")
        for task in task_list:
            n = len(sweep.candidates(task.problem, profile))
            total += n
            print(f"  {task.case.suite:9s} {task.case.name:30s} {task.dtype:4s} {task.op:8s} "
                  f"{n:3d} candidates  heuristic: {task.heuristic.kernel}  key {task.key}")
        print(f"{total} candidate plans in all; nothing was run (--dry-run).")
        return 0
    return _tune_on_gpu(args, profile, task_list)


def _tune_on_gpu(args, profile, task_list) -> int:
    import datetime

    from .tuning import cache, sweep

    bar = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(task_list), desc="tune", unit="problem")
    except ImportError:
        pass
    done = [0]

    def progress(task, plan, ms):
        done[0] += 1
        msg = f"{task.case.name} {task.dtype} {task.op}: {plan.kernel if plan else 'failed'} {ms * 1e3:.1f} us"
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(msg[:60])
        else:
            print(f"[{done[0]}/{len(task_list)}] {msg}", flush=True)

    results = sweep.tune(task_list, profile, "cuda", progress)
    if bar is not None:
        bar.close()
    if args.output is not None:
        prov = {**cache.versions(), "gpu": profile.gpu_name, "status": "tuned",
                "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
        cap = profile.capability
        data = {"format": cache.FORMAT, "version": cache.VERSION, "kind": "table",
                "validators": {"gpu": profile.gpu_name, "capability": f"{cap[0]}.{cap[1]}"},
                "provenance": prov, "entries": results}
        cache.write_atomic(args.output, data)
        print(f"wrote {len(results)} entries to {args.output}")
    else:
        store = cache.user_cache(profile)
        if results:
            store.put_many(results)
        print(f"stored {len(results)} tuned plans in {store.path}"
              + ("" if store.writable else " (in memory only: the location is not writable)"))
    beat = sum(1 for r in results.values() if r.get("heuristic_us") and r["time_us"] < r["heuristic_us"])
    print(f"{beat}/{len(results)} problems found a faster plan than the heuristic's.")
    return 0


def cmd_explain(args) -> int:
    import torch

    from .explain import explain

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shape = tuple(int(s) for s in args.shape.split(","))
    x = torch.empty(shape, dtype=dtype, device="meta")
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    device = None if args.device == "local" else args.device
    plan = explain(x, args.scope, num_groups=args.groups, activation=args.activation,
                   center=not args.rms, device=device, op=args.op)
    print(f"kernel: {plan.kernel}\nconfig: {plan.config}\nreason: {plan.reason}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"bench": cmd_bench, "tune": cmd_tune, "explain": cmd_explain}[args.command](args)
