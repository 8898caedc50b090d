"""A pytest plugin for the GPU report's test stage: once the wall-clock deadline in
$TRITONORM_TEST_DEADLINE (seconds since the epoch) has passed, stop after the tests in flight,
so that pytest still writes its junit file and summary (a kill at the limit would lose both).
Works with and without pytest-xdist (under xdist the controller stops its workers)."""

from __future__ import annotations

import os
import time

_DEADLINE = float(os.environ.get("TRITONORM_TEST_DEADLINE", "0") or 0)


def pytest_runtest_logreport(report):
    if not _DEADLINE or time.time() < _DEADLINE:
        return
    config = getattr(report, "config", None) or _CONFIG[0]
    if config is None:
        return
    reason = "time budget of the GPU report's test stage reached"
    dsession = config.pluginmanager.getplugin("dsession")  # the xdist controller, when running -n
    if dsession is not None:
        if not dsession.shouldstop:
            dsession.shouldstop = reason
    elif _SESSION[0] is not None and not _SESSION[0].shouldstop:
        _SESSION[0].shouldstop = reason


_CONFIG = [None]
_SESSION = [None]


def pytest_configure(config):
    _CONFIG[0] = config


def pytest_sessionstart(session):
    _SESSION[0] = session


def pytest_collection_modifyitems(session, config, items):
    """$TRITONORM_TEST_ONLY (node ids, comma-separated; the dry run): the whole subset is
    collected (so every file and id in it is checked), then only these run. An id not
    collected is an error, not a silent skip."""
    only = [n for n in os.environ.get("TRITONORM_TEST_ONLY", "").split(",") if n]
    if not only:
        return
    import pytest

    def rel(item):
        return item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1] + "::" + item.nodeid.split("::", 1)[-1]

    wanted = {n.rsplit("/", 1)[-1] for n in only}
    keep = [it for it in items if rel(it) in wanted]
    missing = wanted - {rel(it) for it in keep}
    if missing:
        raise pytest.UsageError(f"TRITONORM_TEST_ONLY: not collected: {', '.join(sorted(missing))}")
    print(f"\ngpu_report: {len(items)} tests collected in the subset; running {len(keep)} of them (dry run)")
    config.hook.pytest_deselected(items=[it for it in items if it not in keep])
    items[:] = keep
