"""``python -m tritonorm.aot``: the sm_90a compiled-quality check of every variant the
dispatcher picks for the benchmark suites (docs/compiled.md).

Records the launches of each suite case (forward and backward; bf16, fp16, fp32; NCHW and
channels_last) planned for an H200, compiles each distinct variant for sm_90a, and reports
registers, spill bytes and the access width on the unit-stride side. With ``--strict`` the exit
status is 1 when any variant spills, moves a bulk tensor in accesses narrower than 16 bytes,
or fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..cli import _csv
from ..tuning import suites
from . import compile as aot_compile
from . import report, variants as V


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tritonorm.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", type=_csv(("all",) + suites.SUITES), default=["all"],
                   help="suites to check, comma-separated (default: all)")
    p.add_argument("--dtypes", type=_csv(tuple(V.DTYPES)), default=list(V.DTYPES),
                   help="dtypes, comma-separated (default: bf16,fp16,fp32)")
    p.add_argument("--layouts", choices=("both", "suite"), default="both",
                   help="image cases in NCHW and channels_last (both), or as the suite lists them")
    p.add_argument("--profile", default="h200", help="device profile the dispatcher plans for")
    p.add_argument("--jobs", "-j", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="compile processes (default: CPU count, at most 4)")
    p.add_argument("--json", type=Path, default=None, help="write the full results to this file")
    p.add_argument("--cache", type=Path, default=None,
                   help="result cache directory (default: $TRITONORM_CACHE_DIR/sm90)")
    p.add_argument("--keep-ptx", type=Path, default=None, help="also write each variant's PTX here")
    p.add_argument("--findings", action="store_true",
                   help="list only the variants that spill, access narrowly or fail")
    p.add_argument("--recompiles", action="store_true",
                   help="also count variants per layer as the batch goes 1..64")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 on any spill, narrow access or compile failure")
    return p


def run(suite_names, dtypes, layouts="both", profile="h200", jobs=1, cache=None, keep_ptx=None):
    """(variants, results): record, deduplicate and compile."""
    launches = V.record_suites(tuple(suite_names), tuple(dtypes), layouts, profile)
    found = V.unique_variants(launches)
    results = aot_compile.compile_all([v.to_json() for v in found], jobs=jobs, cache=cache,
                                      keep_ptx=keep_ptx)
    return found, results, len(launches)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    why = aot_compile.ptxas_available()
    if why is not None:
        print(f"check-sm90: cannot run: {why}", file=sys.stderr)
        return 2
    names = list(suites.SUITES) if "all" in args.suite else args.suite
    found, results, n_launches = run(names, args.dtypes, args.layouts, args.profile, args.jobs,
                                     args.cache, args.keep_ptx)
    table = report.rows(found, results)
    summ = report.summary(table)
    print(report.format_table(table, only_findings=args.findings))
    print()
    print(f"{n_launches} launches recorded ({', '.join(names)}; {','.join(args.dtypes)}; "
          f"layouts: {args.layouts}; planned for {args.profile})")
    print(report.format_summary(summ))
    recompiles = None
    if args.recompiles:
        recompiles = {s: V.recompiles(s, profile=args.profile) for s in names if s in V.RECOMPILE_LAYERS}
        print()
        print(report.format_recompiles(recompiles))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summ, "variants": table, "recompiles": recompiles},
                                        indent=1, default=str))
    bad = summ["errors"] or summ["spilling"] or summ["narrow_access"]
    return 1 if args.strict and bad else 0
