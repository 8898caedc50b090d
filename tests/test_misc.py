"""Edge cases and structural guarantees: empty batches, NaN confinement, import without
triton, backend selection, how many times each kernel sweep reads x."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tritonorm
from cases import make_inputs
from helpers import record_launches
from tritonorm import backend as backends
from tritonorm.kernels import launch


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


@pytest.mark.parametrize("shape,scope", [((0, 4, 3, 3), "batch"), ((0, 4, 3), "group"), ((2, 4, 0), "instance"), ((0, 8), "layer")])
def test_empty_input_returns_empty_and_keeps_running_stats(shape, scope):
    x = torch.randn(shape, requires_grad=True)
    kw = dict(num_groups=2) if scope == "group" else {}
    if scope == "batch":
        rm, rv = torch.randn(4), torch.rand(4)
        rm0, rv0 = rm.clone(), rv.clone()
        kw.update(running_mean=rm, running_var=rv)
    y = tritonorm.norm(x, scope, backend="triton", **kw)
    assert y.shape == x.shape and y.numel() == 0
    y.sum().backward()
    assert x.grad.shape == x.shape
    if scope == "batch":
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("regime", ["fused", "looped", "split"])
def test_nan_stays_inside_its_statistic(regime):
    x = torch.randn(3, 8, 4, 4)
    x[1, 2, 1, 1] = float("nan")  # sample 1, group 1 (channels 2-3) of 4 groups
    with tritonorm.dispatch.forced(regime, block_m=8, split=2):
        y = tritonorm.norm(x, "group", num_groups=4, backend="triton")
    bad = torch.isnan(y)
    assert bad[1, 2:4].all()
    bad[1, 2:4] = False
    assert not bad.any(), "NaN leaked into other statistics"


def test_import_and_reference_path_without_triton(tmp_path):
    # A process where `import triton` fails: tritonorm imports, runs the reference, and says
    # plainly why backend="triton" cannot run.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, tritonorm\n"
        "x = torch.randn(2, 4, 3)\n"
        "y = tritonorm.norm(x, 'group', num_groups=2)\n"
        "ref = torch.nn.functional.group_norm(x, 2)\n"
        "assert torch.allclose(y, ref, atol=1e-5), 'reference path wrong'\n"
        "assert not tritonorm.triton_available()\n"
        "try:\n"
        "    tritonorm.norm(x, 'group', num_groups=2, backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'triton' in str(e); print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve("auto", cpu, torch.float32) == "triton"
    assert backends.resolve("auto", cpu, torch.float64) == "reference"
    assert backends.resolve("reference", cpu, torch.float32) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.resolve("auto", cpu, torch.float32) == "reference"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backends.resolve("triton", cpu, torch.float32)
    monkeypatch.setenv("TRITONORM_BACKEND", "reference")
    assert backends.resolve(None, cpu, torch.float32) == "reference"


def test_float64_runs_on_the_reference_and_is_differentiable():
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: tritonorm.norm(x, "group", num_groups=2, weight=w,
                                                                activation="silu"), (x, w))


class _Counter:
    """Records every kernel launch (at the JIT function's ``run``, which both the interpreter's and
    the compiled launcher go through) and how many sweeps over x they make."""

    READS_X = {"_fwd_fused_kernel", "_fwd_looped_kernel", "_fwd_partial_kernel", "_fwd_apply_kernel",
               "_bwd_fused_kernel", "_bwd_sums_kernel", "_bwd_col_sums_kernel", "_bwd_apply_kernel",
               "_dwdb_kernel"}
    # Sweeps over x inside one kernel (the looped kernel sweeps twice).
    SWEEPS = {"_fwd_looped_kernel": 2}

    def __init__(self, monkeypatch):
        self.runs = record_launches(monkeypatch)

    def x_sweeps(self):
        return sum(self.SWEEPS.get(n, 1) for n in self.runs if n in self.READS_X)


# (launches, sweeps over x) of the backward per scope and regime, with weight, bias, residual and
# an activation. BatchNorm's dweight/dbias come from the dx kernels' row sums; the positional
# scope's (each column a channel) from per-program sums of the fused kernel plus a tiny finish
# (looped/split: of the first stage's per-column sums, added by the apply kernel's programs: x
# read twice, as for dx alone); GroupNorm's from per-(sample, channel) partials of the dx pass,
# added by a finish (fused) or by the apply kernel.
BWD = {"group": {"fused": (2, 1), "looped": (2, 2), "split": (2, 2)},
       "batch": {"fused": (1, 1), "looped": (2, 2), "split": (2, 2)},
       "positional": {"fused": (2, 1), "looped": (2, 2), "split": (2, 2)}}


@pytest.mark.parametrize("scope", ["group", "batch", "positional"])
@pytest.mark.parametrize("regime", ["fused", "looped", "split"])
def test_launches_and_sweeps_over_x(regime, scope, monkeypatch):
    counter = _Counter(monkeypatch)
    x, w, b, r, dy = make_inputs((2, 4, 4, 4), torch.float32, residual=True)
    x.requires_grad_(); w.requires_grad_(); b.requires_grad_()
    groups = 2 if scope == "group" else None
    with tritonorm.dispatch.forced(regime, block_m=16, split=2):
        y = tritonorm.norm(x, scope, num_groups=groups, weight=w, bias=b, residual=r, activation="silu",
                           backend="triton")
        # Forward: one launch for the row regimes, two for split (partials, then merge + apply).
        assert len(counter.runs) == {"fused": 1, "looped": 1, "split": 2}[regime], counter.runs
        assert counter.x_sweeps() == {"fused": 1, "looped": 2, "split": 2}[regime], counter.runs
        counter.runs.clear()
        torch.autograd.grad(y, [x, w, b], dy)
    assert (len(counter.runs), counter.x_sweeps()) == BWD[scope][regime], counter.runs
