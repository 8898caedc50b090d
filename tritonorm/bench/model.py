"""``tritonorm bench --model``: the cost model of every suite case, forward and backward, on a
GPU profile: regime, launches, bytes moved against the ideal (each input read once, each output
written once) and the predicted time (tritonorm/cost.py via ``explain(...).cost``).

Nothing runs: the cases are planned on meta tensors, so this works on any machine. It is a
model, not a measurement; the GPU run (tritonorm.gpu_report) prints the same prediction beside
each measured time, which is how the model is checked.
"""

from __future__ import annotations

# The targets for the bytes moved against the ideal (#10): forward and backward.
TARGET = {"forward": 1.1, "backward": 1.3}


def report(case, dtype, profile: str = "h200") -> dict:
    """One row: the plan and cost of the case's forward and backward on ``profile``."""
    import tritonorm
    from tritonorm.tuning.suites import make_inputs, meta_input

    x = meta_input(case, dtype)
    _, kw = make_inputs(case, dtype, "meta")
    row = {"suite": case.suite, "case": case.name, "dtype": str(dtype).replace("torch.", ""), "profile": profile}
    for op in ("forward", "backward"):
        plan = tritonorm.explain(x, case.scope, op=op, device=profile, **kw)
        cost = plan.cost
        row[op] = {"kernel": plan.kernel, "launches": cost.launches, "bytes": cost.bytes, "ideal": cost.ideal,
                   "ratio": cost.bytes / max(1, cost.ideal), "us": cost.predicted_us,
                   "read": cost.bytes_read, "written": cost.bytes_written, "ideal_read": cost.ideal_read,
                   "ideal_written": cost.ideal_written}
    return row


def summary(rows: list) -> str:
    """How many rows meet each target, and the worst ratio of those that do not."""
    lines = []
    for op, target in TARGET.items():
        ratios = [r[op]["ratio"] for r in rows]
        over = [r for r in rows if r[op]["ratio"] > target]
        line = f"{op}: {len(rows) - len(over)} of {len(rows)} within {target}x the ideal bytes"
        if over:
            worst = max(over, key=lambda r: r[op]["ratio"])
            line += (f"; over: {len(over)} (worst {worst[op]['ratio']:.2f}x, {worst['case']} "
                     f"{worst['dtype']}, {worst[op]['kernel']})")
        lines.append(line + f"; range {min(ratios):.2f}-{max(ratios):.2f}x")
    return "\n".join(lines)
