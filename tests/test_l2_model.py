"""The L2 replay model (tritonorm/bench/l2.py): the LRU and the round-robin dispatch on cases
whose hits are known by hand, the geometry decoding against element-by-element enumeration, and
the replay of a real planned call, where taking the apply tiles last to first must serve more
of the re-read than first to last once the tensor outgrows the cache; the same of the planes
kernels' second sweeps (last sample tile first)."""

from __future__ import annotations

import pytest
import torch

from tritonorm import dispatch
from tritonorm.bench import l2
from tritonorm.bench.shapes import cases
from tritonorm.kernels import layout
from tritonorm import scope as scopes


def _sweep(keys, write=False):
    return [[((k,), 1.0, l2._FULL, write)] for k in keys]  # one program, one whole unit a step


@pytest.mark.parametrize("units,capacity", [(100, 40), (100, 99), (50, 50), (50, 80)])
def test_lru_second_sweep_same_and_reverse_order(units, capacity):
    keys = list(range(units))
    for order, want in ((keys, units if capacity >= units else 0),
                        (keys[::-1], min(units, capacity))):
        cache = l2.LRU(capacity)
        assert l2.run_kernel(cache, [_sweep(keys)], 1) == (units, 0, 0)  # cold: every read misses
        reads, hits, writes = l2.run_kernel(cache, [_sweep(order)], 1)
        assert (reads, hits, writes) == (units, want, 0), (order[:3], capacity)


def test_writes_take_room_and_slots_interleave():
    # Reading 0..9 back in reverse while writing a fresh unit a step: each write evicts the
    # oldest unit, so only the newest half of the first sweep is still there when asked for.
    cache = l2.LRU(10)
    l2.run_kernel(cache, [_sweep(range(10))], 1)
    steps = [[((k,), 1.0, l2._FULL, False), (("out", k), 1.0, l2._FULL, True)] for k in reversed(range(10))]
    reads, hits, writes = l2.run_kernel(cache, [steps], 1)
    assert (reads, writes) == (10, 10) and hits == 5
    # Two resident programs advance in turn: A0 B0 A1 B1 ...
    seen = []

    class Spy(l2.LRU):
        def access(self, key, mask=l2._FULL):
            seen.append(key[0])
            return super().access(key, mask)

    l2.run_kernel(Spy(100), [_sweep("ab"), _sweep("cd"), _sweep("e")], 2)
    assert seen == ["a", "c", "b", "d", "e"]


def test_sectors_of_a_shared_unit_do_not_serve_each_other():
    """Two tiles that share a unit but not its sectors (one plane's end and the next one's
    start): the second finds nothing; the same sectors again are a hit."""
    cache = l2.LRU(4)
    assert cache.access("u", 0b0011) == 0.0
    assert cache.access("u", 0b1100) == 0.0
    assert cache.access("u", 0b0110) == 1.0
    assert cache.access("u", 0b11110) == 0.75


def _views():
    out = []
    for shape, scope, groups, fmt in (((3, 8, 5, 6), "batch", None, None),
                                      ((3, 8, 5, 6), "batch", None, torch.channels_last),
                                      ((2, 8, 4, 5), "group", 4, None),
                                      ((2, 8, 4, 5), "group", 4, torch.channels_last)):
        x = torch.empty(shape).to(memory_format=fmt or torch.contiguous_format)
        spec = scopes.parse(scope, x.dim(), groups, shape[1])
        out.append(layout.stat_view(x.shape, spec, x.stride(), x.stride()))
    return out


@pytest.mark.parametrize("view", _views())
def test_spans_cover_exactly_the_indices_offsets(view):
    for side in (view.rows, view.cols):
        geo = l2.Geometry(side.geometry, 0)
        n = side.numel
        for start, stop in ((0, n), (1, n - 1), (n // 3, n // 3 + 7)):
            want = sorted(geo.offset(i) for i in range(start, min(stop, n)))
            got = sorted(a + j * d for a, b, d in geo.spans(start, min(stop, n))
                         for j in range((b - a) // max(d, 1) + 1))
            assert got == want, (start, stop)


@pytest.mark.parametrize("view", _views())
def test_tile_bytes_add_up(view):
    """The bytes a tile uses, summed over its blocks, are its elements' bytes (a contiguous run
    exactly; strided columns by their density)."""
    eb = 2
    tiles = l2.Tiles(view.rows.geometry, view.cols.geometry, 0, eb, view.P, view.M, 2)
    for rb in range(-(-view.P // 2)):
        rows = min(2, view.P - 2 * rb)
        for c0 in range(0, view.M, 16):
            cols = min(16, view.M - c0)
            got = sum(u for _, u, _ in tiles.blocks(rb, c0, c0 + 16))
            assert got == pytest.approx(rows * cols * eb, rel=1e-9), (rb, c0)


@pytest.mark.parametrize("C,CB", [(640, 80), (320, 320), (96, 40)])
def test_pixel_tile_bytes_add_up_and_do_not_overlap(C, CB):
    """Whole-pixel tiles (sample, channel block, pixels): their bytes add up, and neighbouring
    tiles of one channel block, or the same pixels of two blocks, share no sector."""
    HW, eb = 50, 2
    ncb = -(-C // CB)
    tiles = l2.PixelTiles(HW, C, CB, ncb, eb)
    for pid in range(2 * ncb):
        for p0 in range(0, HW, 16):
            got = tiles.blocks(pid, p0, p0 + 16)
            assert sum(u for _, u, _ in got) == min(16, HW - p0) * CB * eb
    def sectors(t):
        return {(k, bit) for k, _, m in t for bit in range(32) if m >> bit & 1}
    assert not sectors(tiles.blocks(0, 0, 16)) & sectors(tiles.blocks(0, 16, 32))
    if ncb > 1:
        assert not sectors(tiles.blocks(0, 0, 16)) & sectors(tiles.blocks(1, 0, 16))


def _case(name):
    (c,) = [c for c in cases("all") if c.name == name]
    return c


def test_replay_of_a_planned_split_call():
    """GroupNorm+SiLU 320x64^2 batch 1 (2.5 MiB of bf16) on the h200 plan: split forward and
    two-stage backward. With the L2 larger than the tensor the re-read is served whole; with a
    cache of 1 MiB, first to last serves almost nothing of it and last to first serves several
    times more (all its programs run at once, each sweeping its chunk, so the sweep's last tiles
    are spread over every chunk and last to first meets only part of them first)."""
    case = _case("gn32+silu 320x64^2 b1")
    row = l2.model_case(case, torch.bfloat16, False, "h200")
    for phase, twice in (("fwd", 1.5), ("bwd", 5 / 3)):
        r = row[phase]
        assert r["modelled"], r
        assert r["planned@1"]["requested_x_ideal"] == pytest.approx(twice, rel=0.01)
        assert r["planned@1"]["hbm_x_ideal"] == pytest.approx(1.0, rel=0.01)
    fwd, bwd = l2.record_call(case, torch.bfloat16, False, "h200")
    profile = dispatch.profile_named("h200")
    for launches in (fwd, bwd):
        assert {la.name for la in launches} & l2._TWO_SWEEP
        rev = l2.replay(launches, profile, 1 << 20, reverse=True)
        fwd_order = l2.replay(launches, profile, 1 << 20, reverse=False)
        assert rev["reads"] == fwd_order["reads"]
        assert rev["hits"] > 2 * fwd_order["hits"] and rev["hits"] > 0.05 * (1 << 20), (rev["hits"], fwd_order["hits"])
        assert rev["hits"] <= 1 << 20 and fwd_order["hits"] < 0.05 * rev["reads"]


def test_plane_tile_bytes_add_up():
    """Planes runs (sample n, channel block pid: T contiguous elements at (n * NCB + pid) * T):
    a tile of samples n0..n1 touches (n1 - n0) * T elements, and two channel blocks' runs of one
    sample are apart (sectors shared only at a run's ends)."""
    T, ncb, eb = 392, 4, 2
    tiles = l2.PlaneTiles(T, ncb, eb)
    for n0, n1 in [(0, 1), (0, 8), (3, 7)]:
        assert sum(u for _, u, _ in tiles.blocks(1, n0, n1)) == (n1 - n0) * T * eb
    a, b = tiles.blocks(0, 0, 1), tiles.blocks(2, 0, 1)
    assert not {k for k, _, _ in a} & {k for k, _, _ in b}


@pytest.mark.parametrize("n,fused", [(32, True), (64, False)])
def test_replay_of_a_planned_planes_call(n, fused):
    """BatchNorm 2048x7^2 (bf16 NCHW, the planes kernels) on the h200 plan. At batch 32 a channel
    block's samples are one tile, read once (no second sweep: nothing to serve, a call of one
    sweep). At batch 64 the kernels sweep the samples twice; with a cache of 6 MiB (half of x),
    the y and dx sweeps taken last to first (dispatch.sweep_back) are served several times what
    first to last gets: all 256 programs run at once, so the first sweep's last tiles are what
    the cache holds when the second begins."""
    from dataclasses import replace

    case = replace(_case("bn 2048x7^2 b256"), shape=(n, 2048, 7, 7))
    fwd, bwd = l2.record_call(case, torch.bfloat16, False, "h200")
    profile = dispatch.profile_named("h200")
    for launches in (fwd, bwd):
        (la,) = [la for la in launches if la.name in l2._PLANES]
        assert l2._two_sweep(la) is not fused
        a = l2._args(la)  # the launch as planned takes its second sweep last to first
        assert a["N_BACK"] == (0 if fused else (n - 1) // a["BLOCK_N"]) and (fused or a["N_BACK"])
        rev = l2.replay(launches, profile, 6 << 20, reverse=True)
        fwd_order = l2.replay(launches, profile, 6 << 20, reverse=False)
        assert rev["reads"] == fwd_order["reads"]
        if fused:
            assert rev["hits"] == fwd_order["hits"] < 0.05 * rev["reads"]
        else:
            assert rev["hits"] > 4 * fwd_order["hits"] and rev["hits"] > 2 << 20, (rev["hits"], fwd_order["hits"])
    row = l2.model_case(case, torch.bfloat16, False, "h200", fractions=(1.0,))
    for phase in ("fwd", "bwd"):
        assert row[phase]["modelled"] is not fused, row[phase]
        if fused:
            assert row[phase]["why"] == "one sweep"
        else:  # x (and dy) of 6 MiB fit the L2: the second sweep is served whole
            assert row[phase]["planned@1"]["hbm_x_ideal"] == pytest.approx(1.0, rel=0.02)


def test_replay_of_a_column_sums_call(monkeypatch):
    """RMSNorm rows of 16384 (too long to fuse), 64 of them, on the looped plan (WIDE_ROWS off):
    the backward's column-sums kernel (program (r, t): column tile t of rows r, r + R, ...) then
    the apply kernel. With x and dy (4 MiB) inside the L2 the apply's re-read is served whole
    (half the reads); with a 4 MiB cache, the apply's tiles last to first meet what the sums
    kernel read last, first to last nothing."""
    from dataclasses import replace

    monkeypatch.setattr(dispatch, "WIDE_ROWS", False)
    case = replace(_case("rms 4096x16384"), shape=(64, 16384))
    _, bwd = l2.record_call(case, torch.bfloat16, False, "h200")
    assert [la.name for la in bwd] == ["_bwd_col_sums_kernel", "_bwd_apply_kernel"]
    profile = dispatch.profile_named("h200")
    whole = l2.replay(bwd, profile, 50 << 20)
    assert whole["reads"] == 2 * 2 * 64 * 16384 * 2 and whole["hits"] == whole["reads"] / 2
    rev = l2.replay(bwd, profile, 4 << 20, reverse=True)
    fwd_order = l2.replay(bwd, profile, 4 << 20, reverse=False)
    assert rev["hits"] > 0.25 * whole["hits"] and fwd_order["hits"] < 0.01 * whole["hits"], (rev, fwd_order)
    row = l2.model_case(case, torch.bfloat16, False, "h200", fractions=(1.0,))
    assert row["bwd"]["modelled"] and row["bwd"]["planned@1"]["hbm_x_ideal"] == pytest.approx(1.0, rel=0.01)


def test_replay_of_a_wide_backward_call():
    """The same rows on the WIDE plan: one fused dx launch on a (programs, 2) grid, each program
    sweeping its rows whole (x and dy) before its 8192-column tile, so x and dy are requested
    three times. With every program on an SM at once the L2 serves all but the first read of
    each row (HBM = the ideal); with a cache smaller than what the programs sweep together, it
    cannot, and the replay says so."""
    from dataclasses import replace

    case = replace(_case("rms 4096x16384"), shape=(64, 16384))
    _, bwd = l2.record_call(case, torch.bfloat16, False, "h200")
    # (+ the finish of the dweight partials, which the replay leaves out: _IGNORED)
    assert [la.name for la in bwd] == ["_bwd_fused_kernel", "_finish_kernel"] and bwd[0].args["WIDE"].value > 0
    profile = dispatch.profile_named("h200")
    whole = l2.replay(bwd, profile, 50 << 20)
    row_bytes = 2 * 64 * 16384 * 2  # x and dy
    assert whole["reads"] == 3 * row_bytes and whole["reads"] - whole["hits"] == row_bytes
    tiny = l2.replay(bwd, profile, 64 << 10)
    assert tiny["reads"] - tiny["hits"] > 1.5 * row_bytes, tiny
    row = l2.model_case(case, torch.bfloat16, False, "h200", fractions=(1.0,))
    assert row["bwd"]["modelled"] and row["bwd"]["planned@1"]["hbm_x_ideal"] == pytest.approx(1.0, rel=0.01)


def test_fused_whole_pixel_call_is_one_sweep():
    """SD 1280x8^2 channels_last: the whole-pixel fused kernels, a program's pixels in one tile,
    read x (and dy) once: nothing to replay, a call of one sweep (not 'kernels not modelled')."""
    row = l2.model_case(_case("gn32+silu 1280x8^2 b1 cl"), torch.bfloat16, True, "h200", fractions=(1.0,))
    for phase in ("fwd", "bwd"):
        assert row[phase]["modelled"] is False and row[phase]["why"] == "one sweep", row[phase]


def _cost(read, written, ideal_read, ideal_written):
    return {"bytes": read + written, "ideal": ideal_read + ideal_written, "read": read, "written": written,
            "ideal_read": ideal_read, "ideal_written": ideal_written}


def test_hbm_ratio_counts_the_replay_or_a_resident_call():
    mib = 2**20
    # 98 MiB ideal, 49 MiB re-read, 24.5 of it served by the replay; too large to be resident.
    big = _cost(147 * mib, 49 * mib, 49 * mib, 49 * mib)
    replayed = {"modelled": True, "planned@1": {"l2_served_mib": 24.5}}
    assert l2.hbm_ratio(big, None, 50 * mib) == (pytest.approx(2.0), "requested")
    assert l2.hbm_ratio(big, replayed, 50 * mib) == (pytest.approx(1.75), "replay")
    # 1 MiB of x and dy, 0.5 MiB of dx and 0.25 MiB of partials written and read back: all of it
    # fits in half the L2, so HBM moves the inputs once and every write once.
    small = _cost(1.25 * mib, 0.75 * mib, 1 * mib, 0.5 * mib)
    assert l2.hbm_ratio(small, None, 50 * mib) == (pytest.approx(1.75 / 1.5), "resident")
    assert l2.hbm_ratio(small, None, 2 * mib) == (pytest.approx(2 / 1.5), "requested")  # not resident
    rows = [{"case": "a", "fwd": replayed, "bwd": {"modelled": False}}]
    model_rows = [{"case": "a", "forward": big, "backward": small}, {"case": "b", "forward": small, "backward": big}]
    got = l2.counted(rows, model_rows, 50 * mib)
    assert got["forward"]["within"] == 0 and [o[0] for o in got["forward"]["over"]] == ["a", "b"]
    assert got["backward"]["within"] == 1 and got["backward"]["over"] == [("b", 2.0, "requested")]
    assert got["forward"]["counted_by"] == {"replay": 1, "resident": 1}


def test_command_line(tmp_path, capsys):
    path = tmp_path / "l2.json"
    assert l2.main(["--suite", "sd-unet", "--filter", "640x32^2 b1", "--quiet", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gn32+silu 640x32^2 b1" in out and "a model, not a measurement" in out
    import json

    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["case"].endswith("640x32^2 b1") or "640x32^2 b1 " in r["case"] for r in rows)
    assert any(r["fwd"]["modelled"] for r in rows)
    counted = json.loads(path.read_text())["counted"]
    assert counted["forward"]["cases"] == len(rows) and "within 1.1x the ideal in HBM bytes" in out


def test_tritonorm_bench_l2(capsys):
    from tritonorm import cli

    assert cli.main(["bench", "--l2", "--suite", "sd-unet", "--filter", "640x32^2 b1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "pixels_partial+pixels_apply" in out  # the channels_last case, on whole-pixel tiles
    assert "fwd_partial+fwd_apply" in out
    assert cli.main(["bench", "--l2", "--filter", "no such case"]) == 2
