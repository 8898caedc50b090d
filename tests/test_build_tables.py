"""tuning/build_tables.py --merge: ships tables a GPU run wrote (no GPU needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tritonorm.tuning import cache

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("build_tables", ROOT / "tuning" / "build_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table(path, entries, gpu="NVIDIA H200", capability="9.0"):
    path.write_text(json.dumps({"format": cache.FORMAT, "version": cache.VERSION, "kind": "table",
                                "validators": {"gpu": gpu, "capability": capability},
                                "provenance": {"command": "tune", "date": "2026-11-30", "status": "tuned"},
                                "entries": entries}))
    return path


def _entry(kernel="split", split=4, us=10.0):
    return {"kernel": kernel, "config": {"block_p": 1, "block_m": 1024, "num_warps": 4, "split": split},
            "time_us": us, "heuristic_us": 2 * us, "ranking": "split 1x1024 s4 w4: 10.0"}


def test_merge_later_files_win_and_the_table_is_what_the_dispatcher_reads(tmp_path):
    mod = _module()
    a = _table(tmp_path / "a.json", {"k1": _entry(split=4), "k2": _entry(split=16),
                                     "bad": {"kernel": "nope", "config": {}}})
    b = _table(tmp_path / "b.json", {"k2": _entry(split=64, us=5.0), "k3": _entry("looped", 1)})
    out = tmp_path / "h200.json"
    assert mod.main(["--device", "h200", "--merge", str(a), str(b), "--out", str(out)]) == 0
    doc = cache.TuningFile.parse(json.loads(out.read_text()), "table")
    assert not isinstance(doc, str) and doc.dropped == 0
    assert set(doc.entries) == {"k1", "k2", "k3"}  # "bad" left out
    assert doc.entries["k2"]["config"]["split"] == 64 and doc.entries["k1"]["config"]["split"] == 4
    assert doc.validators == {"gpu": "NVIDIA H200", "capability": "9.0"}
    assert doc.provenance["status"] == "tuned" and "a.json" in doc.provenance["sources"]
    # Merging again keeps what is there unless replaced.
    c = _table(tmp_path / "c.json", {"k4": _entry(split=8)})
    assert mod.main(["--device", "h200", "--merge", str(c), "--out", str(out)]) == 0
    assert set(cache.TuningFile.parse(json.loads(out.read_text()), "table").entries) == {"k1", "k2", "k3", "k4"}


def test_merge_refuses_another_gpu_or_a_foreign_file(tmp_path, capsys):
    mod = _module()
    out = tmp_path / "h200.json"
    h100 = _table(tmp_path / "h100.json", {"k1": _entry()}, gpu="NVIDIA H100")
    assert mod.main(["--device", "h200", "--merge", str(h100), "--out", str(out)]) == 1
    assert "refusing" in capsys.readouterr().out and not out.exists()
    foreign = tmp_path / "x.json"
    foreign.write_text(json.dumps({"rows": []}))
    assert mod.main(["--device", "h200", "--merge", str(foreign), "--out", str(out)]) == 1
    assert "not a tuning table" in capsys.readouterr().out and not out.exists()

