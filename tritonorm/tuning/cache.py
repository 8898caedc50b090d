"""The persistent tuning cache and the shipped tables: JSON files of measured plans.

A file is JSON only (``json.loads``; nothing in it can run code) and looks like::

    {"format": "tritonorm-tuning", "version": 1, "kind": "cache" | "table",
     "validators": {"tritonorm": "0.1.0", "triton": "3.6.0", "torch": "2.11.0",
                    "gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0"},
     "provenance": {...}, "entries": {KEY: {"kernel": "split", "config": {...}, ...}}}

KEY is ``dispatch.Problem.key()``: op | scope | dtype | layout | flags | P bucket | M bucket.

The user's cache lives in ``$TRITONORM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/tritonorm`` or
``~/.cache/tritonorm``), one file per GPU. Its validators must equal this process's (tritonorm,
Triton and torch versions, GPU name and compute capability) or the whole file is ignored, as
PyTorch TunableOp does, and the next write replaces it.

Machines do things to files: a cache can be corrupt (any bytes, not UTF-8), truncated, another
tool's JSON, stale, or hostile (huge, deeply nested, wrong types). Each such file is ignored
with one ``TuningCacheWarning`` and never raises. Writes hold a ``filelock`` lock (an OS lock,
released by the kernel if the writer dies), re-read the file, merge, and replace it atomically
(temp file + ``os.replace``), so concurrent processes neither corrupt the file nor drop each
other's entries, and a writer killed mid-write leaves the previous file. Where nothing can be
written the cache keeps working in memory.

Shipped tables (tritonorm/tables/<name>.json) have the same format with kind "table"; they are
read-only and validated by compute capability only (their versions are provenance).

This module imports nothing else from tritonorm at import time: the dispatcher (above it)
subscribes to changes with ``on_change`` to forget its memoized plans.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Callable

FORMAT = "tritonorm-tuning"
VERSION = 1
KERNELS = ("fused", "looped", "split", "torch")
CONFIG_KEYS = ("block_p", "block_m", "num_warps", "split", "wide", "block_a")  # wide, block_a: dispatch.wide_plan
# A real cache holds a few thousand entries (well under 1 MB); anything far larger is not ours.
MAX_BYTES = 16 << 20
MAX_ENTRIES = 100_000
LOCK_TIMEOUT_S = 60.0


class TuningCacheWarning(UserWarning):
    """A tuning cache or table could not be used (corrupt, stale, foreign) or written."""


_warned: set = set()
_lock = threading.Lock()
_listeners: list = []


def on_change(fn: Callable[[], None]) -> None:
    """Call ``fn()`` whenever cached entries change or are reset (idempotent per function)."""
    with _lock:
        if fn not in _listeners:
            _listeners.append(fn)


def _changed() -> None:
    for fn in list(_listeners):
        fn()


def _warn_once(tag: str, message: str) -> None:
    with _lock:
        if tag in _warned:
            return
        _warned.add(tag)
    warnings.warn(message, TuningCacheWarning, stacklevel=3)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def versions() -> dict:
    from .. import __version__  # the package root's constant; defined before any submodule

    return {"tritonorm": __version__, "triton": _version("triton"), "torch": _version("torch")}


def validators_for(profile) -> dict:
    """What a cache file must match to be used on this device in this process."""
    cap = profile.capability
    return {**versions(), "gpu": profile.gpu_name or profile.name,
            "capability": f"{cap[0]}.{cap[1]}" if cap else "none"}


def cache_dir() -> Path:
    env = os.environ.get("TRITONORM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tritonorm"


def cache_file(profile, directory: Path | None = None) -> Path:
    cap = profile.capability
    slug = re.sub(r"[^a-z0-9]+", "-", (profile.gpu_name or profile.name).lower()).strip("-")
    sm = f"-sm{cap[0]}{cap[1]}" if cap else ""
    return (directory or cache_dir()) / f"tuning-{slug}{sm}.json"


# ------------------------------------------------------------------------------ the file schema


def _small_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 20


def clean_entry(raw) -> dict | None:
    """The entry if it is well formed (known kernel, small positive integer config), else None.

    Extra fields (time_us, case, measured date...) are kept only when they are JSON scalars.
    """
    if not isinstance(raw, dict) or raw.get("kernel") not in KERNELS:
        return None
    config = raw.get("config", {})
    if not (isinstance(config, dict) and all(k in CONFIG_KEYS and _small_int(v) for k, v in config.items())):
        return None
    info = {k: v for k, v in raw.items() if k not in ("kernel", "config") and isinstance(k, str)
            and (v is None or isinstance(v, (str, int, float, bool)))}
    return {**info, "kernel": raw["kernel"], "config": dict(config)}


@dataclass(frozen=True)
class TuningFile:
    """A parsed cache or table file: the header checked, entries cleaned one by one."""

    kind: str
    validators: dict
    entries: dict
    provenance: dict = field(default_factory=dict)
    dropped: int = 0                 # malformed entries left out

    @classmethod
    def parse(cls, data, kind: str) -> "TuningFile | str":
        """The file, or why it is not a tritonorm ``kind`` file of this format version."""
        if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("kind") == kind):
            return "foreign"
        if data.get("version") != VERSION:
            return "stale: format version"
        validators, entries = data.get("validators", {}), data.get("entries", {})
        provenance = data.get("provenance", {})
        if not (isinstance(validators, dict) and all(isinstance(v, str) for v in validators.values())
                and isinstance(entries, dict) and isinstance(provenance, dict)):
            return "foreign"
        if len(entries) > MAX_ENTRIES:
            return "foreign"
        good = {}
        for key, raw in entries.items():
            entry = clean_entry(raw)
            if entry is not None:
                good[key] = entry
        return cls(kind, validators, good, provenance, len(entries) - len(good))

    def to_json(self) -> dict:
        out = {"format": FORMAT, "version": VERSION, "kind": self.kind, "validators": self.validators,
               "entries": self.entries}
        if self.provenance:
            out["provenance"] = self.provenance
        return out


_WHY = {
    "foreign": "is not a tritonorm {what} (another format, kind or shape)",
    "stale: format version": f"has another format version (expected {VERSION})",
}


def load(path: Path, kind: str, expect: dict | None, what: str) -> tuple[TuningFile | None, str]:
    """The parsed file and its status ("ok", "missing", or why it was ignored).

    ``expect``: validators that must match exactly (None: no check). Never raises for a bad
    file: warns once per file and reason and returns (None, reason).
    """
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            _warn_once(f"huge:{path}", f"tritonorm: {what} {path} is {size} bytes, more than any "
                       f"tuning file holds ({MAX_BYTES}); ignoring it")
            return None, "foreign: too large"
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None, "missing"
    except OSError as exc:
        _warn_once(f"read:{path}", f"tritonorm: cannot read {what} {path} ({exc}); ignoring it")
        return None, f"unreadable: {exc}"
    try:
        data = json.loads(raw[:MAX_BYTES].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        _warn_once(f"corrupt:{path}", f"tritonorm: {what} {path} is not valid UTF-8 JSON (corrupt or "
                   f"truncated: {str(exc)[:120]}); ignoring it")
        return None, "corrupt"
    doc = TuningFile.parse(data, kind)
    if isinstance(doc, str):
        _warn_once(f"{doc}:{path}", f"tritonorm: {what} {path} "
                   f"{_WHY[doc].format(what=what)}; ignoring it")
        return None, doc
    if expect is not None:
        diff = [f"{k} {doc.validators.get(k)!r} != {v!r}" for k, v in expect.items()
                if doc.validators.get(k) != v]
        if diff:
            _warn_once(f"stale:{path}", f"tritonorm: {what} {path} was made for another setup "
                       f"({'; '.join(diff)}); ignoring it (re-run `tritonorm tune`)")
            return None, "stale: " + "; ".join(diff)
    if doc.dropped:
        _warn_once(f"entries:{path}", f"tritonorm: {what} {path}: ignoring {doc.dropped} malformed entries")
    return doc, "ok"


def write_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temp file in the same folder, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def file_lock(path: Path):
    """An OS lock on ``<path>.lock`` (flock on POSIX, msvcrt on Windows): the kernel drops it
    when the holder dies, so a killed writer never leaves the cache locked."""
    from filelock import FileLock

    return FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)


# ------------------------------------------------------------------------------ the user's cache


class TuningCache:
    """The user's cache for one GPU: entries in memory, persisted on every ``put``."""

    def __init__(self, path: Path, validators: dict):
        self.path = Path(path)
        self.validators = dict(validators)
        doc, self.status = load(self.path, "cache", self.validators, "tuning cache")
        self.entries = dict(doc.entries) if doc else {}
        self.writable = True
        self._mutex = threading.Lock()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, key: str, kernel: str, config: dict, **info) -> None:
        """Record a measured plan (``info``: e.g. time_us, measured date) and persist it."""
        self.put_many({key: {"kernel": kernel, "config": dict(config), **info}})

    def put_many(self, new: dict) -> None:
        entries = {k: clean_entry(v) for k, v in new.items()}
        bad = [k for k, v in entries.items() if v is None or not isinstance(k, str)]
        if bad:
            raise ValueError(f"new: {len(bad)} malformed tuning entries ({bad[:3]}); an entry needs "
                             f"kernel in {KERNELS} and an integer config with keys in {CONFIG_KEYS}")
        with self._mutex:
            self.entries.update(entries)
            if self.writable:
                self._persist(entries)
        _changed()

    def _persist(self, new: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(self.path):
                # Merge with what other processes wrote since we read (same validators only).
                doc, _ = load(self.path, "cache", self.validators, "tuning cache")
                merged = {**(doc.entries if doc else {}), **self.entries, **new}
                write_atomic(self.path, TuningFile("cache", self.validators, merged).to_json())
                self.entries, self.status = merged, "ok"
        except OSError as exc:  # includes filelock.Timeout (a TimeoutError)
            self.writable = False
            _warn_once(f"write:{self.path}", f"tritonorm: cannot write the tuning cache {self.path} "
                       f"({exc}); tuned plans are kept in memory for this process only")


_caches: dict = {}
_tables: dict = {}


def user_cache(profile) -> TuningCache:
    """The (process-wide) cache object for a live device profile."""
    path = cache_file(profile)
    key = (str(path), profile.gpu_name, profile.capability)
    with _lock:
        cache = _caches.get(key)
        if cache is None:
            cache = _caches[key] = TuningCache(path, validators_for(profile))
    return cache


# ------------------------------------------------------------------------------ shipped tables


class Table:
    """A shipped, read-only table of tuned plans for one GPU profile."""

    def __init__(self, name: str, entries: dict, provenance: dict, capability: str | None):
        self.name, self.entries, self.provenance, self.capability = name, entries, provenance, capability

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def __len__(self) -> int:
        return len(self.entries)


def table_path(name: str) -> Path:
    return Path(str(resources.files("tritonorm") / "tables" / f"{name}.json"))


def load_table(path: Path, name: str) -> Table:
    doc, _ = load(path, "table", None, "shipped tuning table")
    if doc is None:
        return Table(name, {}, {}, None)
    return Table(name, doc.entries, doc.provenance, doc.validators.get("capability"))


def shipped_table(name: str) -> Table:
    with _lock:
        table = _tables.get(name)
    if table is None:
        table = load_table(table_path(name), name)
        with _lock:
            _tables[name] = table
    return table


def reset() -> None:
    """Forget loaded caches, tables and warnings (tests; after TRITONORM_CACHE_DIR changes)."""
    with _lock:
        _caches.clear()
        _tables.clear()
        _warned.clear()
    _changed()
