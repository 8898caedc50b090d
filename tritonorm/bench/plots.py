"""PNG plots of the benchmark rows: GB/s against bytes moved, one figure per (op kind, mode)
with one panel per layout (NCHW and channels_last side by side, never overlapping), a colour
per provider, a line style per dtype, the copy bandwidth dashed, and the legend outside the
data. Skipped, with a note, when matplotlib is not importable."""

from __future__ import annotations

from pathlib import Path

PROVIDER_COLOURS = {"tritonorm": "tab:red", "eager": "tab:blue", "compile": "tab:green",
                    "apex": "tab:purple", "liger": "tab:orange"}
DTYPE_STYLES = {"fp32": ("-", "o"), "bf16": ("--", "s"), "fp16": (":", "^")}


def _layout(row) -> str:
    return "channels_last" if row.get("channels_last") else ("NCHW" if len(row["shape"]) > 2 else "rows")


def figure(sel: list[dict], copy_gbps: float | None, title: str):
    """One matplotlib figure for the rows of one (op kind, mode): a panel per layout."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    layouts = sorted({_layout(r) for r in sel}, key=["rows", "NCHW", "channels_last"].index)
    provs = [p for p in PROVIDER_COLOURS if any("gbps" in r["providers"].get(p, {}) for r in sel)]
    dtypes = [d for d in DTYPE_STYLES if any(r["dtype"] == d for r in sel)]
    fig, axes = plt.subplots(1, len(layouts), figsize=(5.5 * len(layouts) + 2.2, 4.5), sharey=True,
                             squeeze=False)
    for ax, layout in zip(axes[0], layouts):
        for prov in provs:
            for dt in dtypes:
                pts = sorted((r["bytes"], r["providers"][prov]["gbps"]) for r in sel
                             if r["dtype"] == dt and _layout(r) == layout
                             and "gbps" in r["providers"].get(prov, {}))
                if pts:
                    style, marker = DTYPE_STYLES[dt]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=PROVIDER_COLOURS[prov],
                            linestyle=style, marker=marker, markersize=4, linewidth=1.4)
        if copy_gbps:
            ax.axhline(copy_gbps, color="gray", linestyle="-.", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(layout)
        ax.set_xlabel("bytes moved (inputs read once, outputs written once)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GB/s")
    # One legend outside the panels: colour = provider, line style and marker = dtype.
    handles = [Line2D([], [], color=PROVIDER_COLOURS[p], linewidth=2, label=p) for p in provs]
    handles += [Line2D([], [], color="black", linestyle=DTYPE_STYLES[d][0], marker=DTYPE_STYLES[d][1],
                       label=d) for d in dtypes]
    if copy_gbps:
        handles.append(Line2D([], [], color="gray", linestyle="-.", label="D2D copy"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], copy_gbps: float | None, out_dir: Path, stem: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, mode in sorted({(r["kind"], r["mode"]) for r in rows}):
        sel = [r for r in rows if r["kind"] == kind and r["mode"] == mode]
        fig = figure(sel, copy_gbps, f"{kind} {mode}")
        path = out_dir / f"{stem}-{kind}-{mode.replace('+', '_')}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
