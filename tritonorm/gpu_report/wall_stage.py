"""Stage ``wall`` of the GPU report: where a call's wall time goes on the GPU machine.

The first GPU run measured tritonorm's wall time per call, calls launched back to back from
Python, at 2-4x what the host benchmark (``python -m tritonorm.bench.host``: launch stubbed,
thread CPU time) predicts, and well above eager. This stage takes a few cases apart, fwd (no
grad) and fwd+bwd (``torch.autograd.grad`` of a fresh forward, as the bench does), tritonorm
beside eager PyTorch as the control:

1. wall microseconds per call: ``perf_counter`` around N back-to-back calls and one
   synchronize at the end (and CUDA events around the same calls); beside it the host's
   enqueue time (before that synchronize) and the CPU time the calls took (process, and the
   calling thread): CPU time well under the enqueue time means the host waited, not worked;
2. the same with direct launches off (``fastlaunch.enabled(False)``), and per call the launches
   that went direct (``fastlaunch.ON_DIRECT_LAUNCH``) and through ``JITFunction.run``; the
   direct launchers alive, and which of them gave up (``usable`` False);
3. whether a call synchronizes: a GPU sleep enqueued first (``torch.cuda._sleep``), then one
   call timed on the host; a call as long as the sleep waited for the GPU. torch's sync debug
   mode around a few calls names any synchronizing torch op and the Python line that ran it;
   the caching allocator's cudaMalloc count over the timed calls;
4. cProfile of the calls (after warm-up): the top functions by cumulative and by own time, as
   text in the JSON (the device tool returns 8 files at most). cProfile sees the calling
   thread; autograd runs a CUDA backward in its own thread, so torch.profiler's table (all
   threads, CUDA runtime calls included) of a few fwd+bwd calls follows, budget permitting;
5. one launch of a trivial kernel through ``kernel[grid]`` and through a direct ``Launcher``,
   Triton's ``driver.active.get_current_device``/``get_current_stream`` and torch's smallest op:
   what the host bench's stub cannot see.

Dry run (no GPU): the same code on scaled cases in the interpreter, a few calls each; every
figure is the interpreter's on CPU and marked not meaningful; the GPU-only probes say skipped.

    python -m tritonorm.gpu_report.wall_stage --json PATH [--dry-run] [--budget-s S]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import gc
import io
import os
import pstats
import sys
import threading
import time
import warnings
from pathlib import Path

from tritonorm.gpu_report.proc import write_json as write

CASES = (("llm", "rms 32x4096"), ("llm", "ln 4096x4096"), ("sd-unet", "gn32+silu 320x64^2 b2"))
MODES = ("fwd", "fwd+bwd")
SLEEP_MS = 20.0  # the GPU sleep ahead of a probed call; a call that waits over half of it synchronized
TOP = 25
DRY_NOTE = "dry run: the interpreter on CPU tensors, scaled cases, a few calls: figures NOT meaningful"


# ----------------------------------------------------------------------------- launch counting


class Counts:
    """Launches seen while ``on``: direct ones (fastlaunch's hook) and those through Triton's
    ``run`` (compiled ``JITFunction`` or the interpreter's ``InterpretedFunction``), by kernel."""

    def __init__(self):
        self.on = False
        self.direct = collections.Counter()
        self.run = collections.Counter()
        self._saved = []

    def reset(self):
        self.direct.clear()
        self.run.clear()

    def install(self):
        from tritonorm.kernels import fastlaunch

        classes = []
        with contextlib.suppress(ImportError):
            from triton.runtime.jit import JITFunction

            classes.append(JITFunction)
        with contextlib.suppress(ImportError):
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        for cls in classes:  # the class's own run put back as it was (or the inherited one left)
            self._saved.append((cls, cls.__dict__.get("run")))
            cls.run = self._counting(cls.run)
        self._saved.append((fastlaunch, fastlaunch.ON_DIRECT_LAUNCH[0]))
        fastlaunch.ON_DIRECT_LAUNCH[0] = self._direct

    def uninstall(self):
        from tritonorm.kernels import fastlaunch

        for owner, saved in reversed(self._saved):
            if owner is fastlaunch:
                fastlaunch.ON_DIRECT_LAUNCH[0] = saved
            elif saved is None:
                del owner.run
            else:
                owner.run = saved
        self._saved.clear()

    def _direct(self, name):
        if self.on:
            self.direct[name] += 1

    def _counting(self, real):
        counts = self

        def run(self, *args, **kwargs):
            if counts.on and not kwargs.get("warmup"):
                counts.run[_name(self)] += 1
            return real(self, *args, **kwargs)

        return run


def _name(kernel) -> str:
    return getattr(getattr(kernel, "fn", None), "__name__", type(kernel).__name__)


COUNTS = Counts()


def launchers() -> dict:
    """fastlaunch's Launchers alive: how many, how many still launch directly, which gave up."""
    from tritonorm.kernels import fastlaunch

    with warnings.catch_warnings():  # isinstance on every object wakes deprecated lazy modules
        warnings.simplefilter("ignore")
        found = [o for o in gc.get_objects() if _is(o, fastlaunch.Launcher)]
    return {"alive": len(found), "usable": sum(1 for o in found if o.usable),
            "with_compiled": sum(1 for o in found if o.compiled),
            "unusable_kernels": sorted({_name(o.kernel) for o in found if not o.usable})}


def _is(obj, cls) -> bool:
    """isinstance, False where asking raises (lazy-module proxies of other libraries in the
    process: the full test suite imports transformers and diffusers)."""
    try:
        return isinstance(obj, cls)
    except Exception:
        return False


# ---------------------------------------------------------------------------------- measuring


class Env:
    """What the measurements share: CUDA or not (the dry run), calls per figure, warm-up calls."""

    def __init__(self, cuda: bool, calls: int):
        import torch

        self.torch, self.cuda, self.calls = torch, cuda, calls
        self.warmups = 3 if cuda else 1  # compiles and the allocator's first blocks, outside the figures

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def warm(self, fn, n=None):
        for _ in range(self.warmups if n is None else min(n, self.warmups)):
            fn()
        self.sync()

    def mallocs(self):
        if not self.cuda:
            return None
        s = self.torch.cuda.memory_stats()
        return (s.get("num_device_alloc", s.get("segment.all.allocated", 0)), s.get("num_alloc_retries", 0))

    def wall(self, fn) -> dict:
        """Per call over ``calls`` back-to-back calls: wall (one synchronize at the end), enqueue
        (before it), events, process and thread CPU time, launches, cudaMallocs."""
        torch, n = self.torch, self.calls
        self.warm(fn)
        m0 = self.mallocs()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.cuda else None
        COUNTS.reset()
        COUNTS.on = True
        if ev:
            ev[0].record()
        c0, p0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
        for _ in range(n):
            fn()
        c1, p1, t1 = time.perf_counter(), time.process_time(), time.thread_time()
        COUNTS.on = False
        if ev:
            ev[1].record()
        self.sync()
        c2 = time.perf_counter()
        m1 = self.mallocs()
        out = {"calls": n, "wall_us": _us(c2 - c0, n), "enqueue_us": _us(c1 - c0, n),
               "events_us": _us(ev[0].elapsed_time(ev[1]) / 1e3, n) if ev else None,
               "cpu_us": _us(p1 - p0, n), "thread_cpu_us": _us(t1 - t0, n),
               "direct_per_call": sum(COUNTS.direct.values()) / n, "run_per_call": sum(COUNTS.run.values()) / n,
               "run_kernels": dict(COUNTS.run), "direct_kernels": dict(COUNTS.direct)}
        if m0 is not None:
            out["cuda_mallocs"], out["alloc_retries"] = m1[0] - m0[0], m1[1] - m0[1]
        return out


def _us(seconds: float, n: int) -> float:
    return round(seconds * 1e6 / n, 2)


def sleep_cycles(env) -> tuple[int, float] | None:
    """(cycles, ms) of a ``torch.cuda._sleep`` of about SLEEP_MS, or None without one."""
    torch = env.torch
    if not env.cuda or not hasattr(torch.cuda, "_sleep"):
        return None

    def timed(cycles):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    timed(1 << 16)
    ms = max(timed(1 << 22), 1e-3)
    cycles = int((1 << 22) * SLEEP_MS / ms)
    return cycles, timed(cycles)


def sync_probe(env, fn, sleep, trials: int = 3) -> dict:
    """Host time of one call made while the GPU sleeps: about the sleep if the call waited."""
    if sleep is None:
        return {"skipped": "no GPU" if not env.cuda else "no GPU sleep (torch.cuda._sleep: see 'sleep')"}
    cycles, sleep_ms = sleep
    env.warm(fn, 1)
    times = []
    for _ in range(trials):
        env.sync()
        env.torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        env.sync()
    return {"sleep_ms": round(sleep_ms, 2), "call_ms": round(min(times), 3), "max_call_ms": round(max(times), 3),
            "synchronizes": min(times) > 0.5 * sleep_ms}


def sync_debug(env, fn, calls: int = 3) -> dict:
    """torch's sync debug mode around a few calls: the synchronizing torch ops, by Python line."""
    torch = env.torch
    if not env.cuda or not hasattr(torch.cuda, "set_sync_debug_mode"):
        return {"skipped": "no GPU" if not env.cuda else "no torch.cuda.set_sync_debug_mode"}
    env.warm(fn, 1)
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            for _ in range(calls):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    env.sync()
    where = collections.Counter(f"{_short(w.filename)}:{w.lineno}: {str(w.message)[:160]}" for w in seen)
    return {"calls": calls, "warnings": len(seen), "where": [f"{n}x {k}" for k, n in where.most_common(8)]}


_PREFIXES = None


def _short(text: str) -> str:
    """Paths in profiles and warnings without the site-packages and checkout prefixes."""
    global _PREFIXES
    if _PREFIXES is None:
        import torch

        root = str(Path(__file__).resolve().parent.parent.parent) + os.sep
        _PREFIXES = (str(Path(torch.__file__).resolve().parent.parent) + os.sep, root)
    for p in _PREFIXES:
        text = text.replace(p, "")
    return text


def cprofile(env, fn, calls: int) -> dict:
    """cProfile of ``calls`` calls (warmed up first): top TOP by cumulative and by own time."""
    env.warm(fn)
    prof = cProfile.Profile()
    try:
        prof.enable()
    except ValueError as exc:  # another profiler (coverage, a debugger) holds the hook
        return {"error": str(exc)}
    try:
        for _ in range(calls):
            fn()
        env.sync()
    finally:
        prof.disable()
    out = {"calls": calls}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(TOP)
        text = buf.getvalue()
        head = text.find("function calls")  # from the line with the totals on
        out[key] = _short(text[text.rfind("\n", 0, head) + 1:] if head >= 0 else text).strip("\n")
    return out


API_WORDS = ("Synchronize", "Memcpy", "Malloc", "Free", "LaunchKernel", "cuLaunch", "EventRecord", "EventQuery",
             "StreamWait", "HostAlloc")


def torch_profile(env, fn, calls: int) -> dict:
    """torch.profiler over ``calls`` calls, every thread: the top ops by self CPU time, and the
    CUDA runtime/driver calls that matter here (syncs, copies, mallocs, launches) counted."""
    from torch.profiler import ProfilerActivity, profile

    env.warm(fn)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        env.sync()
    avg = prof.key_averages()
    table = avg.table(sort_by="self_cpu_time_total", row_limit=TOP, max_name_column_width=56)
    api = {e.key: {"count": e.count, "per_call": round(e.count / calls, 2),
                   "self_cpu_us_per_call": round(e.self_cpu_time_total / calls, 2)}
           for e in avg if any(w in e.key for w in API_WORDS)}
    return {"calls": calls, "api": api, "table": table}


# -------------------------------------------------------------------------- launch micro-bench


def _touch_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def wall_touch(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)

    return wall_touch


def launch_costs(env, calls: int) -> dict:
    """Host microseconds of one launch of a one-block kernel: ``kernel[grid]`` and a direct
    Launcher, launches counted; Triton's driver queries; torch's smallest op as the control."""
    from tritonorm.kernels import fastlaunch

    torch = env.torch
    kernel = _touch_kernel()
    x = torch.zeros(128, dtype=torch.float32, device="cuda" if env.cuda else "cpu")
    out = {}

    def per_call(label, fn, n=calls):
        try:
            env.warm(fn, 2)
            COUNTS.reset()
            COUNTS.on = True
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            dt = time.perf_counter() - t0
            COUNTS.on = False
            env.sync()
            out[label] = {"us": _us(dt, n), "direct": sum(COUNTS.direct.values()), "run": sum(COUNTS.run.values()),
                          "calls": n}
        except Exception as exc:  # recorded; the next figure still runs
            COUNTS.on = False
            out[label] = {"error": f"{type(exc).__name__}: {exc}"[:200]}

    per_call("kernel[grid]", lambda: kernel[(1,)](x, BLOCK=128))
    launcher = fastlaunch.Launcher(kernel, (1,), {"BLOCK": 128})
    per_call("launcher", lambda: launcher(x))
    out["launcher"]["usable"] = launcher.usable
    try:
        from triton.runtime import driver

        dev = driver.active.get_current_device()
        per_call("get_current_device", driver.active.get_current_device, 10 * calls)
        per_call("get_current_stream", lambda: driver.active.get_current_stream(dev), 10 * calls)
    except Exception as exc:  # the interpreter on a machine without a GPU driver
        out["driver"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    per_call("torch x.add_(1)", lambda: x.add_(1))
    return out


# ------------------------------------------------------------------------------------ the rows


def build_cases(dry_run: bool, limit: int | None):
    from tritonorm.tuning import suites

    by_name = {(c.suite, c.name): c for s in suites.SUITES for c in suites.cases(s)}
    found = [by_name[k] for k in CASES if k in by_name][:limit]
    return [c.scaled() for c in found] if dry_run else found


def functions(case, mode: str, device: str) -> dict:
    """{label: function} for one row: tritonorm and eager as the bench builds them
    (``bench.gpu._mode_fn``), for fwd+bwd also its two halves (forward with autograd recording,
    backward of a kept graph)."""
    import torch

    from tritonorm.bench import providers
    from tritonorm.bench.gpu import _mode_fn
    from tritonorm.tuning.suites import make_inputs

    out = {}
    for name in ("tritonorm", "eager"):
        x, kw = make_inputs(case, torch.bfloat16, device, requires_grad=mode != "fwd")
        f = providers.make(name, case, x, kw)
        if f is None:
            continue
        out[name] = _mode_fn(f, mode, x, kw)
        if mode == "fwd+bwd":
            out[f"{name} fwd (grad)"] = f
            out[f"{name} bwd"] = _mode_fn(f, "bwd", x, kw)
    return out


def measure(env, case, mode: str, sleep, profile_calls: int, profiles: list) -> dict:
    from tritonorm.kernels import fastlaunch

    row = {"suite": case.suite, "case": case.name, "shape": list(case.shape), "dtype": "bf16", "mode": mode}
    fns = functions(case, mode, "cuda" if env.cuda else "cpu")

    def attempt(key, what, *args):
        try:
            row[key] = what(*args)
        except Exception as exc:  # one probe failing is a result; the others still run
            COUNTS.on = False
            row[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

    for label, fn in fns.items():
        attempt(label, env.wall, fn)
    if "tritonorm" in fns:
        with fastlaunch.enabled(False):
            attempt("tritonorm fastlaunch off", env.wall, fns["tritonorm"])
        attempt("sync_probe", lambda: {k: sync_probe(env, fns[k], sleep) for k in ("tritonorm", "eager") if k in fns})
        with fastlaunch.enabled(False):
            attempt("sync_probe fastlaunch off", sync_probe, env, fns["tritonorm"], sleep)
        attempt("sync_debug", sync_debug, env, fns["tritonorm"])
        try:
            prof = cprofile(env, fns["tritonorm"], profile_calls)
        except Exception as exc:
            prof = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        profiles.append({"case": case.name, "mode": mode, **prof})
    return row


def _fwd_bwd_cases(work) -> list:
    """The fwd+bwd cases of the stage's work, LayerNorm's first (the widest wall gap in run 2)."""
    return [c for c, m in work if m == "fwd+bwd" and c.kind == "layer_norm"] or [c for c, m in work if m == "fwd+bwd"]


def after_compile(env, work, deadline: float, dry_run: bool) -> dict:
    """The bench stage times torch.compile beside us in one process, and compiling leaves
    worker threads behind. Our backward runs Python in autograd's device thread (eager's is C++),
    so other Python threads taking the GIL would slow ours only. A/B: the LayerNorm fwd+bwd wall
    again after one torch.compile'd function has been compiled and run in this process."""
    import torch

    fb = _fwd_bwd_cases(work)
    if not fb:
        return {"skipped": "no fwd+bwd case"}
    if deadline - time.monotonic() < (3.0 if dry_run else 20.0):
        return {"skipped": "time budget"}
    case = fb[0]
    fns = functions(case, "fwd+bwd", "cuda" if env.cuda else "cpu")
    before = {k: env.wall(fns[k]) for k in ("tritonorm", "eager") if k in fns}
    threads_before = threading.active_count()
    x = torch.randn(64, 64, device="cuda" if env.cuda else "cpu")
    compiled = torch.compile(lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:]) * 2,
                             backend="eager" if dry_run else "inductor", dynamic=False)
    compiled(x)
    env.sync()
    after = {k: env.wall(fns[k]) for k in ("tritonorm", "eager") if k in fns}
    return {"case": case.name, "mode": "fwd+bwd", "threads_before": threads_before,
            "threads_after": threading.active_count(),
            "before_us": {k: v.get("wall_us") for k, v in before.items()},
            "after_us": {k: v.get("wall_us") for k, v in after.items()}}


def python_node(env, work, deadline: float, dry_run: bool) -> dict:
    """The control for the device-thread hypothesis: the same GPU work (``y = 2 x`` forward,
    ``2 dy`` backward) with a C++ autograd node (torch's own) and with a Python
    ``autograd.Function`` whose backward runs that op in Python, as ours does in autograd's
    device thread. Their fwd+bwd wall difference is what a Python backward costs on this machine
    whatever its kernels do; tritonorm's gap to eager beyond it is ours."""
    import torch

    fb = _fwd_bwd_cases(work)
    if not fb:
        return {"skipped": "no fwd+bwd case"}
    if deadline - time.monotonic() < (2.0 if dry_run else 10.0):
        return {"skipped": "time budget"}

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, dy):
            return dy * 2

    case = fb[0]
    x = torch.randn(case.shape, device="cuda" if env.cuda else "cpu", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    fns = {"C++ node": lambda: torch.autograd.grad(x * 2, (x,), dy),
           "Python node": lambda: torch.autograd.grad(Twice.apply(x), (x,), dy)}
    out = {"case": case.name, "switch_interval_s": sys.getswitchinterval()}
    for label, fn in fns.items():
        w = env.wall(fn)
        out[label] = w.get("wall_us")
        out[f"{label} cpu_us"] = w.get("cpu_us")  # the process's CPU: both threads' Python
    return out


def table(rows: list[dict]) -> str:
    from tritonorm.bench.table import format_table

    head = ["case", "mode", "ours wall", "enqueue", "cpu", "thread cpu", "events", "fl-off wall", "eager wall",
            "direct/run per call", "mallocs", "sync ours/eager"]
    body = []
    for r in rows:
        o, off, e = r.get("tritonorm", {}), r.get("tritonorm fastlaunch off", {}), r.get("eager", {})
        probe = r.get("sync_probe", {})

        def synced(k):
            p = probe.get(k, {}) if isinstance(probe, dict) else {}
            return "?" if "synchronizes" not in p else ("YES" if p["synchronizes"] else "no")

        body.append([r["case"], r["mode"], o.get("wall_us"), o.get("enqueue_us"), o.get("cpu_us"),
                     o.get("thread_cpu_us"), o.get("events_us"), off.get("wall_us"), e.get("wall_us"),
                     f"{o.get('direct_per_call', '?')}/{o.get('run_per_call', '?')}", o.get("cuda_mallocs"),
                     f"{synced('tritonorm')}/{synced('eager')}"])
    return format_table(head, body)



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tritonorm.gpu_report.wall_stage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: scaled cases in the interpreter")
    ap.add_argument("--budget-s", type=float, default=40.0, help="start nothing new after this")
    ap.add_argument("--calls", type=int, default=None, help="back-to-back calls per figure (200; dry run 2)")
    ap.add_argument("--profile-calls", type=int, default=None, help="calls under cProfile (100; dry run 2)")
    ap.add_argument("--cases", type=int, default=None, help=f"only the first N of the {len(CASES)} cases")
    ap.add_argument("--no-torch-profile", action="store_true", help="skip torch.profiler's table")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s

    import torch

    from tritonorm.bench import runner

    cuda = not args.dry_run
    if cuda and not runner.on_gpu():
        print("no CUDA GPU (or TRITON_INTERPRET=1): use --dry-run to rehearse without one")
        return 2
    calls = args.calls or (2 if args.dry_run else 200)
    profile_calls = args.profile_calls or (2 if args.dry_run else 100)
    env = Env(cuda, calls)
    doc = {"dry_run": args.dry_run, "meaningful": not args.dry_run, "note": DRY_NOTE if args.dry_run else
           "per call: wall = perf_counter over N back-to-back calls + one synchronize; enqueue = before it; "
           "cpu/thread cpu = process/calling-thread CPU time of the calls; launches counted during the calls",
           "calls": calls, "torch": torch.__version__, "python": sys.version.split()[0], "rows": [],
           "profiles": [], "stopped": None}
    with contextlib.suppress(ImportError):
        import triton

        doc["triton"] = triton.__version__
    if args.dry_run:
        print(DRY_NOTE)

    def save():  # after every row: a kill at the stage's limit keeps what was measured
        doc["wall_s"] = round(time.monotonic() - t0, 1)
        write(args.json, doc)

    COUNTS.install()
    try:
        doc["launch_costs"] = _safe(launch_costs, env, calls)
        doc["sleep"] = _safe(lambda: dict(zip(("cycles", "ms"), sleep_cycles(env) or (None, None))))
        sleep = (doc["sleep"]["cycles"], doc["sleep"]["ms"]) if doc["sleep"].get("cycles") else None
        save()
        work = [(c, m) for c in build_cases(args.dry_run, args.cases) for m in MODES]
        last = 0.0
        for i, (case, mode) in enumerate(work):
            if deadline - time.monotonic() < max(2.0, 1.2 * last):
                doc["stopped"] = f"time budget: {i} of {len(work)} rows done"
                print(doc["stopped"])
                break
            t1 = time.monotonic()
            try:
                row = measure(env, case, mode, sleep, profile_calls, doc["profiles"])
            except Exception as exc:  # inputs or a plan failing: recorded, the next row still runs
                row = {"case": case.name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:300]}
            last = time.monotonic() - t1
            row["seconds"] = round(last, 2)
            doc["rows"].append(row)
            o = row.get("tritonorm", {})
            e = row.get("eager", {})
            print(f"[{i + 1}/{len(work)}] {case.name} {mode}: ours wall {o.get('wall_us')} us "
                  f"(enqueue {o.get('enqueue_us')}, cpu {o.get('cpu_us')}), eager {e.get('wall_us')} us ({last:.1f} s)" + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
            save()
        doc["launchers"] = _safe(launchers)
        doc["python_node"] = _safe(python_node, env, work, deadline, args.dry_run)
        doc["after_compile"] = _safe(after_compile, env, work, deadline, args.dry_run)
        save()
        # Other Python threads compete for the GIL that tritonorm's backward needs in autograd's
        # device thread (eager's backward is C++ and does not): name them.
        doc["python_threads"] = sorted(t.name for t in threading.enumerate())
        fb = [(c, m) for c, m in work if m == "fwd+bwd"]
        if args.no_torch_profile or not fb:
            doc["torch_profile"] = {"skipped": "asked" if args.no_torch_profile else "no fwd+bwd row"}
        elif deadline - time.monotonic() < (3.0 if args.dry_run else 8.0):
            doc["torch_profile"] = {"skipped": "time budget"}
        else:  # LayerNorm 4096^2 where it ran: the widest gap between wall and host bench (fwd+bwd)
            case = next((c for c, _ in fb if c.kind == "layer_norm"), fb[0][0])
            fn = functions(case, "fwd+bwd", "cuda" if cuda else "cpu")["tritonorm"]
            doc["torch_profile"] = {"case": case.name, "mode": "fwd+bwd",
                                    **_safe(torch_profile, env, fn, min(20, profile_calls))}
        save()
    finally:
        COUNTS.uninstall()
    print(table(doc["rows"]))
    for r in doc["rows"]:
        debug = r.get("sync_debug", {})
        if debug.get("warnings"):
            print(f"sync debug {r['case']} {r['mode']}: {debug['warnings']} warnings: {'; '.join(debug['where'][:3])}")
    lc = doc.get("launch_costs", {})
    print("one launch, host us: " + ", ".join(f"{k} {v.get('us')}" for k, v in lc.items()
                                               if isinstance(v, dict) and "us" in v))
    pn = doc.get("python_node", {})
    if "C++ node" in pn:
        print(f"y = 2x fwd+bwd wall us at {pn['case']}'s shape: C++ node {pn['C++ node']}, Python node "
              f"{pn['Python node']} (the device-thread Python cost; switch interval {pn['switch_interval_s']} s)")
    ac = doc.get("after_compile", {})
    if "before_us" in ac:
        print(f"{ac['case']} fwd+bwd wall us before/after a torch.compile in this process (threads "
              f"{ac['threads_before']} -> {ac['threads_after']}): "
              + ", ".join(f"{k} {ac['before_us'].get(k)} -> {ac['after_us'].get(k)}" for k in ac["before_us"]))
    lau = doc.get("launchers", {})
    print(f"launchers: {lau.get('alive')} alive, {lau.get('usable')} direct-capable, gave up: "
          f"{', '.join(lau.get('unusable_kernels', [])) or 'none'}")
    tp = doc.get("torch_profile", {})
    if "api" in tp:
        print(f"torch.profiler {tp['case']} fwd+bwd, per call: " + ", ".join(
            f"{k} {v['per_call']}x {v['self_cpu_us_per_call']} us" for k, v in sorted(tp["api"].items())))
    if args.dry_run:
        print(DRY_NOTE)
    return 0


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # one probe's failure is recorded, never the stage's end
        COUNTS.on = False
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


if __name__ == "__main__":
    sys.exit(main())
