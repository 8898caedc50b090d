"""Tables and the summary of an sm_90a check (see check.py for what is measured)."""

from __future__ import annotations

from .variants import Variant

# A streamed bulk tensor moved in pieces narrower than this is a "scalar access" finding.
WANT_BYTES = 16
_FLAGS = ("CENTER", "HAS_W", "HAS_B", "HAS_RES", "ACT", "CHAN", "INT64", "STORE_Y", "GIVEN",
          "WRITE_DRES", "ROW_CHANNEL", "COL_CHANNEL", "WIDE", "EV")


def spills(r: dict) -> int:
    return (r.get("spill_store_bytes") or 0) + (r.get("spill_load_bytes") or 0)


def narrow(r: dict) -> bool:
    """True when a streamed bulk tensor is loaded or stored with less than 16-byte accesses."""
    return any(r.get(k) is not None and r[k] < WANT_BYTES for k in ("load_bytes", "store_bytes"))


def config_text(v: Variant) -> str:
    c = v.constexprs()
    order = ("BLOCK_P", "BLOCK_M", "BLOCK_S")
    blocks = "x".join(str(c[k]) for k in sorted(c, key=lambda k: (order.index(k) if k in order else 9, k))
                      if k.startswith("BLOCK_"))
    w = v.launch.options.get("num_warps", "4")
    return f"{blocks} w{w}"


def flags_text(v: Variant) -> str:
    c = v.constexprs()
    return " ".join(f"{k}={int(c[k]) if isinstance(c[k], bool) else c[k]}" for k in _FLAGS if k in c)


def contexts_text(v: Variant) -> str:
    first = v.contexts[0]
    more = f" (+{len(v.contexts) - 1})" if len(v.contexts) > 1 else ""
    phase = first.get("phase", "")
    return f"{first.get('suite', '')}: {first.get('case', '')}{' ' + phase if phase else ''}{more}"


def rows(variants: list[Variant], results: list[dict]) -> list[dict]:
    out = []
    for v, r in zip(variants, results):
        ctx = v.contexts[0]
        out.append({
            "kernel": v.kernel, "case": contexts_text(v), "dtype": ctx.get("dtype", ""),
            "layout": ctx.get("layout", ""), "config": config_text(v), "flags": flags_text(v),
            "specialized": v.specialized(), "registers": r.get("registers"),
            "spill_bytes": spills(r) if "error" not in r else None,
            "load_bytes": r.get("load_bytes"), "store_bytes": r.get("store_bytes"),
            "tensors": r.get("tensors"), "error": r.get("error"), "contexts": v.contexts,
        })
    return out


def summary(table: list[dict]) -> dict:
    ok = [t for t in table if not t["error"]]
    return {
        "variants": len(table),
        "errors": len(table) - len(ok),
        "spilling": sum(1 for t in ok if t["spill_bytes"]),
        "max_spill_bytes": max((t["spill_bytes"] for t in ok), default=0),
        "narrow_access": sum(1 for t in ok if narrow(t)),
        "max_registers": max((t["registers"] or 0 for t in ok), default=0),
    }


def _w(b) -> str:
    return "-" if b is None else f"{b}B"


def format_table(table: list[dict], only_findings: bool = False) -> str:
    head = ("kernel", "case", "dtype", "layout", "config", "regs", "spill", "ld", "st")
    lines = []
    for t in table:
        if only_findings and not (t["error"] or t["spill_bytes"] or narrow(t)):
            continue
        if t["error"]:
            cells = (t["kernel"], t["case"], t["dtype"], t["layout"], t["config"], "ERR",
                     t["error"].splitlines()[0][:60], "", "")
        else:
            cells = (t["kernel"], t["case"], t["dtype"], t["layout"], t["config"], str(t["registers"]),
                     str(t["spill_bytes"]), _w(t["load_bytes"]), _w(t["store_bytes"]))
        lines.append(cells)
    widths = [max([len(h)] + [len(c[i]) for c in lines]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*c) for c in lines])


def format_summary(s: dict) -> str:
    return (f"{s['variants']} variants compiled for sm_90a: {s['spilling']} spill registers "
            f"(worst {s['max_spill_bytes']} B), {s['narrow_access']} move a bulk tensor in accesses "
            f"narrower than {WANT_BYTES} B, {s['errors']} failed to compile; "
            f"most registers per thread {s['max_registers']}")


def format_recompiles(rc: dict) -> str:
    lines = []
    for suite, r in rc.items():
        per = ", ".join(f"{k} {n}" for k, n in sorted(r["per_kernel"].items()))
        lines.append(f"{suite} ({r['layer']}, batch 1..64): {r['total']} variants in all; per kernel: {per}")
        for kernel, diffs in sorted(r["varying"].items()):
            if diffs:
                what = "; ".join(f"{a}: {' '.join(map(str, vals))}" for a, vals in diffs.items())
                lines.append(f"    {kernel} varies in {what}")
    return "\n".join(lines)
