"""Direct launches (kernels/fastlaunch.py) against the real Triton launcher code.

Run in a fresh process with Triton in compiled mode and the GPU launch stubbed (the host
benchmark's stand-in driver): the first call of a plan goes through ``JITFunction.run``, which
"compiles" (the stub) and binds; later calls must launch directly with exactly the argument list
Triton's binder produced, and fall back to ``run`` when told to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r'''
import json, torch
from tritonorm.bench import host
import tritonorm
from tritonorm.kernels import fastlaunch, launch

out = {}
with host.stubbed() as rec:
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    w = torch.ones(8, requires_grad=True); b = torch.zeros(8, requires_grad=True)
    for i in range(3):
        rec.launches.clear()
        n_run = len(rec.compiles)
        y = tritonorm.norm(x, "group", num_groups=2, weight=w, bias=b, activation="silu")
        torch.autograd.grad(y, [x, w, b], torch.ones_like(y))
        out[f"launches_{i}"] = list(rec.launches)
    plans = list(launch._PLANS.values())
    fwd = plans[0]
    out["forward_usable"] = fwd.launch.usable
    out["forward_cached"] = len(fwd.launch.compiled)
    bwd = list(fwd._backward.values())[0]
    out["backward_usable"] = [step[0].usable for step in (bwd.dx, getattr(bwd, "sums", None), bwd.apply
                              if hasattr(bwd, "apply") else None) if step is not None] + [bwd.finish.usable]
    # A tensor off 16-byte alignment is another specialization: through run once (a compile),
    # then direct like the aligned one; the aligned calls still launch their own variant.
    base = torch.randn(4 * 8 * 6 * 6 + 1)
    xu = base[1:].view(4, 8, 6, 6)
    n_compiles = len(rec.compiles)
    for i in range(2):
        rec.launches.clear()
        tritonorm.norm(xu, "group", num_groups=2, weight=w.detach(), bias=b.detach(), activation="silu")
        out[f"unaligned_compiles_{i}"] = len(rec.compiles) - n_compiles
    out["forward_cached_after"] = len(fwd.launch.compiled)
    # Off: every launch goes through run (recorded there, not by the direct hook).
    direct = []
    fastlaunch.ON_DIRECT_LAUNCH[0] = direct.append
    with fastlaunch.enabled(False):
        rec.launches.clear()
        tritonorm.norm(x.detach(), "group", num_groups=2, weight=w.detach(), bias=b.detach())
    out["direct_when_off"] = len(direct)
    out["launches_when_off"] = list(rec.launches)
print("RESULT " + json.dumps(out))
'''


def test_direct_launches_bind_like_triton_and_can_be_turned_off():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    # Same kernels every call (forward, backward dx, dweight/dbias), first through run, then direct.
    assert out["launches_0"] == out["launches_1"] == out["launches_2"], out
    assert len(out["launches_0"]) >= 2
    assert out["forward_usable"] and out["forward_cached"] == 1, out
    assert all(out["backward_usable"]), out
    assert out["unaligned_compiles_0"] >= 1 and out["unaligned_compiles_1"] == out["unaligned_compiles_0"], out
    assert out["forward_cached_after"] == 2, out
    assert out["direct_when_off"] == 0 and out["launches_when_off"], out
