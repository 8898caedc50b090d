"""GPU timing: triton.testing.do_bench (median and p20/p80 over repeated runs, L2 flushed
between runs: cold-cache numbers), CUDA-graph replay for small tensors (where launch overhead
would otherwise be timed), and the device-to-device copy bandwidth measured in the same run."""

from __future__ import annotations

import torch

# Below this many bytes moved, time CUDA-graph replays (launch overhead is not the kernel's).
GRAPH_BELOW = 16 << 20


def time_ms(fn, bytes_moved: int) -> tuple[float, float, float, str]:
    """(median, p20, p80) milliseconds and the method used."""
    from triton.testing import do_bench, do_bench_cudagraph

    q = [0.5, 0.2, 0.8]
    if bytes_moved < GRAPH_BELOW:
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                med, p20, p80 = do_bench_cudagraph(fn, rep=50, quantiles=q)
            return med, p20, p80, "cudagraph"
        except Exception:  # not capturable (host sync inside): fall back to plain launches
            pass
    med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=q)
    return med, p20, p80, "do_bench"


def copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes / median time) in GB/s."""
    from triton.testing import do_bench

    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9
