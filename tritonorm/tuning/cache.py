"""The persistent tuning cache and the shipped tables: JSON files of measured plans.

A file is JSON only (``json.load``; nothing in it can run code) and looks like::

    {"format": "tritonorm-tuning", "version": 1, "kind": "cache" | "table",
     "validators": {"tritonorm": "0.1.0", "triton": "3.6.0", "torch": "2.11.0",
                    "gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0"},
     "provenance": {...}, "entries": {KEY: {"kernel": "split", "config": {...}, ...}}}

KEY is ``dispatch.Problem.key()``: op | scope | dtype | layout | flags | P bucket | M bucket.

The user's cache lives in ``$TRITONORM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/tritonorm`` or
``~/.cache/tritonorm``), one file per GPU. Its validators must equal this process's (tritonorm,
Triton and torch versions, GPU name and compute capability) or the whole file is ignored, as
PyTorch TunableOp does, and the next write replaces it. A corrupt, truncated or foreign file is
ignored with one warning. Writes hold a lock file, re-read the file, merge, and replace it
atomically (temp file + ``os.replace``), so concurrent processes neither corrupt the file nor
drop each other's entries. Where nothing can be written the cache keeps working in memory.

Shipped tables (tritonorm/tables/<name>.json) have the same format with kind "table"; they are
read-only and validated by compute capability only (their versions are provenance).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import warnings
from importlib import metadata, resources
from pathlib import Path

FORMAT = "tritonorm-tuning"
VERSION = 1
_KERNELS = ("fused", "looped", "split", "torch")
_CONFIG_KEYS = ("block_p", "block_m", "num_warps", "split")


class TuningCacheWarning(UserWarning):
    """A tuning cache or table could not be used (corrupt, stale, foreign) or written."""


_warned: set = set()
_lock = threading.Lock()


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
    from .. import __version__

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


def _clean_entries(raw) -> tuple[dict, int]:
    """Keep well-formed entries (kernel name, small integer config); count the rest."""
    if not isinstance(raw, dict):
        return {}, 1
    good, bad = {}, 0
    for key, entry in raw.items():
        ok = (isinstance(key, str) and isinstance(entry, dict) and entry.get("kernel") in _KERNELS
              and isinstance(entry.get("config", {}), dict))
        if ok:
            cfg = entry.get("config", {})
            ok = all(k in _CONFIG_KEYS and isinstance(v, int) and not isinstance(v, bool)
                     and 0 < v <= 1 << 20 for k, v in cfg.items())
        if ok:
            good[key] = entry
        else:
            bad += 1
    return good, bad


def read_file(path: Path, kind: str, expect: dict | None, what: str) -> tuple[dict, str]:
    """Entries of a cache/table file, and a status ("ok", "missing", or why it was ignored).

    ``expect``: validators that must match exactly (None: no check). Warns once per reason.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return {}, "missing"
    except OSError as exc:
        _warn_once(f"read:{path}", f"tritonorm: cannot read {what} {path} ({exc}); ignoring it")
        return {}, f"unreadable: {exc}"
    try:
        data = json.loads(text)
    except ValueError as exc:
        _warn_once(f"corrupt:{path}", f"tritonorm: {what} {path} is not valid JSON (corrupt or "
                   f"truncated: {exc}); ignoring it")
        return {}, "corrupt"
    if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("kind") == kind):
        _warn_once(f"foreign:{path}", f"tritonorm: {path} is not a tritonorm {what} "
                   f"(format/kind mismatch); ignoring it")
        return {}, "foreign"
    if data.get("version") != VERSION:
        _warn_once(f"version:{path}", f"tritonorm: {what} {path} has format version "
                   f"{data.get('version')!r}, expected {VERSION}; ignoring it")
        return {}, "stale: format version"
    if expect is not None:
        have = data.get("validators")
        if not isinstance(have, dict):
            _warn_once(f"foreign:{path}", f"tritonorm: {what} {path} has no validators; ignoring it")
            return {}, "foreign"
        diff = [f"{k} {have.get(k)!r} != {v!r}" for k, v in expect.items() if have.get(k) != v]
        if diff:
            _warn_once(f"stale:{path}", f"tritonorm: {what} {path} was made for another setup "
                       f"({'; '.join(diff)}); ignoring it (re-run `tritonorm tune`)")
            return {}, "stale: " + "; ".join(diff)
    entries, bad = _clean_entries(data.get("entries", {}))
    if bad:
        _warn_once(f"entries:{path}", f"tritonorm: {what} {path}: ignoring {bad} malformed entries")
    return entries, "ok"


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path``.lock (POSIX); without fcntl, atomic replace alone."""
    try:
        import fcntl
    except ImportError:  # Windows: writes stay atomic, concurrent merges may drop entries
        yield
        return
    with open(str(path) + ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temp file in the same folder, then rename over ``path``."""
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


class TuningCache:
    """The user's cache for one GPU: entries in memory, persisted on every ``put``."""

    def __init__(self, path: Path, validators: dict):
        self.path = Path(path)
        self.validators = dict(validators)
        self.entries, self.status = read_file(self.path, "cache", self.validators, "tuning cache")
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
        entries, bad = _clean_entries(new)
        if bad:
            raise ValueError(f"{bad} malformed tuning entries (kernel in {_KERNELS}, integer config)")
        with self._mutex:
            self.entries.update(entries)
            if self.writable:
                self._persist(entries)
        from .. import dispatch

        dispatch.clear_memo()

    def _persist(self, new: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path):
                # Merge with what other processes wrote since we read (same validators only).
                on_disk, status = read_file(self.path, "cache", self.validators, "tuning cache")
                merged = {**on_disk, **self.entries, **new} if status == "ok" else {**self.entries, **new}
                self.entries = merged
                write_atomic(self.path, {"format": FORMAT, "version": VERSION, "kind": "cache",
                                         "validators": self.validators, "entries": merged})
                self.status = "ok"
        except OSError as exc:
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
    entries, status = read_file(path, "table", None, "shipped tuning table")
    provenance, capability = {}, None
    if status == "ok":
        data = json.loads(path.read_text(encoding="utf-8"))
        provenance = data.get("provenance", {}) if isinstance(data.get("provenance"), dict) else {}
        capability = (data.get("validators") or {}).get("capability")
    return Table(name, entries, provenance, capability)


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
    from .. import dispatch

    dispatch.clear_memo()
