"""The compiled test subset of the GPU report: every kernel family, dtype and layout at least
once, forward and backward, against the float64 reference (each of these tests compares with
tritonorm.reference on fresh random inputs, outputs poisoned first), plus the GPU-only tests.

The whole suite (~830 tests) compiles too many kernel variants to fit the device time; this
list is what the report runs, in this order: the GPU-only tests first (nothing else checks int64
offsets and CUDA-graph capture, and the stage's time budget may stop the run before the end),
then cheap, broad files, so a failure shows early.
"""

from __future__ import annotations

# (pytest node id or file, what it covers)
SUBSET = (
    ("tests/test_gpu.py", "GPU only: int64 offsets past 2**31 elements, CUDA-graph capture, model "
     "shapes in their dispatched regimes"),
    ("tests/test_stats_room.py", "the split partials in the statistics buffer (PART_ROW), row and "
     "whole-pixel kernels, against float64 and against the same calls without it: not yet run compiled"),
    ("tests/test_pixels_partials.py", "the whole-pixel split regime's per-group partials and bounded "
     "merges at several splits: not yet run compiled"),
    ("tests/test_wide_rows.py", "the WIDE backward of rows past the fused limit (tile programs sweeping "
     "whole rows), forced and planned, eager and torch.compile'd: not yet run compiled"),
    ("tests/test_norm.py", "fused / looped / split forward and backward over every scope, the "
     "activations, center=False (RMS), fp16/bf16 with fp32 and low-precision weights, odd sizes, "
     "int64 indexing, the fused-rows persistent grid (dwdb accumulation)"),
    ("tests/test_layouts.py", "channels_last 2-D and 3-D, sliced and transposed strides, ranks 2-5, "
     "mixed layouts of x / dy / residual"),
    ("tests/test_running_stats.py", "training update of running statistics, eval with given "
     "statistics (forward and backward through them), moments (statistics only, and gradients)"),
    ("tests/test_pixels.py", "channels_last GroupNorm/InstanceNorm on whole-pixel tiles "
     "(kernels/pixels.py, pixels_backward.py), every regime, forward and backward"),
    ("tests/test_gn_backward.py", "GroupNorm/InstanceNorm backward with dweight/dbias from the dx "
     "pass (segment view), every regime and layout"),
    ("tests/test_planes.py", "BatchNorm NCHW at 7x7/14x14 on flat channel-block tiles (kernels/planes.py), "
     "forward and backward, running statistics"),
    ("tests/test_lean.py", "lean statistics (rstd and shifted mean kept, the pivot read again from x) in "
     "every regime; LayerNorm rows' looped/split backward with per-column sums (_bwd_col_sums_kernel)"),
    ("tests/test_functional.py", "batch/group/instance/layer/rms norm entry points"),
    ("tests/test_sample_groups.py", "Ghost BatchNorm (sample groups)"),
    ("tests/test_add_norm.py", "add_norm (pre-norm residual): h and y in one kernel, one kernel back"),
    ("tests/test_sample_affine.py", "per-(sample, channel) weight/bias read in place (GroupNorm, "
     "InstanceNorm; NCHW rows and channels_last whole pixels)"),
    ("tests/test_adaln.py", "adaLN's (N, 1, D) weight/bias read in place by the row kernels, the "
     "per-sample backward (fused and two-stage) and its finish"),
    ("tests/test_conditional_bn.py", "conditional BatchNorm: (N, C, 1, 1) weight/bias read in place by "
     "BatchNorm's kernels, every regime and layout, gradients as per-(sample, channel) segment sums"),
    ("tests/test_apply_fill.py", "split-regime apply programs taking several column tiles each, forward "
     "and backward"),
    ("tests/test_add_norm_broadcast.py", "add_norm with broadcast weight/bias: PRE_ADD beside PARAM_NC "
     "(per sample and channel, conditional BatchNorm, adaLN) and PARAM_FULL, every regime"),
    ("tests/test_dispatch.py::test_explain_matches_what_the_launcher_runs",
     "explain() plans what the launcher runs, on the device"),
    ("tests/test_dispatch.py::test_explain_matches_the_whole_pixel_plans",
     "explain() plans what the whole-pixel launchers run"),
    ("tests/test_dispatch.py::test_native_regime_runs", "the native (torch) regime"),
)

# The dry run's real tests (the rest of the subset is only collected): one per family.
DRY_RUN_TESTS = (
    "tests/test_norm.py::test_scopes_all_regimes[group-split]",
    "tests/test_layouts.py::test_channels_last_2d[batch-None-looped]",
    "tests/test_running_stats.py::test_momentum_zero_and_one",
)


def node_ids() -> list[str]:
    return [node for node, _ in SUBSET]
