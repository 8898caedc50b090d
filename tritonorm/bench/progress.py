"""A progress bar for long runs (bench, tune): tqdm on stderr, only when stderr is a terminal
and the caller did not ask for quiet; otherwise None, and the caller prints nothing extra."""

from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar, or None (disabled, stderr not a terminal, or tqdm not installed: it is the
    optional ``bench`` extra)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
