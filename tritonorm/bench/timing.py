"""GPU timing: device time by CUDA-graph replay, wall time per call back to back, and the
device-to-device copy bandwidth measured in the same run.

Two figures per function, because a normalization layer is often host-bound:

* **device** (``Timing.ms``, what the tables call "us"): the calls captured in one CUDA graph and
  replayed, so no host work is timed, only the kernels and the gaps between them. The calls
  rotate over several input sets (``input_sets``) so that small problems are not all timed from
  a warm L2; at most ``MAX_SETS`` sets, so problems under ~20 MB are partly L2-resident, as a
  layer's input just written by the previous layer is in a network.
* **wall** (``Timing.wall_ms``): the same calls launched from Python back to back and timed with
  events: host overhead included where the host is slower than the device (it is on small
  layers, and in every ``fwd+bwd`` through autograd). What a training step without CUDA graphs
  pays per layer.

The first GPU run (2026-11-30) timed ``fwd+bwd`` with ``triton.testing.do_bench``: its cache
flush between calls lets the device idle while Python launches the next call, so every provider's
``fwd+bwd`` row measured host time (eager GroupNorm 775 us for 26 MB). Functions that cannot be
captured (a host synchronization inside) fall back to that do_bench, marked as such.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

# Rotate over input sets until their bytes reach this (~3x an H100/H200's 50 MB L2) ...
ROTATE_BYTES = 160 << 20
# ... with at most this many sets.
MAX_SETS = 8
# Each graph holds about this much device time (calls are capped below).
GRAPH_TARGET_MS = 3.0
MAX_CALLS = 512
REPLAYS = 15


@dataclass
class Timing:
    ms: float  # device time per call: median over replays
    p20: float
    p80: float
    method: str  # "cudagraph" or "do_bench" (not capturable)
    wall_ms: float | None  # per call, launched back to back from Python (host included)
    calls: int  # calls per graph replay (or per do_bench call: 1)
    sets: int  # input sets rotated over


def input_sets(bytes_moved: int) -> int:
    """How many input sets to rotate over for a problem moving ``bytes_moved`` per call."""
    return max(1, min(MAX_SETS, math.ceil(ROTATE_BYTES / max(1, bytes_moved))))


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return statistics.median(values), qs[1], qs[7]


def _events_ms(run, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def time_fns(fns: list, bytes_moved: int = 0) -> Timing:
    """Time calling ``fns`` in rotation (each closes over its own input set; the caller sized
    them with ``input_sets``, so ``bytes_moved``, the timers' common signature, is not read
    here). Raises what the functions raise; falls back to do_bench only when CUDA-graph capture
    fails."""
    fns = list(fns)
    k = len(fns)

    def one_round():
        for f in fns:
            f()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compilation, autotuning, allocator) off the capture
        one_round()
        one_round()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    # Wall time back to back (and an upper bound of the device time, to size the graph).
    est_rounds = max(1, 8 // k)
    wall = _events_ms(lambda: [one_round() for _ in range(est_rounds)], est_rounds * k)
    rounds = max(1, min(MAX_CALLS // k, math.ceil(GRAPH_TARGET_MS / max(wall * k, 1e-4))))
    if rounds * k > 2 * est_rounds * k:  # a longer back-to-back run for the wall figure
        wall = _events_ms(lambda: [one_round() for _ in range(rounds)], rounds * k)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(rounds):
                one_round()
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        per_call = [_events_ms(graph.replay, rounds * k) for _ in range(REPLAYS)]
        del graph
        med, p20, p80 = _quantiles(per_call)
        return Timing(med, p20, p80, "cudagraph", wall, rounds * k, k)
    except Exception as exc:  # not capturable: a host synchronization inside, or a launch error
        torch.cuda.synchronize()
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fns[0], warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        return Timing(med, p20, p80, f"do_bench (capture failed: {why})", wall, 1, 1)


def copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes / median time) in GB/s."""
    from triton.testing import do_bench

    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9
