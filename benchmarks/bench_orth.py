"""Benchmark ``tritonorm.orthogonalize`` (ONI Newton-Schulz) against eager PyTorch and torch.compile.

    python benchmarks/bench_orth.py [--quick] [--out benchmarks/results/orth-<gpu>-<date>.json]

Ops timed, per shape (G groups of n rows of length d, T Newton steps, fp32):
  newton         S_N (G, n, n) → B_T: the part the fused kernel replaces (~3T launches in eager)
  orthogonalize  weight (G·n, d) → W, end to end (centring, Gram matmul, Newton, the per-group
                 divergence check and fallback selection on the device, B_T·Zc; no host read)
Providers: ``tritonorm`` (our path: fused kernel for n <= MAX_FUSED_ROWS, batched matmuls above),
``fused`` (the kernel forced at n > MAX_FUSED_ROWS, to re-check that threshold), ``eager`` (the
reference in ``tritonorm.orth.reference``, batched eager matmuls as the ONI code does), and
``compile`` (torch.compile of that reference).
FLOP model (one line, what TFLOP/s divides): newton fwd 6·T·n³ per group; orthogonalize fwd
4·n²·d + 6·T·n³ per group; fwd+bwd counted as 3× fwd (each matmul's backward is two matmuls).

Without a GPU the script runs a tiny shape in Triton's interpreter, checks it against float64 and
says that the timings need a GPU; it never reports interpreter times as performance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: set it first

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tritonorm.orth import ops, orthogonalize, reference  # noqa: E402

GROUPS = (64, 1024, 4096)
# Group size → row length d = in·kh·kw of a real 3×3 conv where such groups occur (ResNet stages).
ROW_LENGTH = {16: 3 * 3 * 64, 32: 3 * 3 * 128, 64: 3 * 3 * 256, 128: 3 * 3 * 512}
ITERS = 5
EPS = 1e-5
MAX_ELEMS = 1 << 28  # weights above 1 GiB of fp32 are skipped (their grads and temporaries too big)


def flops(op: str, g: int, n: int, d: int, mode: str) -> float:
    fwd = g * 6 * ITERS * n**3 + (g * 4 * n * n * d if op == "orthogonalize" else 0)
    return fwd * (3 if mode == "fwd+bwd" else 1)


def make_inputs(op: str, g: int, n: int, d: int, device) -> torch.Tensor:
    w = torch.randn(g * n, d, device=device)
    if op == "orthogonalize":
        return w
    z = w.reshape(g, n, d)
    zc = z - z.mean(-1, keepdim=True)
    s = reference.gram(zc, EPS)
    return (s / torch.linalg.matrix_norm(s)[:, None, None]).contiguous()


def providers(op: str, n: int) -> dict:
    """name → function of the input tensor (a fresh closure per shape keeps compile caches apart)."""
    if op == "newton":
        eager = lambda sn: reference.newton_iterate(sn, ITERS)  # noqa: E731
        out = {"tritonorm": lambda sn: ops.newton_isqrt(sn, ITERS, use_triton=True)[0], "eager": eager}
        if n > ops.MAX_FUSED_ROWS:
            out["fused"] = lambda sn: ops._newton_fwd_op(sn, ITERS, torch.is_grad_enabled()
                                                        and sn.requires_grad)[0]
    else:
        eager = lambda w: reference.orthogonalize(w, "newton_schulz", n, ITERS, EPS)  # noqa: E731
        out = {"tritonorm": lambda w: orthogonalize(w, group_size=n, iters=ITERS, eps=EPS), "eager": eager}
    if torch.cuda.is_available():
        out["compile"] = torch.compile(eager)
    return out


def timed(fn, x: torch.Tensor, mode: str) -> tuple[float, float, float]:
    """(median, p20, p80) ms on CUDA via triton.testing.do_bench (L2 flushed between runs)."""
    from triton.testing import do_bench

    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(x)
        grads = None
    else:
        x.requires_grad_(True)
        dy = torch.randn_like(fn(x))

        def run():
            fn(x).backward(dy)
        grads = [x]
    return tuple(do_bench(run, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads))


def cases(quick: bool):
    groups = (64, 1024) if quick else GROUPS
    rows = (16, 64) if quick else tuple(ROW_LENGTH)
    for op in ("newton", "orthogonalize"):
        for mode in ("fwd", "fwd+bwd"):
            for g in groups:
                for n in rows:
                    d = ROW_LENGTH[n]
                    if g * n * d <= MAX_ELEMS:
                        yield op, mode, g, n, d


def provenance() -> dict:
    import triton

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (Triton interpreter)"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "iters": ITERS, "dtype": "fp32",
            "max_fused_rows": ops.MAX_FUSED_ROWS,
            "flop_model": "newton fwd 6*T*n^3/group; orthogonalize fwd 4*n^2*d + 6*T*n^3/group; fwd+bwd = 3x fwd"}


def run_gpu(quick: bool) -> list[dict]:
    rows = []
    for op, mode, g, n, d in cases(quick):
        x = make_inputs(op, g, n, d, "cuda")
        row = {"op": op, "mode": mode, "groups": g, "rows": n, "row_length": d,
               "path": "fused" if n <= ops.MAX_FUSED_ROWS else "bmm", "providers": {}}
        for name, fn in providers(op, n).items():
            try:
                med, p20, p80 = timed(fn, x.detach().clone(), mode)
                row["providers"][name] = {"ms": med, "p20": p20, "p80": p80,
                                          "tflops": flops(op, g, n, d, mode) / (med * 1e-3) / 1e12}
            except Exception as exc:  # e.g. the forced fused kernel out of resources at n = 128
                row["providers"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        ours = row["providers"]["tritonorm"].get("ms")
        for base in ("eager", "compile"):
            ms = row["providers"].get(base, {}).get("ms")
            row[f"speedup_{base}"] = ms / ours if ms and ours else None
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    cells = []
    for name, p in row["providers"].items():
        cells.append(f"{name} {p['ms']:.3f} ms {p['tflops']:.2f} TF/s" if "ms" in p else f"{name} ERROR")
    sp = " ".join(f"x{row[k]:.2f} vs {k[8:]}" for k in ("speedup_eager", "speedup_compile") if row.get(k))
    return (f"{row['op']:13s} {row['mode']:7s} G={row['groups']:<5d} n={row['rows']:<4d} d={row['row_length']:<5d} "
            f"[{row['path']}] " + " | ".join(cells) + f"  {sp}")


def run_cpu() -> list[dict]:
    """Interpreter smoke run: correctness of every provider on a tiny shape, no performance claim."""
    rows = []
    g, n, d = 2, 16, 48
    for op in ("newton", "orthogonalize"):
        x = make_inputs(op, g, n, d, "cpu")
        ref = (reference.newton_iterate(x.double(), ITERS) if op == "newton"
               else reference.orthogonalize(x.double(), "newton_schulz", n, ITERS, EPS))
        row = {"op": op, "mode": "fwd", "groups": g, "rows": n, "row_length": d, "providers": {}}
        for name, fn in providers(op, n).items():
            start = time.perf_counter()
            out = fn(x)
            row["providers"][name] = {"max_abs_err_vs_float64": (out.double() - ref).abs().max().item(),
                                      "interpreter_seconds": time.perf_counter() - start}
        rows.append(row)
        print(f"{op:13s} G={g} n={n} d={d}: " + ", ".join(
            f"{k} err {v['max_abs_err_vs_float64']:.2e}" for k, v in row["providers"].items()))
    print("Timings need a GPU: no CUDA device here, so the kernels ran in Triton's interpreter and "
          "no performance is reported.")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset of shapes (G in 64/1024, n in 16/64)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default on a GPU: benchmarks/results/orth-<gpu>-<date>.json)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    rows = run_gpu(args.quick) if on_gpu else run_cpu()
    result = {"provenance": provenance(), "timings_meaningful": on_gpu, "rows": rows}
    out = args.out
    if out is None and on_gpu:
        slug = re.sub(r"[^a-z0-9]+", "-", result["provenance"]["gpu"].lower()).strip("-")
        out = ROOT / "benchmarks" / "results" / f"orth-{slug}-{datetime.date.today().isoformat()}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
