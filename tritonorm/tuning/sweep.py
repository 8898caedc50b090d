"""Sweeps: measure candidate plans for the suite shapes on a GPU and keep the fastest.

One *task* is a (problem key, case, dtype, op): cases whose problems share a cache key (same
op, scope, dtype, layout, flags and P/M buckets) are tuned once. Each candidate plan runs under
``dispatch.forced(kernel, op=op, **config)`` and is timed by CUDA-graph replay over rotating input
sets (``bench.timing.time_fns``: device time, median of the replays). The winner goes into the user's tuning cache
(``tritonorm tune``) or into a table file (``tuning/build_tables.py``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

from .. import activations, dispatch
from ..explain import _view
from ..kernels.layout import channel_view, stat_view
from ..validation import check_norm_args
from . import suites

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("forward", "backward")


@dataclass(frozen=True)
class Task:
    key: str
    case: suites.Case
    dtype: str           # a key of DTYPES
    op: str              # "forward" or "backward"
    problem: dispatch.Problem
    heuristic: dispatch.Plan


def _kwargs_meta(case: suites.Case, dtype) -> dict:
    c = case.shape[1]
    kw = dict(num_groups=case.num_groups, center=case.center, activation=case.activation)
    if case.affine:
        kw["weight"] = torch.empty(c, dtype=dtype, device="meta")
        if case.center:
            kw["bias"] = torch.empty(c, dtype=dtype, device="meta")
    return kw


def problem_of(case: suites.Case, dtype: str, op: str) -> dispatch.Problem:
    """The dispatch problem of a case, built exactly as explain and the launchers build it."""
    x = suites.meta_input(case, DTYPES[dtype])
    kw = _kwargs_meta(case, DTYPES[dtype])
    spec, act = check_norm_args(x, case.scope, kw["num_groups"], kw.get("weight"), kw.get("bias"), 1e-5,
                                case.center, case.activation, None, None, None, 0.1, True,
                                case.sample_groups)
    view = _view(x, spec, channel_view if op == "dwdb" else stat_view)
    flags = dispatch.flags_key("weight" in kw, "bias" in kw, False, activations.code(act), case.center)
    return dispatch.problem_from_view(op, view, x.element_size(), spec=spec,
                                      dtype=str(x.dtype).replace("torch.", ""), flags=flags)


def tasks(suite_names, dtypes, ops, profile: dispatch.DeviceProfile) -> list[Task]:
    out, seen = [], set()
    for name in suite_names:
        for case in suites.cases(name):
            for dt in dtypes:
                for op in ops:
                    problem = problem_of(case, dt, op)
                    key = problem.key()
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append(Task(key, case, dt, op, problem, heuristic(case, dt, op, problem, profile)))
    return out


def heuristic(case: suites.Case, dtype: str, op: str, problem: dispatch.Problem,
              profile: dispatch.DeviceProfile) -> dispatch.Plan:
    """The plan the launcher runs for the case with nothing tuned: ``dispatch.choose``'s, or for
    a backward of rows past the fused limit the WIDE plan where the case's gradients suit it
    (launch.wide_suits; asked of explain, which takes the launcher's decision, by forcing it)."""
    plan = dispatch.choose(problem, profile)
    wide = dispatch.maybe_wide(plan, problem, profile) if op == "backward" else plan
    if "wide" not in wide.config:
        return plan
    from ..explain import explain

    dt = DTYPES[dtype]
    with dispatch.forced("fused", op="backward", wide=wide.config["wide"]):
        seen = explain(suites.meta_input(case, dt), case.scope, device=profile, op="backward",
                       sample_groups=case.sample_groups, **_kwargs_meta(case, dt))
    return wide if "wide" in seen.config else plan


def _pow2s(lo: int, hi: int):
    v = lo
    while v <= hi:
        yield v
        v *= 2


def candidates(problem: dispatch.Problem, profile: dispatch.DeviceProfile,
               heuristic: dispatch.Plan | None = None) -> list[dispatch.Plan]:
    """Plans worth measuring: the heuristic's (``heuristic``: the task's, as the launcher takes it;
    default ``dispatch.choose``'s), its neighbours in each regime, and torch native. Where the
    heuristic is the WIDE backward (a case whose gradients suit it), WIDE with 2 and 4 column
    tiles, each sweeping the rows a tile or half a tile at a time."""
    P, M = problem.P, problem.M
    block_m_full = dispatch._pow2(M)
    out = [heuristic or dispatch.choose(problem, profile)]
    if "wide" in out[0].config:
        for tiles in (2, 4):
            base = dispatch.wide_plan(problem, profile, tiles)
            if base is None or base.config["wide"] != tiles:
                continue
            for block_a in (base.config["block_m"], base.config["block_m"] // 2):
                out.append(dispatch.Plan("fused", dispatch.wide_plan(problem, profile, tiles, block_a).config, "sweep"))
    if block_m_full <= 32768:
        for bp in _pow2s(1, min(dispatch._pow2(P), 64)):
            if bp * block_m_full > 32768:
                break
            for nw in (4, 8, 16):
                out.append(dispatch.Plan("fused", {"block_p": bp, "block_m": block_m_full, "num_warps": nw}, "sweep"))
    if problem.rows_unit_stride:
        # Statistics along the contiguous axis (channels_last BatchNorm): each column holds only
        # BLOCK_P contiguous values, so tiles are wide, on 8 warps (the H200 sweep in
        # benchmarks/results/h200/NOTES.md: 16-64 x 1024 best, one row a program 10x slower,
        # 16 warps at 64 x 2048 4x slower); splits in powers of four.
        for bp in (8, 16, 32, 64):
            if bp > 2 * dispatch._pow2(P):
                continue
            for bm in (512, 1024, 2048):
                if bp * bm > 65536 or bm > 2 * block_m_full:
                    continue
                cfg = {"block_p": bp, "block_m": bm, "num_warps": 8}
                out.append(dispatch.Plan("looped", {**cfg, "split": 1}, "sweep"))
                tiles = -(-M // bm)
                for split in (4, 16, 64, 256):
                    if split <= min(dispatch.MAX_SPLIT, tiles):
                        out.append(dispatch.Plan("split", {**cfg, "split": split}, "sweep"))
    row_blocks = () if problem.rows_unit_stride else (1, 8, 32) if 1 < problem.col_run < 32 else (1,)
    for bp in row_blocks:
        if bp > dispatch._pow2(P):
            continue
        for bm in (1024, 2048, 4096, 8192):
            if bp * bm > 32768 or bm > 2 * block_m_full:
                continue
            nw = max(4, min(16, (bp * bm) // 256))
            out.append(dispatch.Plan("looped", {"block_p": bp, "block_m": bm, "num_warps": nw, "split": 1}, "sweep"))
            tiles = -(-M // bm)
            for split in _pow2s(2, min(dispatch.MAX_SPLIT, tiles)):
                out.append(dispatch.Plan("split", {"block_p": bp, "block_m": bm, "num_warps": nw, "split": split}, "sweep"))
    out.append(dispatch.Plan(dispatch.NATIVE, {}, "sweep"))
    unique, seen = [], set()
    for plan in out:
        sig = (plan.kernel, tuple(sorted(plan.config.items())))
        if sig not in seen:
            seen.add(sig)
            unique.append(plan)
    return unique


def measure(task: Task, plan: dispatch.Plan, device) -> float:
    """Median device milliseconds of the task's op under ``plan`` (inf when the plan fails to
    run): CUDA-graph replay over rotating input sets (bench.timing.time_fns), so host overhead,
    which is the same for every candidate, does not hide the kernels' differences."""
    from ..bench import bytes_model, timing

    dtype = DTYPES[task.dtype]
    grad = task.op == "backward"
    x, kw = suites.make_inputs(task.case, dtype, device, requires_grad=grad, host_rng=True)
    nbytes = bytes_model.bytes_moved(task.case, x.element_size(), "fwd" if task.op == "forward" else "bwd")
    sets = [(x, kw)] + [suites.make_inputs(task.case, dtype, device, requires_grad=grad, host_rng=True)
                        for _ in range(timing.input_sets(nbytes) - 1)]
    try:
        with dispatch.forced(plan.kernel, op=task.op, **plan.config):
            fns = []
            for xi, kwi in sets:
                if task.op == "forward":
                    def fwd(xi=xi, kwi=kwi):
                        with torch.no_grad():
                            return suites.run(task.case, xi, kwi)
                    fns.append(fwd)
                    continue
                y = suites.run(task.case, xi, kwi)
                dy = torch.randn(y.shape).to(y)
                leaves = [t for t in (xi, kwi.get("weight"), kwi.get("bias"), kwi.get("add_residual"))
                          if t is not None]
                fns.append(lambda y=y, dy=dy, leaves=leaves: torch.autograd.grad(y, leaves, dy, retain_graph=True))
            t = timing.time_fns(fns, nbytes)
    except Exception:  # a candidate that does not compile or run (registers, shared memory)
        return float("inf")
    if t.method != "cudagraph":
        # Not capturable: its do_bench time includes the host, not comparable with the others.
        CAPTURE_FAILURES.append(f"{task.case.name} {task.dtype} {task.op} {plan.kernel} {plan.config}: {t.method}")
        return float("inf")
    return t.ms


def ranking(timed: list, n: int = 6) -> str:
    """'split 16x1024 s128 w8: 471.0; ...' for the ``n`` fastest (ms, plan) pairs, in us."""
    def name(plan):
        c = plan.config
        if plan.kernel == dispatch.NATIVE:
            return plan.kernel
        shape = "x".join(str(c[k]) for k in ("block_p", "block_m") if k in c)
        extra = "".join(f" {tag}{c[k]}" for k, tag in (("split", "s"), ("wide", "t"), ("block_a", "a"),
                                                       ("num_warps", "w")) if k in c)
        return f"{plan.kernel} {shape}{extra}"

    best = sorted((t for t in timed if t[0] != float("inf")), key=lambda t: t[0])[:n]
    return "; ".join(f"{name(p)}: {ms * 1000:.1f}" for ms, p in best)


# Candidates whose CUDA-graph capture failed in this process (printed by ``tritonorm tune``).
CAPTURE_FAILURES: list[str] = []


def tune(task_list: list[Task], profile: dispatch.DeviceProfile, device, progress=None,
         deadline: float | None = None) -> dict:
    """Measure every candidate of every task; returns {key: entry} of the winners. With
    ``deadline`` (a ``time.monotonic()`` value), the sweep stops there: the tasks whose every
    candidate was measured are kept, the one in progress is dropped (a winner among some of the
    candidates is not a tuned plan)."""
    import time

    def late() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    results = {}
    for task in task_list:
        if late():
            break
        best_plan, best_ms, heur_ms = None, float("inf"), float("inf")
        cut = False
        timed = []
        for plan in candidates(task.problem, profile, task.heuristic):
            if late():
                cut = True
                break
            ms = measure(task, plan, device)
            timed.append((ms, plan))
            if plan.reason.startswith("heuristic"):
                heur_ms = ms
            if ms < best_ms:
                best_plan, best_ms = plan, ms
        if cut:
            break
        if progress is not None:
            progress(task, best_plan, best_ms)
        if best_plan is None or best_ms == float("inf"):
            continue
        results[task.key] = {
            "kernel": best_plan.kernel, "config": dict(best_plan.config),
            "time_us": round(best_ms * 1000, 2),
            "heuristic_us": round(heur_ms * 1000, 2) if heur_ms != float("inf") else None,
            "case": f"{task.case.suite}: {task.case.name} {task.dtype}",
            # The fastest few, so a table shows how close the field was (and feeds the heuristic).
            "ranking": ranking(timed),
            "measured": datetime.date.today().isoformat(),
        }
    if deadline is not None and len(results) < len(task_list):
        print(f"time budget reached: {len(results)} of {len(task_list)} problems tuned", flush=True)
    return results
