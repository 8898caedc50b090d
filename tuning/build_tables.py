"""Build a shipped table: tune every suite on this machine's GPU and write tritonorm/tables/<device>.json.

    python tuning/build_tables.py --device h100     # on an H100
    python tuning/build_tables.py --device h200     # on an H200

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
    args = p.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
