"""The benchmark suite without a GPU: a correctness-and-dispatch report, no timings.

Each suite shape is scaled down (same scope, groups, layout and flags) and run forward and
backward through Triton's interpreter, against the float64 reference and beside eager PyTorch
in the same dtype. It is also run in the regimes the h100 profile picks for the *full* shape,
with tiles small enough that a looped or split kernel really loops over several tiles; a row
says how many, so a one-tile "loop" is never passed off as a checked loop.
"""

from __future__ import annotations

import contextlib
import time

import torch

from . import providers, shapes
from .progress import progress_bar
from .table import format_table

HEADER = """\
tritonorm bench: no CUDA GPU here, so nothing is timed. Instead, a correctness-and-dispatch report:
every suite shape, scaled down, run forward and backward through Triton's interpreter.
  err y, err dx      max |out - float64 reference| / max |reference|, for y and for the worst
                     gradient (x, weight, bias); 'eager' = PyTorch's own ops, same dtype and data
  plan here          forward/backward regime chosen for the scaled shape on this machine
  plan h100          forward/backward regime the h100 profile picks for the full model shape
  err h100, tiles    worst error of y and gradients with the scaled shape forced into the h100
                     regimes, and the tiles per statistic that run (looped/split run >= 2)
Timings need a GPU: run `tritonorm bench` on a CUDA machine for the timed table, JSON and plots.
"""

COLUMNS = ("case", "scaled", "dtype", "err y", "eager", "err dx", "eager", "plan here", "plan h100",
           "err h100", "tiles")


def _leaves(x, kw):
    return [t for t in (x, kw.get("weight"), kw.get("bias"), kw.get("add_residual"))
            if t is not None and t.requires_grad]


def _err(a, ref) -> float:
    scale = max(ref.abs().max().item(), 1e-30)
    return (a.double() - ref).abs().max().item() / scale


def plans(case, x, kw, device) -> str:
    """'forward/backward' regimes ``explain`` gives for these inputs on ``device``."""
    from ..explain import explain

    ekw = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    f = explain(x.detach(), case.scope, device=device, **ekw).kernel
    b = explain(x.detach(), case.scope, device=device, op="backward", **ekw).kernel
    return f"{f}/{b}"


def _tile(case, dt: str, op: str) -> dict:
    """Launch parameters that make a forced looped/split regime iterate for real on a scaled
    shape: the largest power-of-two tile below M (so >= 2 tiles per statistic, the last one
    partial when M is not a power of two), and as many statistics per program as fit 4096
    elements (the interpreter's cost grows with the number of programs)."""
    from ..tuning.sweep import problem_of

    problem = problem_of(case, dt, op)
    m = problem.M
    block_m = 1
    while block_m * 2 < m:
        block_m *= 2
    block_p = 1
    while block_p * 2 <= min(problem.P, max(1, 4096 // block_m)):
        block_p *= 2
    return {"block_m": block_m, "block_p": block_p, "split": 2, "tiles": -(-m // block_m)}


def _run(small, dt, x, kw, dy, regimes):
    """y, the gradients, dy and the tiles per statistic, with the regimes forced when given."""
    from .. import dispatch

    fwd, bwd = regimes or (None, None)
    tiles = []

    def ctx(kernel, op):
        if kernel is None:
            return contextlib.nullcontext()
        cfg = {}
        if kernel in ("looped", "split"):
            cfg = _tile(small, dt, op)
            tiles.append(cfg.pop("tiles"))
        return dispatch.forced(kernel, op=op, **cfg)

    with ctx(fwd, "forward"):
        y = shapes.run(small, x, kw)
    dy = torch.randn_like(y) if dy is None else dy
    with ctx(bwd, "backward"):
        grads = torch.autograd.grad(y, _leaves(x, kw), dy)
    return y, grads, dy, min(tiles) if tiles else None


def check_case(small, dt: str, gpu_regimes: list[tuple] = ()) -> dict:
    """Run one scaled case forward+backward in the interpreter; errors against float64.

    ``gpu_regimes``: (forward, backward) regime pairs a GPU profile picks for the full shapes this
    case stands for; each is run too. Returns errors, the plan here, and per regime pair
    {"err": ..., "tiles": ...} under "regimes".
    """
    x, kw = shapes.make_inputs(small, shapes.DTYPES[dt], "cpu", requires_grad=True)
    leaves = _leaves(x, kw)
    y, grads, dy, _ = _run(small, dt, x, kw, None, None)
    x64 = x.detach().double().requires_grad_(True)
    kw64 = {k: (v.detach().double().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
            for k, v in kw.items()}
    y64 = shapes.run(small, x64, kw64, backend="reference")
    g64 = torch.autograd.grad(y64, _leaves(x64, kw64), dy.double())
    ye = providers.make("eager", small, x, kw)()
    ge = torch.autograd.grad(ye, leaves, dy)
    out = {"err_y": _err(y, y64), "err_grad": max(_err(a, b) for a, b in zip(grads, g64)),
           "eager_err_y": _err(ye, y64), "eager_err_grad": max(_err(a, b) for a, b in zip(ge, g64)),
           "plan_here": plans(small, x, kw, None), "regimes": {}}
    for pair in dict.fromkeys(gpu_regimes):
        yg, gg, _, tiles = _run(small, dt, x, kw, dy, pair)
        out["regimes"]["/".join(pair)] = {
            "err": max([_err(yg, y64)] + [_err(a, b) for a, b in zip(gg, g64)]), "tiles": tiles}
    return out


def _meta(full, dt):
    xm = shapes.meta_input(full, shapes.DTYPES[dt])
    mkw = {"num_groups": full.num_groups, "center": full.center, "activation": full.activation}
    if full.sample_groups > 1:
        mkw["sample_groups"] = full.sample_groups
    if full.affine:
        mkw["weight"] = torch.empty(full.shape[1], dtype=xm.dtype, device="meta")
        if full.center:
            mkw["bias"] = torch.empty(full.shape[1], dtype=xm.dtype, device="meta")
    return xm, mkw


def run_cpu(case_list, dtypes, progress: bool = True) -> list[dict]:
    """The correctness-and-dispatch report (interpreter; no timings). Returns its rows."""
    print(HEADER)
    groups = shapes.scaled_unique(case_list)
    bar = progress_bar(len(groups) * len(dtypes), "bench (interpreter)", "shape", progress)
    rows = []
    t0 = time.time()
    for small, fulls in groups:
        for dt in dtypes:
            h100s = [plans(full, *_meta(full, dt), "h100") for full in fulls]
            res = check_case(small, dt, [tuple(p.split("/")) for p in h100s])
            for full, h100 in zip(fulls, h100s):
                checked = res["regimes"][h100]
                rows.append({"case": full.name, "suite": full.suite, "shape": list(full.shape),
                             "scaled": list(small.shape), "dtype": dt, "plan_h100": h100,
                             "err_h100": checked["err"], "tiles_h100": checked["tiles"],
                             **{k: v for k, v in res.items() if k != "regimes"}})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    print(format_table(COLUMNS, [
        (r["case"], "x".join(map(str, r["scaled"])), r["dtype"], r["err_y"], r["eager_err_y"],
         r["err_grad"], r["eager_err_grad"], r["plan_here"], r["plan_h100"], r["err_h100"],
         r["tiles_h100"]) for r in rows]))
    elapsed = time.time() - t0
    print(f"\n{len(rows)} (shape, dtype) rows from {len(groups)} scaled shapes, checked in "
          f"{elapsed:.0f} s on the interpreter.")
    if rows:
        worst = max(rows, key=lambda r: r["err_y"] / max(r["eager_err_y"], 1e-7))
        print(f"largest error relative to eager's: {worst['case']} {worst['dtype']} "
              f"(ours {worst['err_y']:.1e}, eager {worst['eager_err_y']:.1e})")
    print("Timings need a GPU; none were measured here.")
    return rows
