"""The ``tritonorm`` command: ``bench``, ``tune`` and ``explain``.

    tritonorm --version
    tritonorm bench [--suite S] [--dtype fp32,bf16] [--mode fwd,bwd] [--providers ...] [--out DIR] [--json PATH]
    tritonorm bench --memory [--suite S] [--dtype ...] [--filter TEXT] [--providers compile] [--json PATH]
    tritonorm bench --host [--json PATH]
    tritonorm bench --model [h100|h200] [--suite S] [--dtype ...] [--filter TEXT] [--json PATH]
    tritonorm bench --l2 [h100|h200] [--suite S] [--filter TEXT] [--json PATH]
    tritonorm tune  [--suite S] [--dtype ...] [--op forward,backward] [--dry-run] [--limit N] [--budget-s S] [--output FILE]
    tritonorm explain --shape 1,320,64,64 --scope group --groups 32 [--device h100]

Bad input is one line on stderr naming the argument (``tritonorm explain: error: argument
--groups: ...``) and exit status 2, never a traceback; ``main`` returns the status instead of
exiting, so it can be called in-process. Nothing here imports triton before deciding whether the
interpreter is needed (Triton reads TRITON_INTERPRET when it is imported).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from . import __version__
from .tuning import suites as suites_mod

SUITE_CHOICES = suites_mod.SUITES + ("all",)
PROFILE_NAMES = ("h100", "h200", "interpreter")  # dispatch.PROFILES, without importing dispatch
MAX_DEFAULT_GROUPS = 32


class UsageError(Exception):
    """Bad command-line input: reported as ``prog: error: argument FLAG: message``, status 2."""

    def __init__(self, flag: str | None, message: str, prog: str | None = None):
        super().__init__(message)
        self.flag, self.prog = flag, prog


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is raised (one line, in main) instead of usage + exit."""

    def error(self, message):
        raise UsageError(None, f"{message} (see `{self.prog} --help`)", self.prog)


def _csv(choices):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {', '.join(choices)}")
        return items
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _shape(text: str) -> tuple[int, ...]:
    """``1,320,64,64``, ``1x320x64x64`` or ``1 320 64 64``."""
    parts = [p for p in re.split(r"[,x×\s]+", text.strip().lower()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by ',' or 'x', "
                                         f"e.g. 1,320,64,64") from None
    if not 2 <= len(shape) <= 5:
        raise argparse.ArgumentTypeError(f"{text!r} has {len(shape)} dims; expected (N, C, *spatial) "
                                         f"with 2 to 5 dims")
    if any(s < 0 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be >= 0")
    return shape


def _explain_device(text: str) -> str:
    """A profile name, 'local' (this machine), or a torch device that exists here."""
    key = text.strip().lower()
    if key in PROFILE_NAMES or key == "local":
        return key
    import torch

    try:
        dev = torch.device(key)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a profile ({', '.join(PROFILE_NAMES)}), "
                                         f"'local' nor a torch device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is visible here; pass a profile "
                                             f"({', '.join(PROFILE_NAMES[:2])}) to plan for a GPU from this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: expected a profile ({', '.join(PROFILE_NAMES)}), "
                                         f"'local', cpu or cuda[:N]")
    return key


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tritonorm", description="Triton normalization kernels: benchmarks, tuning and "
                "dispatch plans. Bad input exits with status 2 and one line naming the argument.")
    p.add_argument("--version", action="version", version=f"tritonorm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{bench,tune,explain}")
    sub.required = True

    b = sub.add_parser("bench", help="benchmark suite (GPU: timed table, JSON, plots; no GPU: "
                       "correctness-and-dispatch report through the interpreter)",
                       description="Times tritonorm against eager PyTorch and torch.compile (and apex/"
                       "Liger when importable) on model shapes. Without a GPU, runs the suite scaled "
                       "down in Triton's interpreter and reports errors and chosen kernels only (no "
                       "timings). A progress bar goes to stderr when tqdm is installed and stderr is a "
                       "terminal.")
    b.add_argument("--suite", choices=SUITE_CHOICES, default="all", help="model suite (default: all)")
    b.add_argument("--dtype", type=_csv(("fp32", "bf16", "fp16")), default=None,
                   help="dtypes, comma-separated (default: fp32,bf16,fp16 on GPU; fp32,bf16 on CPU)")
    b.add_argument("--mode", type=_csv(("fwd", "bwd", "fwd+bwd")), default=None,
                   help="modes, comma-separated (default: all three; GPU only)")
    b.add_argument("--providers", type=_csv(("tritonorm", "eager", "compile", "apex", "liger")),
                   default=None, help="providers (default: all that are importable; GPU only; with "
                   "--memory, 'compile' adds torch.compile's saved bytes, compiling every case)")
    b.add_argument("--filter", default=None, metavar="TEXT",
                   help="only cases whose name contains this text (or one of these comma-separated texts)")
    b.add_argument("--out", type=Path, default=None,
                   help="results folder for the JSON and plots (default on a GPU: ./tritonorm-bench; "
                   "without a GPU nothing is written unless --out or --json is given)")
    b.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the rows and provenance (device, versions, git commit) to this file")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    b.add_argument("--host", action="store_true",
                   help="instead: host CPU time per call with the GPU launch stubbed (Triton's binder "
                   "included), launches per call and JIT variants as the batch varies, beside eager's "
                   "host path; runs on any machine (python -m tritonorm.bench.host)")
    b.add_argument("--memory", action="store_true",
                   help="instead of timing: bytes saved for backward per call, tritonorm beside eager "
                   "(measured on CPU with saved_tensors_hooks; no GPU needed)")
    b.add_argument("--model", nargs="?", const="h200", choices=PROFILE_NAMES[:2], default=None, metavar="PROFILE",
                   help="instead: the cost model of every case on a GPU profile (h100 or h200, default "
                   "h200), forward and backward: regime, launches, bytes against the ideal, predicted us; "
                   "plans on meta tensors, runs nothing (any machine)")
    b.add_argument("--l2", nargs="?", const="h200", choices=PROFILE_NAMES[:2], default=None, metavar="PROFILE",
                   help="instead: an LRU model of what the L2 serves of the calls that read x twice (split "
                   "and looped regimes on the row kernels, LayerNorm rows' column sums, split on the "
                   "whole-pixel kernels, looped on the planes kernels; bf16): their launches recorded as planned for "
                   "the profile and replayed, bytes requested beside the HBM bytes left, then every case "
                   "counted against the bytes targets in HBM bytes; a model, not a measurement; minutes "
                   "for the whole suite (any machine)")

    t = sub.add_parser("tune", help="measure candidate plans on this GPU and store the fastest "
                       "in the tuning cache", description="Sweeps launch plans for the suite shapes on "
                       "the local CUDA GPU (device time by CUDA-graph replay) and writes the winners to the tuning "
                       "cache ($TRITONORM_CACHE_DIR, default ~/.cache/tritonorm). Without a GPU it says "
                       "so and exits; --dry-run lists what would be tuned on any machine, with the "
                       "problem and candidate counts.")
    t.add_argument("--suite", choices=SUITE_CHOICES, default="all", help="model suite (default: all)")
    t.add_argument("--dtype", type=_csv(("fp32", "bf16", "fp16")), default=["fp32", "bf16", "fp16"],
                   help="dtypes, comma-separated (default: fp32,bf16,fp16)")
    t.add_argument("--op", type=_csv(("forward", "backward")), default=["forward", "backward"],
                   help="ops, comma-separated (default: forward,backward)")
    t.add_argument("--dry-run", action="store_true", help="list the problems and candidate counts; run nothing")
    t.add_argument("--device", choices=(*PROFILE_NAMES[:2], "local"), default=None,
                   help="profile for --dry-run: h100, h200, or local (this machine's GPU; the default "
                   "when one is visible, else h100). Tuning itself always measures the local GPU")
    t.add_argument("--filter", default=None, metavar="TEXT",
                   help="only cases whose name contains one of these comma-separated texts "
                   "(e.g. 'bn 64x112^2 b256 cl,gn32+silu 320x64^2 b2 cl'), in that order")
    t.add_argument("--limit", type=_positive_int, default=None, help="tune only the first N problems")
    t.add_argument("--budget-s", type=_positive_int, default=None, metavar="SECONDS",
                   help="start no new problem after this many seconds; the problems done are written")
    t.add_argument("--output", type=Path, default=None,
                   help="write a shipped-table file here instead of the user's cache")

    e = sub.add_parser("explain", help="print the plan tritonorm would run for a shape",
                       description="The dispatcher's plan (regime, launch config, reason) for an input "
                       "of the given shape, on a GPU profile or this machine; runs nothing.")
    e.add_argument("--shape", type=_shape, required=True, help="e.g. 1,320,64,64 or 1x320x64x64")
    e.add_argument("--scope", default="group", help="scope alias or axis letters (default: group)")
    e.add_argument("--groups", type=_positive_int, default=None,
                   help=f"num_groups (default for group scopes: the largest divisor of C up to "
                   f"{MAX_DEFAULT_GROUPS}, printed)")
    e.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    e.add_argument("--channels-last", action="store_true", help="channels_last (4-D) or channels_last_3d (5-D)")
    e.add_argument("--activation", default=None)
    e.add_argument("--rms", action="store_true", help="center=False")
    e.add_argument("--op", choices=("forward", "backward", "dwdb"), default="forward")
    e.add_argument("--device", type=_explain_device, default="h100",
                   help=f"profile ({', '.join(PROFILE_NAMES)}), 'local' (this machine) or a torch "
                   "device that exists here (default: h100)")
    return p


# ---------------------------------------------------------------------------------------- bench


def cmd_bench(args) -> int:
    if args.host:
        import subprocess

        # A fresh process: the stubbed launcher needs triton imported without the interpreter.
        cmd = [sys.executable, "-m", "tritonorm.bench.host", "--variants"]
        if args.json is not None:
            cmd += ["--json", str(args.json)]
        return subprocess.call(cmd)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from .bench import runner

    if args.memory:
        return _bench_memory(args)
    if args.model is not None:
        return _bench_model(args)
    if args.l2 is not None:
        from .bench import l2

        l2.report(_selected_cases(args), args.l2, json_path=args.json, progress=not args.quiet)
        return 0
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path is not None and path.exists() and (path.is_dir() if flag == "--json" else not path.is_dir()):
            raise UsageError(flag, f"{str(path)!r} exists and is a {'folder' if path.is_dir() else 'file'}")
    try:
        runner.run(suite=args.suite, dtypes=args.dtype, modes=args.mode, names=args.providers,
                   out_dir=args.out, json_path=args.json, plots=not args.no_plots,
                   name_filter=args.filter, progress=not args.quiet)
    except runner.NoCases as exc:
        raise UsageError("--filter", str(exc)) from None
    return 0


def _selected_cases(args) -> list:
    """The cases of ``--suite``/``--filter`` for the modes that run no timing (a usage error when
    none matches or ``--json`` names a folder)."""
    from .bench import shapes

    if args.json is not None and args.json.is_dir():
        raise UsageError("--json", f"{str(args.json)!r} exists and is a folder")
    case_list = shapes.select(args.suite, args.filter)
    if not case_list:
        raise UsageError("--filter", f"no case of suite {args.suite!r} matches {args.filter!r}")
    return case_list


def _bench_model(args) -> int:
    """``bench --model``: the cost model of every selected case (bench/model.py)."""
    import json

    from .bench import model, shapes
    from .bench.table import format_table

    case_list = _selected_cases(args)
    rows = [model.report(case, shapes.DTYPES[dt], args.model) for dt in (args.dtype or ["bf16"])
            for case in case_list]
    head = ("suite", "case", "dtype", "fwd regime", "fwd launches", "fwd bytes/ideal", "fwd us",
            "bwd regime", "bwd launches", "bwd bytes/ideal", "bwd us")
    print(f"Cost model on the {args.model} profile (tritonorm/cost.py; predicted, not measured)")
    print(format_table(head, [(r["suite"], r["case"], r["dtype"], r["forward"]["kernel"], r["forward"]["launches"],
                               r["forward"]["ratio"], r["forward"]["us"], r["backward"]["kernel"],
                               r["backward"]["launches"], r["backward"]["ratio"], r["backward"]["us"])
                              for r in rows]))
    print(model.summary(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def _bench_memory(args) -> int:
    """``bench --memory``: saved-for-backward bytes of every selected case (bench/memory.py)."""
    import json

    from .bench import memory, shapes
    from .bench.table import format_table

    case_list = _selected_cases(args)
    compiled = "compile" in (args.providers or ())
    rows = [memory.report(case, shapes.DTYPES[dt], compiled) for dt in (args.dtype or ["fp32", "bf16"])
            for case in case_list]
    head = ("suite", "case", "dtype", "measured at", "tritonorm MiB", "eager MiB", "ratio")
    if compiled:
        head += ("compile MiB", "ratio vs compile")
    print(format_table(head, [(r["suite"], r["case"], r["dtype"], r["shape"], r["tritonorm_bytes"] / 2**20,
                               r["eager_bytes"] / 2**20, r["ratio"])
                              + ((r["compile_bytes"] / 2**20, r["ratio_compile"]) if compiled else ())
                              for r in rows]))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------- tune


def cmd_tune(args) -> int:
    import torch

    from . import dispatch
    from .bench.table import format_table
    from .tuning import sweep

    suites = list(suites_mod.SUITES) if args.suite == "all" else [args.suite]
    has_gpu = torch.cuda.is_available()
    if args.device == "local" and not has_gpu:
        raise UsageError("--device", "'local' means this machine's CUDA GPU, and none is visible; "
                         "pass h100 or h200 to list a GPU's problems with --dry-run")
    if not has_gpu and not args.dry_run:
        print("tritonorm tune: no CUDA GPU is visible (torch.cuda.is_available() is False). Tuning "
              "times kernels on the GPU it tunes for, so nothing was tuned. `tritonorm tune --dry-run` "
              "lists what would be tuned.")
        return 0
    if has_gpu and args.device in (None, "local"):
        profile = dispatch.profile_for_device(torch.device("cuda"))
    elif not args.dry_run:
        raise UsageError("--device", f"{args.device!r}: tuning measures this machine's GPU; --device "
                         "picks a profile for --dry-run only")
    else:
        profile = dispatch.profile_named(args.device or "h100")
    task_list = sweep.tasks(suites, args.dtype, args.op, profile)
    if args.filter:
        # In the order given: the first text's cases first (a budget then tunes what matters most).
        task_list = suites_mod.by_name(task_list, args.filter, name=lambda t: t.case.name)
        if not task_list:
            raise UsageError("--filter", f"{args.filter!r} matches no case of the suites {', '.join(suites)}")
    if args.limit is not None:
        task_list = task_list[: args.limit]
    if args.dry_run:
        counts = [len(sweep.candidates(task.problem, profile, task.heuristic)) for task in task_list]
        print(f"would tune {len(task_list)} problems on profile {profile.name} "
              f"(suites: {', '.join(suites)}; dtypes: {','.join(args.dtype)}; ops: {','.join(args.op)}):")
        rows = [(t.case.suite, t.case.name, t.dtype, t.op, n, t.heuristic.kernel, t.key)
                for t, n in zip(task_list, counts)]
        print(format_table(("suite", "case", "dtype", "op", "candidates", "heuristic", "key"), rows,
                           indent=2))
        print(f"{len(task_list)} problems, {sum(counts)} candidate plans in all; nothing was run (--dry-run).")
        return 0
    return _tune_on_gpu(args, profile, task_list)


def _tune_on_gpu(args, profile, task_list) -> int:
    import datetime

    from .tuning import cache, sweep

    from .bench.progress import progress_bar

    bar = progress_bar(len(task_list), "tune", "problem")
    done = [0]

    def progress(task, plan, ms):
        done[0] += 1
        msg = f"{task.case.name} {task.dtype} {task.op}: {plan.kernel if plan else 'failed'} {ms * 1e3:.1f} us"
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(msg[:60])
        else:
            print(f"[{done[0]}/{len(task_list)}] {msg}", flush=True)

    import time

    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    results = sweep.tune(task_list, profile, "cuda", progress, deadline=deadline)
    if bar is not None:
        bar.close()
    if args.output is not None:
        prov = {**cache.versions(), "gpu": profile.gpu_name, "status": "tuned",
                "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
        cap = profile.capability
        doc = cache.TuningFile("table", {"gpu": profile.gpu_name, "capability": f"{cap[0]}.{cap[1]}"},
                               results, prov)
        cache.write_atomic(args.output, doc.to_json())
        print(f"wrote {len(results)} entries to {args.output}")
    else:
        store = cache.user_cache(profile)
        if results:
            store.put_many(results)
        print(f"stored {len(results)} tuned plans in {store.path}"
              + ("" if store.writable else " (in memory only: the location is not writable)"))
    beat = sum(1 for r in results.values() if r.get("heuristic_us") and r["time_us"] < r["heuristic_us"])
    print(f"{beat}/{len(results)} problems found a faster plan than the heuristic's.")
    if sweep.CAPTURE_FAILURES:
        print(f"{len(sweep.CAPTURE_FAILURES)} candidates skipped: their CUDA-graph capture failed "
              f"(first: {sweep.CAPTURE_FAILURES[0]})")
    return 0


# ---------------------------------------------------------------------------------------- explain

# Which option a ValueError/TypeError from tritonorm.explain is about, by the keyword it names.
_KEYWORD_FLAGS = (("num_groups", "--groups"), ("scope", "--scope"), ("activation", "--activation"),
                  ("device", "--device"), ("x must have shape", "--shape"), ("op=", "--op"))


def _default_groups(scope: str, shape: tuple) -> int | None:
    from .scope import ALIASES, DEFAULT_GROUPS

    key = scope.strip().lower()
    if key not in ALIASES or key not in DEFAULT_GROUPS or len(shape) < 2:
        return None
    channels = shape[1]
    return max((g for g in range(1, MAX_DEFAULT_GROUPS + 1) if channels % g == 0), default=1)


def cmd_explain(args) -> int:
    import torch

    from .explain import explain

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shape = args.shape
    x = torch.empty(shape, dtype=dtype, device="meta")
    if args.channels_last:
        if x.dim() not in (4, 5):
            raise UsageError("--channels-last", f"needs a 4-D or 5-D --shape, got {x.dim()}-D")
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    groups = args.groups
    if groups is None:
        groups = _default_groups(args.scope, shape)
        if groups is not None:
            print(f"num_groups: {groups} (default: the largest divisor of C={shape[1]} up to "
                  f"{MAX_DEFAULT_GROUPS}; --groups to choose)")
    device = None if args.device == "local" else args.device
    try:
        plan = explain(x, args.scope, num_groups=groups, activation=args.activation,
                       center=not args.rms, device=device, op=args.op)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        flag = next((f for word, f in _KEYWORD_FLAGS if msg.startswith(word)), None) or next(
            (f for word, f in _KEYWORD_FLAGS if f"{word}=" in msg), None)
        raise UsageError(flag, msg) from None
    print(f"kernel: {plan.kernel}\nconfig: {plan.config}\nreason: {plan.reason}")
    if plan.cost is not None:
        print(f"cost ({args.op}): {plan.cost.summary()}")
    return 0


# ---------------------------------------------------------------------------------------- main


def _error_line(prog: str, exc: UsageError) -> str:
    msg = " ".join(str(exc).split())  # one line, whatever the message held
    return f"{exc.prog or prog}: error: " + (f"argument {exc.flag}: " if exc.flag else "") + msg


def main(argv=None) -> int:
    """Run the command; return its exit status (0 ok, 2 bad input, 1 closed output pipe)."""
    parser = build_parser()
    prog = "tritonorm"
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        prog = f"tritonorm {args.command}"
        code = {"bench": cmd_bench, "tune": cmd_tune, "explain": cmd_explain}[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except UsageError as exc:
        print(_error_line(prog, exc), file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`tritonorm ... | head`): stop quietly. Point stdout at devnull so
        # the interpreter's final flush does not raise again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
