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
import contextlib, json, torch
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


KEYED = r'''
import contextlib, json, torch
from tritonorm.bench import host
import tritonorm
from tritonorm import dispatch
from tritonorm.kernels import fastlaunch, launch

assert fastlaunch._CHECK[0]
launch.ROOM_FRACTION = float("inf")  # the split partials in the statistics buffer too (launch.part_row)
used, pending = [], []
# Each direct launch names its kernel (ON_DIRECT_LAUNCH), then runs the compiled (stub) kernel:
# pair them, so a case's launches are (kernel, which compiled variant).
def run_stub(self, *args):
    if pending:
        used.append((pending.pop(), id(self)))
host._StubKernel.run = run_stub
out = {}
with host.stubbed() as rec:
    fastlaunch.ON_DIRECT_LAUNCH[0] = pending.append
    def run(x, w, b, r=None, scope="group", regime=None, **kw):
        xs = x.detach().requires_grad_()
        ps = [t.detach().requires_grad_() for t in (w, b)]
        ctx = dispatch.forced(regime, block_p=4, block_m=16, split=2) if regime else contextlib.nullcontext()
        with ctx:
            y = tritonorm.norm(xs, scope, weight=ps[0], bias=ps[1], residual=r, **kw)
            torch.autograd.grad(y, [xs] + ps, torch.ones_like(y))
    x = torch.randn(4, 8, 6, 6, dtype=torch.bfloat16)
    base = torch.randn(4 * 8 * 6 * 6 + 1, dtype=torch.bfloat16)
    xu = base[1:].view(4, 8, 6, 6)
    w16, b16 = torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)
    w32, b32 = w16.float(), b16.float()
    calls = {}
    for name, args, kw in [("gn split bf16 w", (x, w16, b16), dict(num_groups=2, regime="split", activation="silu")),
                           ("gn split fp32 w", (x, w32, b32), dict(num_groups=2, regime="split", activation="silu")),
                           ("gn split misaligned x", (xu, w16, b16), dict(num_groups=2, regime="split",
                                                                          activation="silu")),
                           ("bn split", (x, w32, b32), dict(scope="batch", regime="split")),
                           ("gn fused residual", (x, w16, b16), dict(num_groups=4, regime="fused",
                                                                     r=torch.randn(4, 8, 6, 6, dtype=torch.bfloat16)))]:
        for i in range(3):
            used.clear()
            run(*args, **kw)
        calls[name] = sorted(set(used))
    # channels_last GroupNorm with 10-channel groups (the whole-pixel kernels) and NCHW BatchNorm
    # on 7x7 planes (planes.py)
    xc = torch.randn(4, 40, 6, 6, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    wc, bc = torch.ones(40, dtype=torch.bfloat16), torch.zeros(40, dtype=torch.bfloat16)
    xp = torch.randn(2, 1024, 7, 7, dtype=torch.bfloat16)
    wp, bp = torch.ones(1024), torch.zeros(1024)
    for name, args, kw in [("gn pixels split", (xc, wc, bc), dict(num_groups=4, regime="split", activation="silu")),
                           ("gn pixels fp32 w", (xc, wc.float(), bc.float()), dict(num_groups=4, regime="split")),
                           ("bn planes", (xp, wp, bp), dict(scope="batch"))]:
        for i in range(3):
            used.clear()
            run(*args, **kw)
        calls[name] = sorted(set(used))
    # layer norm rows, plain
    xl = torch.randn(16, 64, dtype=torch.bfloat16)
    for i in range(3):
        used.clear()
        run(xl, torch.ones(64, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16), scope="layer")
    calls["ln"] = sorted(set(used))
    out["calls"] = calls
    import gc
    out["keyed_entries"] = sum(len(o.by_call) for o in gc.get_objects() if isinstance(o, fastlaunch.Launcher))
    out["room_launchers"] = sum(1 for o in gc.get_objects()
                                if isinstance(o, fastlaunch.Launcher) and o.constexprs.get("PART_ROW") and o.by_call)
print("RESULT " + json.dumps(out))
'''


def test_keyed_launches_pick_the_kernel_the_full_key_picks():
    # With TRITONORM_FAST_LAUNCH_CHECK=1 every keyed launch recomputes the full key and raises
    # if its call key picked another kernel: weight dtypes, an unaligned x, lean statistics, the
    # room in the statistics buffer and a residual all on the same plans.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    env["TRITONORM_FAST_LAUNCH_CHECK"] = "1"
    proc = subprocess.run([sys.executable, "-c", KEYED], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    calls = out["calls"]
    # Each case launched directly on its last call (the keyed path), every kernel of it.
    for name, used in calls.items():
        assert len(used) >= 2, (name, used)
    # Another weight dtype or an unaligned x is another compiled kernel for the same launcher.
    base = dict(calls["gn split bf16 w"])
    for other in ("gn split fp32 w", "gn split misaligned x"):
        diff = dict(calls[other])
        assert any(diff.get(k) != v for k, v in base.items()), (other, calls)
    assert out["keyed_entries"] >= 3 and out["room_launchers"] >= 4, out
    assert any(n.startswith("_pixels_bwd") for n, _ in calls["gn pixels split"]), calls
    assert any(n.startswith("_planes") for n, _ in calls["bn planes"]), calls
