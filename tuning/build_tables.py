"""Build a shipped table: tune every suite on this machine's GPU and write tritonorm/tables/<device>.json.

    python tuning/build_tables.py --device h100     # on an H100
    python tuning/build_tables.py --device h200     # on an H200
    python tuning/build_tables.py --device h200 --merge A.json [B.json ...]   # any machine

``--merge`` ships tables a GPU run already wrote (the GPU report's ``h200.json``, a follow-up
``tritonorm tune --output``): their entries go into tritonorm/tables/<device>.json (later files
win on a key, entries already there are kept unless replaced), each file checked as the
dispatcher checks a table (format, validators of that GPU, malformed entries refused), the
provenance listing every source; no GPU needed.

tritonorm must be importable from this checkout (``make venv`` installs it editable; otherwise
``PYTHONPATH=.``): the script refuses to tune another copy of the code than the one it writes into.

The sweeps themselves live in tritonorm/tuning/sweep.py (so that `tritonorm tune` runs the same
code on a user's GPU); this script runs all suites, all dtypes, forward and backward, and writes
the table with its provenance (GPU, versions, date, command). Without a GPU it exits with a note.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", required=True, choices=("h100", "h200"), help="which table to write")
    p.add_argument("--suite", default="all", choices=("resnet50", "sd-unet", "llm", "nnunet", "all"))
    p.add_argument("--limit", type=int, default=None, help="tune only the first N problems (trial runs)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="TABLE",
                   help="merge these measured table files into the shipped table instead of tuning")
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)  # tests: another target
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.device, args.merge, args.out or ROOT / "tritonorm" / "tables" / f"{args.device}.json")

    import torch

    if not torch.cuda.is_available():
        print("build_tables: no CUDA GPU is visible; tables are measured on the GPU they are for. Nothing written.")
        return 0
    name = torch.cuda.get_device_name().lower()
    if args.device not in name:
        print(f"build_tables: this GPU is {torch.cuda.get_device_name()!r}, not an {args.device}; refusing "
              f"to write {args.device}.json from it.")
        return 1
    import tritonorm
    from tritonorm import cli

    if Path(tritonorm.__file__).resolve().parent != ROOT / "tritonorm":
        print(f"build_tables: tritonorm is imported from {Path(tritonorm.__file__).parent}, not from this "
              f"checkout ({ROOT}); install it editable (`make venv`) or set PYTHONPATH={ROOT}.")
        return 1

    out = ROOT / "tritonorm" / "tables" / f"{args.device}.json"
    cmd = ["tune", "--suite", args.suite, "--output", str(out)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    return cli.main(cmd)


def merge(device: str, sources: list, out: Path) -> int:
    import datetime
    import json

    sys.path.insert(0, str(ROOT))
    from tritonorm import dispatch
    from tritonorm.tuning import cache

    profile = dispatch.profile_named(device)
    expect = {"gpu": profile.gpu_name, "capability": f"{profile.capability[0]}.{profile.capability[1]}"}
    docs = []
    for src in sources:
        try:
            data = json.loads(Path(src).read_text())
        except (OSError, ValueError) as exc:
            print(f"build_tables: cannot read {src}: {exc}")
            return 1
        doc = cache.TuningFile.parse(data, "table")
        if isinstance(doc, str):
            print(f"build_tables: {src} is not a tuning table: {doc}")
            return 1
        if doc.validators != expect:
            print(f"build_tables: {src} was measured on {doc.validators}, not {expect}; refusing to ship it "
                  f"as {device}.json")
            return 1
        if doc.dropped:
            print(f"build_tables: {src}: {doc.dropped} malformed entries left out")
        docs.append((src, doc))
    current = cache.TuningFile.parse(json.loads(out.read_text()), "table") if out.exists() else None
    entries = dict(current.entries) if not isinstance(current, (str, type(None))) else {}
    before = len(entries)
    for _, doc in docs:
        entries.update(doc.entries)
    sources_prov = [{"file": str(src), "entries": len(doc.entries), **{k: v for k, v in doc.provenance.items()
                                                                          if isinstance(v, (str, int, float))}}
                    for src, doc in docs]
    prov = {"command": "python tuning/build_tables.py --device " + device + " --merge "
                       + " ".join(str(s) for s in sources),
            "date": datetime.date.today().isoformat(), "status": "tuned" if entries else "not yet tuned",
            "note": f"{len(entries)} problems measured on an {profile.gpu_name}; every other problem takes the "
                    "heuristic (docs/dispatch.md)",
            "sources": json.dumps(sources_prov)}
    table = cache.TuningFile("table", expect, entries, prov)
    cache.write_atomic(out, table.to_json())
    print(f"build_tables: {out}: {len(entries)} entries ({len(entries) - before} new or replaced from "
          f"{len(docs)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
