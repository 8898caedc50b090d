"""tritonorm.norm on the Triton kernels against the float64 reference, forward and backward.

Kernels run in Triton's interpreter on CPU (compiled on a GPU when present). Every output
buffer is poisoned with NaN before the kernels write it (launch.POISON).
"""

from __future__ import annotations

import pytest
import torch

from cases import check_case, make_inputs
from tritonorm.kernels import launch

REGIMES = ("fused", "looped", "split")
# Small tiles so that looped/split really loop and split really splits on tiny shapes.
TILES = {"fused": {}, "looped": {"block_m": 16, "block_p": 2}, "split": {"block_m": 8, "block_p": 2, "split": 3}}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


# (scope, shape, num_groups): every alias, and letter subsets chosen so that reduced and kept
# axes interleave (the strided views then need several dims a side).
SCOPES = [
    ("batch", (4, 6, 5, 3), None),
    ("layer", (3, 5, 4, 3), None),
    ("instance", (2, 3, 4, 5), None),
    ("group", (2, 8, 3, 3), 4),
    ("batch_group", (3, 8, 2, 3), 2),
    ("positional", (2, 7, 3, 3), None),
    ("NH", (3, 4, 5, 2), None),
    ("CW", (2, 6, 3, 4), 3),
    ("NCHW", (2, 4, 3, 3), 2),
    ("NL", (3, 5, 7), None),
    ("DW", (2, 3, 3, 2, 4), None),
    ("NC", (5, 6), 3),
    ("N", (7, 3), None),
]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("scope,shape,groups", SCOPES, ids=[s[0] for s in SCOPES])
def test_scopes_all_regimes(scope, shape, groups, regime):
    x, w, b, r, dy = make_inputs(shape, torch.float32, residual=True)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, residual=r, dy=dy,
               regime=regime, config=TILES[regime])


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh"])
@pytest.mark.parametrize("regime", ["fused", "split"])
def test_activations(activation, regime):
    x, w, b, r, dy = make_inputs((2, 8, 3, 3), torch.float32, residual=True)
    check_case(x, "group", num_groups=2, weight=w, bias=b, residual=r, dy=dy, activation=activation,
               regime=regime, config=TILES[regime])


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("scope,shape,groups", [("layer", (3, 4, 5), None), ("batch", (4, 3, 2, 3), None),
                                                ("group", (2, 6, 4), 3), ("positional", (2, 9, 2, 2), None)])
def test_center_false_rms(scope, shape, groups, regime):
    x, w, b, _, dy = make_inputs(shape, torch.float32, offset=0.5)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, dy=dy, center=False,
               regime=regime, config=TILES[regime])


@pytest.mark.parametrize("affine", [False, True])
def test_without_affine_or_with_weight_only(affine):
    x, w, _, _, dy = make_inputs((3, 4, 3, 3), torch.float32)
    check_case(x, "instance", weight=w if affine else None, dy=dy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("scope,shape,groups", [("group", (2, 8, 4, 4), 4), ("batch", (4, 3, 5, 5), None),
                                                ("positional", (2, 16, 3, 2), None)])
def test_low_precision(scope, shape, groups, regime, dtype):
    x, w, b, r, dy = make_inputs(shape, dtype, residual=True)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, residual=r, dy=dy, activation="silu",
               regime=regime, config=TILES[regime])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fp32_weights(dtype):
    # Mixed precision: 16-bit activations with fp32 parameters (autocast-style models).
    x, w, b, _, dy = make_inputs((2, 8, 4, 4), dtype, wdtype=torch.float32)
    check_case(x, "group", num_groups=2, weight=w, bias=b, dy=dy)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("scope,shape,groups", [("layer", (2, 4, 16, 16), None), ("batch", (8, 2, 12, 12), None),
                                                ("group", (2, 8, 8, 8), 2)])
def test_large_mean_offset_fp32(scope, shape, groups, regime):
    # |mean| = 1e4 >> std = 1: E[x^2] - E[x]^2 would lose everything in fp32. The pivot shift
    # keeps even the normalized output within the plain fp32 rule.
    x, w, b, _, dy = make_inputs(shape, torch.float32, offset=1e4)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, dy=dy, regime=regime,
               config={"looped": {"block_m": 64}, "split": {"block_m": 64, "split": 4}, "fused": {}}[regime])


@pytest.mark.parametrize("regime", REGIMES)
def test_fp16_values_near_200_large_groups(regime):
    # fp16 values around 200 over groups of 2048: squares overflow fp16 (200^2 * 2048 > 65504)
    # and naive fp16 accumulation loses the variance; statistics are fp32 here.
    x, w, b, _, dy = make_inputs((2, 8, 32, 32), torch.float16, offset=200.0, std=2.0)
    check_case(x, "group", num_groups=4, weight=w, bias=b, dy=dy, regime=regime,
               config={"looped": {"block_m": 512}, "split": {"block_m": 512, "split": 3}, "fused": {}}[regime])


# Odd sizes: 1, 3, 7, 33 and statistics longer than one tile.
@pytest.mark.parametrize("shape,scope,groups", [
    ((1, 3, 7), "layer", None),
    ((3, 1, 33), "instance", None),
    ((7, 33), "C", None),
    ((33, 7), "N", None),
    ((1, 7, 3, 1), "positional", None),
    ((2, 33, 3), "group", 3),
    ((1, 3, 33, 7), "layer", None),
])
def test_odd_sizes(shape, scope, groups):
    x, w, b, _, dy = make_inputs(shape, torch.float32)
    check_case(x, scope, num_groups=groups, weight=w, bias=b, dy=dy)


def test_statistic_longer_than_fused_limit_uses_a_loop():
    # 1 x 9000 elements per statistic: past the interpreter profile's fused limit (4096), so the
    # dispatcher's own choice (not a forced one) must loop over tiles.
    x, w, b, _, dy = make_inputs((1, 2, 75, 60), torch.float32)
    check_case(x, "layer", weight=w, bias=b, dy=dy)


def test_int64_indexing_path(monkeypatch):
    # Shapes past 2**31 elements cannot run in the interpreter; lower the threshold instead so
    # the 64-bit index path of every kernel is exercised.
    from tritonorm.kernels import layout
    monkeypatch.setattr(layout, "_I32_MAX", 10)
    for regime in REGIMES:
        x, w, b, r, dy = make_inputs((2, 4, 3, 3), torch.float32, residual=True)
        check_case(x, "group", num_groups=2, weight=w, bias=b, residual=r, dy=dy, activation="gelu",
                   regime=regime, config=TILES[regime])


@pytest.mark.parametrize("block_p", [1, 2])
def test_fused_rows_persistent_grid_accumulates_parameter_grads(block_p):
    # LayerNorm rows with one channel per column: the fused backward walks row blocks on a
    # persistent grid (at most one program per SM, each owning >= 8 row blocks: 4 programs on
    # the interpreter profile), so programs see several blocks and must add their dweight/dbias sums.
    x, w, b, r, dy = make_inputs((29, 16), torch.float32, residual=True)
    check_case(x, "C", weight=w, bias=b, residual=r, dy=dy, activation="gelu", regime="fused",
               config={"block_p": block_p})
