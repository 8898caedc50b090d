"""pytest-benchmark view of the suite (GPU only; not part of `make test`, whose testpaths is tests/):

    python -m pytest benchmarks/test_bench.py --benchmark-group-by=param:case

Each benchmark is one (case, dtype, mode, provider); ``extra_info`` carries the bytes model and
GB/s. ``tritonorm bench`` is the full report (table, JSON with provenance, plots).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("benchmarks need a CUDA GPU (`make bench` reports correctness and dispatch without one)",
                allow_module_level=True)

from tritonorm.bench import bytes_model, gpu, providers, shapes  # noqa: E402

CASES = [c for c in shapes.select() if c.name in {
    "bn 64x112^2 b32", "bn 2048x7^2 b256", "gn32+silu 320x64^2 b1", "gn32+silu 640x32^2 b2 cl",
    "ln 4096x4096", "rms 4096x8192", "rms 32x4096", "in3d 64x64^3 b2"}]


@pytest.mark.parametrize("provider", ["tritonorm", "eager", "compile"])
@pytest.mark.parametrize("mode", shapes.MODES)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "_"))
def test_bench(benchmark, case, dtype, mode, provider):
    x, kw = shapes.make_inputs(case, shapes.DTYPES[dtype], "cuda", requires_grad=mode != "fwd")
    f = providers.make(provider, case, x, kw)
    fn = gpu._mode_fn(f, mode, x, kw)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=50, iterations=1, warmup_rounds=5)
    nbytes = bytes_model.bytes_moved(case, x.element_size(), mode)
    benchmark.extra_info.update(bytes=nbytes, bytes_model=bytes_model.MODEL,
                                gbps=nbytes / benchmark.stats.stats.median / 1e9)
