"""What the forward keeps for backward (tritonorm/saved.py): two fp32 words per statistic, from
which, with the saved input, the backward's statistics are rebuilt bit for bit in every regime."""

from __future__ import annotations

import pytest
import torch

import tritonorm
from tritonorm import dispatch, saved, scope as scopes
from tritonorm.bench import memory
from tritonorm.kernels import launch


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


CASES = [  # (scope, shape, num_groups, sample_groups, memory format / "strided")
    ("group", (2, 8, 5, 6), 4, 1, None),
    ("group", (2, 8, 5, 6), 2, 1, torch.channels_last),
    ("batch", (4, 3, 5, 5), None, 1, torch.channels_last),
    ("batch", (4, 3, 5, 5), None, 2, None),
    ("C", (6, 40), None, 1, None),
    ("instance", (2, 3, 3, 4, 5), None, 1, None),
    ("NH", (2, 3, 6, 5), None, 1, "strided"),
]


def _x(shape, fmt, dtype):
    # A large offset, so the pivot matters; one row starts non-finite (its pivot is 0).
    x = (torch.randn(shape, dtype=torch.float64) * 0.5 + 300.0).to(dtype)
    if fmt == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    elif fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x[(0,) * x.dim()] = float("inf")  # the first element of statistic 0, whatever the scope
    return x


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# Every case in the fused regime, and each other regime (looped, split, the torch regime) and
# RMS on a few (the interpreter is slow).
RUNS = ([(c, "fused", True) for c in CASES]
        + [(CASES[0], "split", True), (CASES[3], "looped", True), (CASES[4], "torch", True),
           (CASES[6], "split", True), (CASES[1], "fused", False), (CASES[4], "split", False)])


@pytest.mark.parametrize("case,regime,center", RUNS,
                         ids=lambda v: (f"{v[0]}-{v[3]}-{v[4]}" if isinstance(v, tuple) else str(v)))
def test_rebuilt_statistics_equal_the_forwards(case, regime, center):
    name, shape, groups, sg, fmt = case
    x = _x(shape, fmt, torch.float16 if regime == "looped" else torch.float32)
    spec = scopes.parse(name, x.dim(), groups, x.shape[1], sg)
    with dispatch.forced(regime, block_m=16, split=2):
        plan = launch.forward_plan(x, spec, False, False, False, 0, center, "train", launch.NO_RUNNING)
        _, stats = plan(x, None, None, None, None, None, 1e-5)
    kept = saved.pack(plan, stats)
    assert kept.untyped_storage().nbytes() == (8 if center else 4) * stats.shape[1]
    assert kept.untyped_storage().data_ptr() != stats.untyped_storage().data_ptr()
    rebuilt = saved.unpack(plan, x, kept)
    _same(rebuilt[:3], stats[:3])
    _same(rebuilt[4], stats[4])
    assert rebuilt[3].isnan().all()  # the variance is not kept


@pytest.mark.parametrize("regime", ["fused", "split"])
@pytest.mark.parametrize("rd", [None, torch.float32])
def test_rebuilt_statistics_of_add_norm_read_the_pivot_from_h(regime, rd):
    x = (torch.randn(5, 48) * 0.5 + 200.0).half()
    r = torch.randn(5, 48).to(rd or torch.float16)
    spec = scopes.parse("C", 2, None, 48)
    with dispatch.forced(regime, block_m=16, split=2):
        plan = launch.forward_plan(x, spec, False, False, False, 0, True, "train", launch.NO_RUNNING,
                                   ("pre_add", r.stride(), rd or x.dtype), pre_add=True)
        _, stats, h = plan.add(x, r, None, None, None, None, 1e-5, 0.0, rd or x.dtype)
    rebuilt = saved.unpack(plan, h, saved.pack(plan, stats))
    _same(rebuilt[:3], stats[:3])
    _same(rebuilt[4], stats[4])


def test_eval_with_running_statistics_keeps_the_whole_buffer():
    x = torch.randn(4, 3, 5, 5)
    spec = scopes.parse("batch", 4, None, 3)
    plan = launch.forward_plan(x, spec, False, False, False, 0, True, "given", launch.NO_RUNNING)
    _, stats = plan(x, None, None, None, torch.randn(3), torch.rand(3) + 0.5, 1e-5)
    assert saved.pack(plan, stats) is stats and saved.unpack(plan, x, stats) is stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,center", [("layer_norm", True), ("rms_norm", False), ("add_layer_norm", True),
                                         ("add_rms_norm", False)])
def test_saved_bytes_are_the_input_and_two_fp32_words_per_statistic(kind, center, dtype):
    rows, d = 24, 40
    case = memory.Case("test", kind, kind, (rows, d), "C", center=center)
    ours, eager = memory.measure(case, dtype)
    itemsize = torch.finfo(dtype).bits // 8
    assert ours == rows * d * itemsize + rows * (8 if center else 4), ours
    if dtype == torch.float32:  # eager keeps fp32 statistics too (and the composite rms_norm more)
        assert ours <= eager, (ours, eager)


def test_gradients_through_the_rebuilt_statistics_match_the_full_buffer(monkeypatch):
    # The same backward fed the forward's own [5, P] buffer (pack/unpack bypassed) and the rebuilt one.
    x = (torch.randn(3, 8, 4, 4) + 50.0).requires_grad_()
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    dy = torch.randn(3, 8, 4, 4)

    def grads():
        y = tritonorm.norm(x, "group", num_groups=4, weight=w, bias=b, activation="silu", backend="triton")
        return torch.autograd.grad(y, x, dy)[0]

    ours = grads()
    monkeypatch.setattr(saved, "pack", lambda plan, stats: stats)
    monkeypatch.setattr(saved, "unpack", lambda plan, x, kept: kept)
    assert torch.equal(ours, grads())
