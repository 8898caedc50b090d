"""Bytes each mode must move at minimum: every input read once, every output written once.

    fwd      read x, weight, bias; write y             (add_*: also read residual, write h)
    bwd      read x, dy, weight; write dx, dweight, dbias   (saved statistics: P x 8 bytes;
             add_*: x is the saved h, also read dh; dx is also dresidual)
    fwd+bwd  the sum of both
GB/s = these bytes / median time. Statistics (fp32, one per normalized group) are counted too.
"""

from __future__ import annotations

import math

from tritonorm.scope import parse
from tritonorm.tuning.suites import ADAPTIVE_KINDS, ada_param_shape

MODEL = "each input read once, each output written once (x, y, dy, dx, affine params, fp32 stats)"


def _parts(case, elem_bytes: int) -> tuple[int, int, int]:
    """(tensor bytes, affine bytes per parameter, statistics bytes for mean+rstd)."""
    n = math.prod(case.shape)
    spec = parse(case.scope, len(case.shape), case.num_groups, case.shape[1])
    stats = math.prod(spec.stat_shape(case.shape)) * 4 * 2
    affine = case.shape[1] * elem_bytes if case.affine else 0
    if case.kind in ADAPTIVE_KINDS:  # per-sample weight and bias
        affine = math.prod(ada_param_shape(case)) * elem_bytes
    return n * elem_bytes, affine, stats


def bytes_moved(case, elem_bytes: int, mode: str) -> int:
    t, a, s = _parts(case, elem_bytes)
    n_affine = (1 + int(case.center)) if case.affine else 0
    fwd = 2 * t + n_affine * a
    bwd = 3 * t + a + n_affine * a + s
    if case.kind.startswith("add_"):
        # add_norm: the residual read and h written forward; dh read backward (dx is dresidual).
        fwd += 2 * t
        bwd += t
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
