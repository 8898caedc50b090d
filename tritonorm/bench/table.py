"""Plain-text tables whose columns are as wide as their widest cell (no fixed widths to
overflow): numbers right-aligned, text left-aligned."""

from __future__ import annotations


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.1e}"
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def format_table(headers, rows, indent: int = 0) -> str:
    """``headers``: column names; ``rows``: sequences of cells (str, int, float or None)."""
    text = [[_cell(v) for v in row] for row in rows]
    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    # A column of numbers (with placeholders for missing ones) is right-aligned.
    numeric = [any(num(row[i]) for row in rows) and all(num(row[i]) or row[i] in (None, "-", "error")
                                                        for row in rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]

    def line(cells):
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return " " * indent + "  ".join(out).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in text])


def combine_passes(passes: list[list[dict]], keys) -> list[dict]:
    """One row per case from several passes over the same cases (``python -m
    tritonorm.bench.host --repeat``): each of ``keys`` the median of the passes, every pass's
    figure in ``<key>_runs``. One pass: its rows as they are."""
    import statistics

    if len(passes) == 1:
        return passes[0]
    rows = []
    for same in zip(*passes):
        row = dict(same[0])
        for key in keys:
            if key in row:
                runs = [r[key] for r in same]
                row[key + "_runs"] = runs
                row[key] = statistics.median(runs)
        rows.append(row)
    return rows


def pass_cell(row: dict, key: str) -> str:
    """``row[key]`` for a table: "low-high (median)" over its passes, or the one figure."""
    if key not in row:
        return ""
    runs = row.get(key + "_runs")
    if not runs:
        return f"{row[key]:.1f}"
    return f"{min(runs):.1f}-{max(runs):.1f} ({row[key]:.1f})"
