"""The tuning cache: JSON only, validated against versions and GPU, atomic writes, and every
way a file can be bad (corrupt, truncated, foreign, stale) or unwritable."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings
from pathlib import Path

import pytest
import torch

from tritonorm import dispatch
from tritonorm.tuning import cache

PROFILE = dispatch.replace(dispatch.PROFILES["h100"], gpu_name="NVIDIA H100 80GB HBM3", live=True)
CFG = {"block_p": 1, "block_m": 4096, "num_warps": 8, "split": 4}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONORM_CACHE_DIR", str(tmp_path / "cache"))
    cache.reset()
    yield
    cache.reset()


def _new_cache(path=None):
    return cache.TuningCache(path or cache.cache_file(PROFILE), cache.validators_for(PROFILE))


def _caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        result = fn()
    return result, [x for x in w if issubclass(x.category, cache.TuningCacheWarning)]


def test_roundtrip_and_location(tmp_path):
    c = _new_cache()
    assert c.path.parent == tmp_path / "cache" and c.status == "missing"
    c.put("k1", "split", CFG, time_us=12.5)
    data = json.loads(c.path.read_text())
    assert data["format"] == cache.FORMAT and data["kind"] == "cache"
    assert data["validators"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert set(data["validators"]) == {"tritonorm", "triton", "torch", "gpu", "capability"}
    again = _new_cache()
    assert again.status == "ok" and again.get("k1")["config"] == CFG
    assert not list(c.path.parent.glob("*.tmp"))  # temp files renamed, none left behind


def test_default_location_under_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITONORM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "tritonorm"
    assert cache.cache_file(PROFILE).name == "tuning-nvidia-h100-80gb-hbm3-sm90.json"


def _deep(n):
    return "[" * n + "]" * n


# Every way a machine or a person can spoil the file; each is ignored with exactly one warning.
BAD_FILES = {
    "truncated": ('{"format": "tritonorm-tuning", "version": 1, "kind": "cache", "entr', "corrupt"),
    "binary": (b"\x00\x01garbage", "corrupt"),
    "not utf-8": (b'{"format": "tritonorm-tuning", "k\xff\xfe": 1}', "corrupt"),
    "latin-1 text": ("{\"gpu\": \"caf\u00e9\"}".encode("latin-1"), "corrupt"),
    "empty": (b"", "corrupt"),
    "deeply nested": (_deep(100_000), "corrupt"),
    "huge integer": ('{"version": ' + "9" * 10_000 + "}", "corrupt"),
    "other tool": ('{"some": "other tool"}', "foreign"),
    "a list": ("[1, 2, 3]", "foreign"),
    "a string": ('"tritonorm-tuning"', "foreign"),
    "a table": ('{"format": "tritonorm-tuning", "version": 1, "kind": "table", "entries": {}}', "foreign"),
    "entries a list": ('{"format": "tritonorm-tuning", "version": 1, "kind": "cache", '
                       '"validators": {}, "entries": [1]}', "foreign"),
    "validators wrong type": ('{"format": "tritonorm-tuning", "version": 1, "kind": "cache", '
                              '"validators": {"gpu": [1]}, "entries": {}}', "foreign"),
    "version a string": ('{"format": "tritonorm-tuning", "version": "1", "kind": "cache", "entries": {}}',
                         "stale: format version"),
    "future version": ('{"format": "tritonorm-tuning", "version": 2, "kind": "cache", "entries": {}}',
                       "stale: format version"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_are_ignored_with_one_warning(name):
    content, status = BAD_FILES[name]
    path = cache.cache_file(PROFILE)
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    c, warned = _caught(_new_cache)
    assert c.status == status and len(c) == 0
    assert len(warned) == 1
    _, again = _caught(_new_cache)  # the same file again: no second warning
    assert again == []
    c.put("k", "looped", {"block_p": 1, "block_m": 1024, "num_warps": 4, "split": 1})
    assert json.loads(path.read_text())["entries"]["k"]["kernel"] == "looped"  # replaced


def test_huge_file_is_not_read(monkeypatch):
    monkeypatch.setattr(cache, "MAX_BYTES", 1000)
    c = _new_cache()
    c.put("k", "split", CFG)
    data = json.loads(c.path.read_text())
    data["validators"]["padding"] = "x" * 2000  # a valid file, but larger than any cache is
    c.path.write_text(json.dumps(data))
    reader = []
    monkeypatch.setattr(type(c.path), "read_bytes", lambda self: reader.append(self) or b"")
    again, warned = _caught(_new_cache)
    assert again.status.startswith("foreign") and len(warned) == 1 and "bytes" in str(warned[0].message)
    assert reader == []  # refused from its size, never loaded into memory


def test_shipped_table_that_is_bad_is_ignored(tmp_path, monkeypatch):
    bad = tmp_path / "h100.json"
    bad.write_bytes(b"\xff\xfe\x00")
    monkeypatch.setattr(cache, "table_path", lambda name: bad)
    table, warned = _caught(lambda: cache.shipped_table("h100"))
    assert len(table) == 0 and len(warned) == 1


@pytest.mark.parametrize("field,value", [("triton", "0.0.1"), ("torch", "1.0"), ("tritonorm", "9.9"),
                                         ("gpu", "NVIDIA A100"), ("capability", "8.0")])
def test_stale_validators_invalidate_the_file(field, value):
    c = _new_cache()
    c.put("k", "split", CFG)
    data = json.loads(c.path.read_text())
    data["validators"][field] = value
    c.path.write_text(json.dumps(data))
    stale, warned = _caught(_new_cache)
    assert stale.get("k") is None and stale.status.startswith("stale") and field in stale.status
    assert len(warned) == 1 and "another setup" in str(warned[0].message)


def test_malformed_entries_are_dropped():
    path = cache.cache_file(PROFILE)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": cache.FORMAT, "version": 1, "kind": "cache",
                                "validators": cache.validators_for(PROFILE), "entries": {
                                    "good": {"kernel": "fused", "config": {"block_p": 1, "block_m": 64}},
                                    "code": {"kernel": "__import__('os').system('x')", "config": {}},
                                    "cfg": {"kernel": "split", "config": {"block_m": "4096"}},
                                    "huge": {"kernel": "split", "config": {"split": 10**12}},
                                    "bool": {"kernel": "split", "config": {"split": True}},
                                    "list": ["split"], "none": None, "num": 3,
                                    "cfg list": {"kernel": "split", "config": [1, 2]},
                                    "nested info": {"kernel": "fused", "config": {}, "x": {"y": [1]}},
                                    }}))
    c, warned = _caught(_new_cache)
    assert set(c.entries) == {"good", "nested info"} and len(warned) == 1
    assert "x" not in c.entries["nested info"]  # only JSON scalars kept beside kernel and config
    with pytest.raises(ValueError):
        c.put("bad", "evil", {})


def test_read_only_location_keeps_working_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("TRITONORM_CACHE_DIR", str(blocker / "sub"))
    def make_and_put():
        c = _new_cache()
        c.put("k1", "split", CFG)
        return c

    c, warned = _caught(make_and_put)
    assert len(warned) == 1 and "in memory" in str(warned[0].message)
    _, warned = _caught(lambda: c.put("k2", "split", CFG))
    assert warned == [] and c.get("k1") and c.get("k2") and not c.writable


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_read_only_directory_permissions(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setenv("TRITONORM_CACHE_DIR", str(ro))
    try:
        c = _new_cache()
        _, warned = _caught(lambda: c.put("k", "split", CFG))
        assert len(warned) == 1 and c.get("k") is not None
    finally:
        ro.chmod(0o755)


def test_failed_replace_leaves_old_file_intact(monkeypatch):
    c = _new_cache()
    c.put("k1", "split", CFG)
    before = c.path.read_text()

    def boom(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(cache.os, "replace", boom)
    _, warned = _caught(lambda: c.put("k2", "split", CFG))
    assert len(warned) == 1
    assert c.path.read_text() == before and not list(c.path.parent.glob("*.tmp"))
    assert c.get("k2") is not None  # still in memory


def _writer(directory: str, tag: str, n: int) -> None:
    os.environ["TRITONORM_CACHE_DIR"] = directory
    cache.reset()
    c = cache.user_cache(PROFILE)
    for i in range(n):
        c.put(f"{tag}-{i}", "split", {**CFG, "split": 2 + i % 4})


def _ctx():
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_writer_processes_lose_nothing(tmp_path, writers):
    directory = str(tmp_path / "shared")
    tags = "abcd"[:writers]
    procs = [_ctx().Process(target=_writer, args=(directory, tag, 25)) for tag in tags]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    os.environ["TRITONORM_CACHE_DIR"] = directory
    cache.reset()
    path = cache.cache_file(PROFILE)
    data = json.loads(path.read_text())  # valid JSON
    entries = data["entries"]
    assert set(entries) == {f"{t}-{i}" for t in tags for i in range(25)}  # nothing lost
    assert all(e["kernel"] == "split" and e["config"]["split"] in (2, 3, 4, 5) for e in entries.values())
    assert not list(path.parent.glob("*.tmp"))


def _stuck_writer(directory: str, ready: str) -> None:
    """Writes one entry, then blocks forever in the middle of writing the second (lock held,
    half the temp file written)."""
    import time

    os.environ["TRITONORM_CACHE_DIR"] = directory
    cache.reset()
    c = cache.user_cache(PROFILE)
    c.put("first", "split", CFG)
    real_dump = json.dump

    def dump_then_hang(obj, fh, **kw):
        text = json.dumps(obj, **kw)
        fh.write(text[: len(text) // 2])
        fh.flush()
        open(ready, "w").close()
        while True:
            time.sleep(1)

    json.dump = dump_then_hang
    try:
        c.put("second", "split", CFG)
    finally:
        json.dump = real_dump


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_writer_killed_mid_write_leaves_a_valid_file_and_no_lock(tmp_path):
    import signal
    import time

    from filelock import FileLock, Timeout

    directory, ready = str(tmp_path / "shared"), str(tmp_path / "ready")
    proc = _ctx().Process(target=_stuck_writer, args=(directory, ready))
    proc.start()
    deadline = time.monotonic() + 60
    while not os.path.exists(ready) and time.monotonic() < deadline and proc.is_alive():
        time.sleep(0.02)
    assert os.path.exists(ready), "the writer never reached the middle of its write"
    path = cache.cache_file(PROFILE, Path(directory))
    with pytest.raises(Timeout):  # while it lives, it holds the lock
        FileLock(str(path) + ".lock", timeout=0.05).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert set(json.loads(path.read_text())["entries"]) == {"first"}  # the old file, whole
    with FileLock(str(path) + ".lock", timeout=5):  # the lock died with the writer
        pass
    os.environ["TRITONORM_CACHE_DIR"] = directory
    cache.reset()
    c, warned = _caught(lambda: cache.user_cache(PROFILE))
    assert warned == [] and c.get("first") is not None
    c.put("third", "split", CFG)
    assert set(json.loads(path.read_text())["entries"]) == {"first", "third"}


def test_cache_is_json_only(tmp_path):
    """Nothing in a cache file is executed: a file with code in it is data, then ignored."""
    path = cache.cache_file(PROFILE)
    path.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    path.write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    c, _ = _caught(_new_cache)
    assert c.status == "corrupt" and not marker.exists()


def test_cache_imports_point_down_only():
    """The dispatcher reads the cache; the cache never imports the dispatcher (no circle): it
    tells subscribers (dispatch.clear_memo) about changes through ``on_change``."""
    import ast

    tree = ast.parse(Path(cache.__file__).read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("dispatch" in m for m in imported), imported


def test_a_put_forgets_the_dispatchers_memoized_plans():
    calls = []

    def listener():
        calls.append(1)

    cache.on_change(listener)
    cache.on_change(listener)  # once only
    try:
        _new_cache().put("k", "split", CFG)
        assert calls == [1]
        cache.reset()
        assert calls == [1, 1]
    finally:
        cache._listeners.remove(listener)


def test_clearing_plans_also_forgets_cached_calls():
    # A call signature seen before keeps its launch plan in core's call cache; when the tuning
    # cache changes (dispatch.clear_memo), the next call must plan anew, not reuse the old plan.
    import tritonorm
    from tritonorm import core, dispatch as dp

    x = torch.randn(2, 8, 4, 4)
    tritonorm.norm(x, "group", num_groups=2, backend="triton")
    assert core._CALLS
    dp.clear_memo()
    assert not core._CALLS


def test_launch_clear_forgets_cached_calls_too():
    # Tests and the host benchmark switch profiles or kernel paths and call launch.clear(): a
    # signature cached by core before must not keep its old plan.
    import tritonorm
    from tritonorm import core
    from tritonorm.kernels import launch

    tritonorm.norm(torch.randn(2, 8, 4, 4), "group", num_groups=2, backend="triton")
    assert core._CALLS and launch._PLANS
    launch.clear()
    assert not core._CALLS and not launch._PLANS
