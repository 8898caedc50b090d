"""PNG plots of the benchmark rows: GB/s against bytes moved, one figure per (op kind, mode),
one line per provider and dtype. Skipped, with a note, when matplotlib is not importable."""

from __future__ import annotations

from pathlib import Path


def plot(rows: list[dict], copy_gbps: float | None, out_dir: Path, stem: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed")
        return []
    written = []
    kinds = sorted({(r["kind"], r["mode"]) for r in rows})
    for kind, mode in kinds:
        sel = [r for r in rows if r["kind"] == kind and r["mode"] == mode]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for prov in sorted({p for r in sel for p in r["providers"]}):
            for dt in sorted({r["dtype"] for r in sel}):
                pts = sorted((r["bytes"], r["providers"][prov]["gbps"]) for r in sel
                             if r["dtype"] == dt and prov in r["providers"])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{prov} {dt}")
        if copy_gbps:
            ax.axhline(copy_gbps, color="gray", linestyle="--", label="D2D copy")
        ax.set_xscale("log")
        ax.set_xlabel("bytes moved (each input read once, each output written once)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{kind} {mode}")
        ax.legend(fontsize=7)
        path = out_dir / f"{stem}-{kind}-{mode.replace('+', '_')}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
