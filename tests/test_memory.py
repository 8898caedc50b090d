"""Activation memory: bytes saved for backward per call (saved_tensors_hooks, exact on CPU),
tritonorm against the eager torch.nn.functional equivalent."""

from __future__ import annotations

import pytest
import torch

from tritonorm.bench import memory
from tritonorm.tuning.suites import Case


def _case(kind, shape, scope, **kw):
    return Case("test", kind, kind, shape, scope, **kw)


@pytest.mark.parametrize("case", [
    _case("group_norm", (2, 8, 8, 8), "group", num_groups=4, activation="silu"),
    _case("batch_norm", (4, 4, 6, 6), "batch", activation="relu", channels_last=True),
    _case("layer_norm", (16, 128), "C", activation="gelu"),
    _case("instance_norm", (2, 4, 4, 6, 6), "instance", activation="leaky_relu"),
], ids=lambda c: c.kind)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_with_activation_saves_at_most_055_of_eager(case, dtype):
    ours, eager = memory.measure(case, dtype)
    # Eager saves x for the norm and the norm's output for the activation; tritonorm x and the
    # fp32 statistics only. (The statistics are 20 bytes each: with 16-bit x the 0.55 target
    # needs about 90 elements per statistic or more; the suite's cases have thousands.)
    assert ours <= 0.55 * eager, (ours, eager)


@pytest.mark.parametrize("case", [
    _case("group_norm", (2, 8, 6, 6), "group", num_groups=4),
    _case("batch_norm", (3, 4, 5, 5), "batch"),
    _case("layer_norm", (16, 64), "C"),
    _case("rms_norm", (16, 64), "C", center=False),
    _case("add_rms_norm", (16, 64), "C", center=False),
    _case("add_layer_norm", (16, 64), "C"),
], ids=lambda c: c.kind)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_norms_save_no_more_than_eager(case, dtype):
    ours, eager = memory.measure(case, dtype)
    n_stats = {"group_norm": 2 * 4, "batch_norm": 4}.get(case.kind, 16)
    if case.kind in ("group_norm", "batch_norm"):
        # The segment view and the plane kernels keep the [5, P] fp32 buffer (pivot, shifted mean,
        # rstd, var, mean) where eager keeps mean and rstd: at most 5 - 1 = 4 more fp32 words a
        # statistic, a few bytes beside x for these scopes.
        assert ours <= eager + 4 * 4 * n_stats, (ours, eager)
        return
    # Rows (LayerNorm, RMSNorm, add_norm) keep lean statistics: fp32 rstd and shifted mean (rstd
    # alone without centring), what eager's CUDA kernels keep. Eager on CPU keeps them in x's dtype
    # for bf16: 2 bytes a word less, the only slack allowed. (Eager's composite rms_norm saves x
    # twice more: there tritonorm saves about half.)
    words = 2 if case.center else 1
    slack = 0 if dtype == torch.float32 else words * 2 * n_stats
    assert ours <= eager + slack, (ours, eager)


def test_extrapolation_from_batch_one_and_two_is_exact():
    case = _case("group_norm", (5, 8, 4, 4), "group", num_groups=2, activation="silu")
    rep = memory.report(case)
    ours, eager = memory.measure(case)
    assert (rep["tritonorm_bytes"], rep["eager_bytes"]) == (ours, eager)


@pytest.mark.parametrize("case", [
    _case("ada_group_norm", (2, 8, 8, 8), "group", num_groups=4, activation="silu"),
    _case("ada_layer_norm", (2, 6, 64), "L"),
], ids=lambda c: c.kind)
def test_broadcast_affine_saves_the_parameters_unexpanded(case):
    # Saved: x, the statistics and the small (N, C, 1, 1) / (N, 1, D) parameters, never their
    # x-sized expansions; eager saves x, the norm's output for the multiply and more.
    ours, eager = memory.measure(case)
    assert ours <= 0.55 * eager, (ours, eager)
