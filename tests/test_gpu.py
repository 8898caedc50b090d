"""Checks only a real GPU can make: 64-bit indexing on a tensor past 2**31 elements, CUDA-graph
capture (no host synchronisation in the hot path), and full-size model shapes in the regimes the
dispatcher picks for them. Skipped without CUDA (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

import tritonorm
from cases import check_case, make_inputs

pytestmark = pytest.mark.gpu


def test_int64_offsets_past_2_31_elements():
    # 2**31 + 2**20 bf16 elements (4.3 GB): offsets overflow int32.
    rows, d = 2**19 + 2**8, 4096
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    y = tritonorm.norm(x, "C")
    for sl in (slice(0, 4), slice(rows - 4, rows)):
        ref = torch.nn.functional.layer_norm(x[sl].double(), (d,))
        assert (y[sl].double() - ref).abs().max().item() < 0.05


def test_cuda_graph_capture_forward_and_backward():
    x = torch.randn(8, 64, 32, 32, device="cuda", requires_grad=True)
    w = torch.randn(64, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    dy = torch.randn_like(x)

    def step():
        y = tritonorm.norm(x, "batch", weight=w, running_mean=rm, running_var=rv, activation="relu")
        return torch.autograd.grad(y, [x, w], dy)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    g.replay()
    torch.cuda.synchronize()
    expect = step()
    for a, b in zip(out, expect):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,scope,groups,dtype", [
    ((32, 64, 112, 112), "batch", None, torch.float32),     # ResNet-50 stem BN: split
    ((1, 320, 64, 64), "group", 32, torch.bfloat16),         # SD GroupNorm at batch 1: split
    ((4096, 4096), "C", None, torch.bfloat16),               # LLM LayerNorm rows: fused
    ((2, 32, 64, 64, 64), "instance", None, torch.float16),  # nnU-Net InstanceNorm3d
])
def test_model_shapes_in_their_dispatched_regimes(shape, scope, groups, dtype):
    x, w, b, _, dy = make_inputs(shape, dtype)
    x, w, b, dy = (t.cuda() for t in (x, w, b, dy))
    check_case(x, scope, num_groups=groups, weight=w, bias=b, dy=dy, activation="silu")
