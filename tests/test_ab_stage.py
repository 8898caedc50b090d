"""The GPU report's A/B stage (tritonorm/gpu_report/ab_stage.py) without a GPU: every switch
flips what it names and puts it back, and the dry run computes A and B on the interpreter and
finds them equal."""

from __future__ import annotations

import json

import torch

from tritonorm import dispatch, pixel_plan
from tritonorm.gpu_report import ab_stage
from tritonorm.kernels import launch


def _state():
    return (dispatch.APPLY_FILL, dispatch.APPLY_REVERSE, dispatch.EVICT_FIRST, dispatch.WIDE_ROWS, dispatch.ROWS_PER_PROGRAM, dispatch.COL_PROGRAMS_PER_SM, pixel_plan.BACKWARD_SPLIT_CAP, pixel_plan.FORWARD_TILE_DIV,
            dispatch.profile_for_device(torch.device("cpu")).strided_rows_block, dispatch.forced_state())


def test_switches_flip_and_restore():
    before = _state()
    for exp in ab_stage.experiments():
        with exp.switch():
            inside = _state()
            assert inside != before, exp.name
        assert _state() == before, exp.name


def test_dry_run_compares_a_with_b(tmp_path):
    path = tmp_path / "ab.json"
    assert ab_stage.main(["--json", str(path), "--dry-run", "--only",
                          "apply_fill,apply_reverse,evict_first,rows_per_program"]) == 0
    doc = json.loads(path.read_text())
    names = {r["experiment"] for r in doc["rows"]}
    assert names == {"apply_fill", "apply_reverse", "evict_first", "rows_per_program"} and doc["stopped"] is None
    for r in doc["rows"]:
        assert "error" not in r, r
        assert r["check"]["same"] and r["check"]["max_rel_diff"] <= 2.0 ** -6
        assert "A" not in r and "B" not in r  # no timing without a GPU
    assert _state()[:4] == (True, True, True, True)  # switches put back


def test_apply_fill_is_a_real_switch():
    """The split apply's grid: several tiles a program with APPLY_FILL, one without."""
    (rows, cols), tiles = launch._apply_grid(64, 1 << 20, 1, 1024, fill=256)
    assert (rows, cols, tiles) == (64, 4, 256)
    launch_fill = dispatch.APPLY_FILL
    try:
        dispatch.APPLY_FILL = False
        assert launch._apply_grid(64, 1 << 20, 1, 1024, fill=256) == ((64, 1024), 1)
    finally:
        dispatch.APPLY_FILL = launch_fill
