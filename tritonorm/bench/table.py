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
