"""Host cost per call: the Python path of a call with the GPU launch stubbed out.

Small layers are host-bound: whatever the kernels do, a call that spends 200 us in Python loses
to eager PyTorch. This measures what a call costs the CPU on any machine, GPU or not:

- Triton's launcher runs for real (``JITFunction.run``: its argument binder, specialization,
  cache key and grid) against a stand-in driver whose "compile" returns a kernel with a no-op
  ``run``; so the figure includes everything up to the driver's launch call, and nothing of the
  GPU. The stand-in counts compiles, so the same run also counts JIT variants.
- Tensors are real CPU tensors of the suite shapes: tritonorm allocates its outputs and
  launches, nothing computes. Backward goes through the real autograd engine.
- Eager PyTorch's host path is measured beside it on tiny CPU tensors of the same rank and
  channel count, where its CPU kernels cost little: an upper bound of its host path (on a GPU
  each of its launches also costs a driver call, which ours skips here).

Timings are thread CPU time (``time.thread_time``): the lowest of five block medians of the
calls (``cpu_us``), robust to other processes on the machine. Run it as ``python -m tritonorm.bench.host`` (or ``tritonorm bench
--host``): it needs a process in which triton was not imported with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

# The launcher must be Triton's compiled-mode JITFunction, not the interpreter's.
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402


def _allocator_like_a_gpu_cache() -> None:
    """glibc returns large blocks to the OS on free and maps them anew on the next allocation
    (a syscall and page faults per tensor), where CUDA's caching allocator hands a cached block
    back in a microsecond. Keep freed memory in the heap so CPU allocations cost what GPU ones
    do; without it the figures would charge tritonorm's outputs for the kernel's page mapping."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)          # M_MMAP_MAX: no mmap'd chunks, every block from the heap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (a C int): never give the heap back
    except (OSError, AttributeError):
        pass


_allocator_like_a_gpu_cache()
torch.set_num_threads(1)  # eager's CPU kernels on tiny tensors: no thread-pool wake-ups in the figure


class _StubKernel:
    function = None
    packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        return None


class _StubDriver:
    """What JITFunction.run asks of the active driver, for a GPU that is not there."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    """Launches and JIT compiles seen while stubbed (kernel names)."""

    def __init__(self):
        self.launches: list[str] = []
        self.compiles: list[tuple[str, object]] = []


@contextlib.contextmanager
def stubbed(profile_name: str = "h200"):
    """Run tritonorm's Triton path on CPU tensors with every launch stubbed, planning for the
    named GPU profile. Yields a Recorder of launches and compiles."""
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    import tritonorm.backend as backends
    import tritonorm.core as core
    import tritonorm.dispatch as dispatch
    from tritonorm.kernels import launch

    if not issubclass(type(launch.forward.__globals__["fk"]._fwd_fused_kernel), jit.JITFunction):
        raise RuntimeError("tritonorm was imported with TRITON_INTERPRET=1: run the host benchmark in a "
                           "fresh process (python -m tritonorm.bench.host)")
    rec = Recorder()
    profile = dispatch.PROFILES[profile_name]
    saved = (jit.JITFunction._do_compile, jit.JITFunction.run, backends.triton_can_run,
             dispatch.profile_for_device, launch.profile_for)
    real_run = saved[1]
    prev_driver = driver._active  # restored as it was: creating the default needs a real GPU

    def compile_stub(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = _StubKernel()
        self.device_caches[device][0][key] = kernel
        rec.compiles.append((self.fn.__name__, key))
        return kernel

    def run(self, *args, **kwargs):
        rec.launches.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    driver.set_active(_StubDriver(GPUTarget("cuda", profile.capability[0] * 10 + profile.capability[1], 32)))
    jit.JITFunction._do_compile = compile_stub
    jit.JITFunction.run = run
    backends.triton_can_run = lambda device: True
    dispatch.profile_for_device = lambda device: profile
    launch.profile_for = lambda device: profile
    launch.clear()
    core._CALLS.clear()
    _forget_compiled()
    from tritonorm.kernels import fastlaunch

    fastlaunch.ON_DIRECT_LAUNCH[0] = rec.launches.append
    try:
        yield rec
    finally:
        fastlaunch.ON_DIRECT_LAUNCH[0] = None
        _forget_compiled()  # the stub kernels must never serve a real launch later
        (jit.JITFunction._do_compile, jit.JITFunction.run, backends.triton_can_run,
         dispatch.profile_for_device, launch.profile_for) = saved
        driver._active = prev_driver
        launch.clear()
        core._CALLS.clear()


def _forget_compiled() -> None:
    """Drop tritonorm's kernels' compiled-variant caches (so variants are counted from zero, and
    no stub survives the context)."""
    import triton.runtime.jit as jit

    from tritonorm.kernels import backward as bk, forward as fk

    for module in (fk, bk):
        for value in vars(module).values():
            if isinstance(value, jit.JITFunction):
                value.device_caches.clear()


def cpu_us(fn, calls: int = 300, warmup: int = 30, blocks: int = 5) -> float:
    """Thread CPU time of one call in microseconds: the calls are timed in ``blocks`` blocks and
    the lowest block median is kept, so a burst of other load on the machine (which slows every
    call it overlaps, thread time included, through caches and frequency) spoils one block, not
    the figure."""
    for _ in range(warmup):
        fn()
    per_block = max(1, calls // blocks)
    best = float("inf")
    for _ in range(blocks):
        times = []
        for _ in range(per_block):
            t = time.thread_time()
            fn()
            times.append(time.thread_time() - t)
        best = min(best, statistics.median(times))
    return best * 1e6


def _eager(case, x, kw):
    from tritonorm.bench import providers

    return providers.make("eager", case, x, kw)


def _tiny(case):
    """The case at a tiny size with its rank and channel count: eager's host path."""
    from dataclasses import replace

    if case.kind in ("layer_norm", "rms_norm"):
        return replace(case, shape=(2, case.shape[1]))
    n, c, *sp = case.shape
    return replace(case, shape=(2 * max(1, case.sample_groups), c, *([2] * len(sp))))


def _fwd_bwd(fn, leaves):
    out = fn()
    dy = torch.ones_like(out)
    return lambda: torch.autograd.grad(fn(), leaves, dy)


def measure_case(case, dtype=torch.bfloat16, calls: int = 300) -> dict:
    """Host microseconds per call of tritonorm (launch stubbed) and of eager (tiny tensors),
    forward and forward+backward, with tritonorm's launches per call."""
    import tritonorm
    from tritonorm.tuning.suites import make_inputs

    row = {"suite": case.suite, "case": case.name, "dtype": str(dtype).replace("torch.", "")}
    with stubbed() as rec:
        x, kw = make_inputs(case, dtype, "cpu")
        fwd = lambda: tritonorm.norm(x, case.scope, **kw)  # noqa: E731
        rec.launches.clear()
        fwd()
        row["launches_fwd"] = len(rec.launches)
        row["ours_fwd_us"] = cpu_us(fwd, calls)
        xg, kwg = make_inputs(case, dtype, "cpu", requires_grad=True)
        leaves = [xg] + [kwg[k] for k in ("weight", "bias") if k in kwg]
        fb = _fwd_bwd(lambda: tritonorm.norm(xg, case.scope, **kwg), leaves)
        rec.launches.clear()
        fb()
        row["launches_fwd_bwd"] = len(rec.launches)
        row["ours_fwd_bwd_us"] = cpu_us(fb, calls)
    tiny = _tiny(case)
    x, kw = make_inputs(tiny, dtype, "cpu")
    eager = _eager(tiny, x, kw)
    row["eager_fwd_us"] = cpu_us(eager, calls)
    xg, kwg = make_inputs(tiny, dtype, "cpu", requires_grad=True)
    leaves = [xg] + [kwg[k] for k in ("weight", "bias") if k in kwg]
    row["eager_fwd_bwd_us"] = cpu_us(_fwd_bwd(_eager(tiny, xg, kwg), leaves), calls)
    return row


def measure_module(dtype=torch.bfloat16, calls: int = 300) -> dict:
    """BatchNorm2d forward in training with running statistics (ResNet-50 stage 1, batch 32):
    tritonorm.nn.BatchNorm2d (stubbed) against torch.nn.BatchNorm2d (tiny tensors)."""
    from tritonorm import nn as tnn

    row = {"suite": "module", "case": "BatchNorm2d(64) train, running stats", "dtype": str(dtype)[6:]}
    with stubbed() as rec, torch.no_grad():
        bn = tnn.BatchNorm2d(64).to(dtype)
        x = torch.randn(32, 64, 112, 112, dtype=dtype)
        rec.launches.clear()
        bn(x)
        row["launches_fwd"] = len(rec.launches)
        row["ours_fwd_us"] = cpu_us(lambda: bn(x), calls)
    with torch.no_grad():
        ref = torch.nn.BatchNorm2d(64).to(dtype)
        tiny = torch.randn(2, 64, 2, 2, dtype=dtype)
        row["eager_fwd_us"] = cpu_us(lambda: ref(tiny), calls)
    return row


def jit_variants(case, dtype=torch.bfloat16, batches=range(1, 65)) -> dict:
    """Distinct JIT compiles per kernel as the batch (rows for LayerNorm/RMSNorm) goes through
    ``batches``, forward and backward: what a training run with varying batch sizes compiles."""
    import tritonorm

    with stubbed() as rec:
        for n in batches:
            shape = (n * max(1, case.sample_groups),) + tuple(case.shape[1:])
            xg = _empty(shape, dtype, case.channels_last)
            kw = dict(num_groups=case.num_groups, center=case.center, activation=case.activation)
            if case.sample_groups > 1:
                kw["sample_groups"] = case.sample_groups
            leaves = [xg]
            if case.affine:
                kw["weight"] = torch.empty(shape[1], dtype=dtype).requires_grad_()
                leaves.append(kw["weight"])
                if case.center:
                    kw["bias"] = torch.empty(shape[1], dtype=dtype).requires_grad_()
                    leaves.append(kw["bias"])
            y = tritonorm.norm(xg, case.scope, **kw)
            torch.autograd.grad(y, leaves, torch.empty_like(y))
        per_kernel: dict = {}
        for name, key in rec.compiles:
            per_kernel.setdefault(name, set()).add(key)
    return {name: len(keys) for name, keys in per_kernel.items()}


def _empty(shape, dtype, channels_last):
    """An uninitialised input (nothing computes on it while stubbed), in the case's layout."""
    x = torch.empty(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_()


REPRESENTATIVE = ("bn 64x112^2 b32", "gn32+silu 320x64^2 b2", "gn32+silu 320x64^2 b2 cl", "ln 4096x4096",
                  "rms 32x4096", "in3d 64x64^3 b2", "gbn 64x112^2 b256/32")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonorm.bench.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300,
                        help="timed calls per figure (lowest median of 5 blocks)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--variants", action="store_true",
                        help="also count JIT variants per kernel as the batch goes 1..N (--batches)")
    parser.add_argument("--batches", type=int, default=64, help="N for --variants (default 64)")
    parser.add_argument("--case", action="append", default=None, metavar="NAME",
                        help="only this representative case (repeatable; default: all of them)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="measure every case N times, one pass over the cases after another "
                             "(a machine whose speed drifts spoils a pass, not the figure); the table "
                             "shows low-high (median), the JSON each row's runs and their medians")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    from tritonorm.bench.table import format_table
    from tritonorm.tuning.suites import cases

    names = args.case or REPRESENTATIVE
    unknown = set(names) - set(REPRESENTATIVE)
    if unknown:
        parser.error(f"--case: {', '.join(sorted(unknown))} not among {', '.join(REPRESENTATIVE)}")
    chosen = [c for c in cases("all") if c.name in names]
    passes = [[measure_case(c, calls=args.calls) for c in chosen] + [measure_module(calls=args.calls)]
              for _ in range(args.repeat)]
    from tritonorm.bench.table import combine_passes, pass_cell

    rows = combine_passes(passes, ("ours_fwd_us", "eager_fwd_us", "ours_fwd_bwd_us", "eager_fwd_bwd_us"))
    headers = ("case", "launches fwd", "launches fwd+bwd", "ours fwd us", "eager fwd us", "ours fwd+bwd us",
               "eager fwd+bwd us")
    table = [(r["case"], r["launches_fwd"], r.get("launches_fwd_bwd", ""),
              *[pass_cell(r, k) for k in ("ours_fwd_us", "eager_fwd_us", "ours_fwd_bwd_us", "eager_fwd_bwd_us")])
             for r in rows]
    print("Host CPU time per call (thread time, lowest of 5 block medians), launch stubbed; eager on tiny CPU "
          "tensors" + (f"; {args.repeat} passes: low-high (median)" if args.repeat > 1 else ""))
    print(format_table(headers, table))
    out = {"rows": rows, "torch": torch.__version__}
    if args.variants:
        batches = range(1, max(1, args.batches) + 1)
        out["variants_batches"] = [batches.start, batches.stop - 1]
        out["variants"] = {c.name: jit_variants(c, batches=batches) for c in chosen
                           if c.kind != "ghost_batch_norm"}
        for name, per in out["variants"].items():
            print(f"JIT variants, batch 1..{batches.stop - 1}, {name}: {per}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
