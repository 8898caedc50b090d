"""SyncBatchNorm over two gloo processes on loopback, with uneven per-rank batches: outputs,
gradients and running statistics equal one BatchNorm over the global batch (float64 oracle)."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers import assert_close
from tritonorm import activations
from tritonorm.nn.sync_batchnorm import SyncBatchNorm

SPLIT = (3, 2)  # uneven per-rank batch sizes
C = 3
TIMEOUT_S = 120


def _worker(rank, world, data, out_dir):
    # gloo's pairs connect over the loopback interface; the rendezvous is a file, so no rank
    # owns a TCP store that the other could outlive.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        m = SyncBatchNorm(C, activation="silu")
        m.load_state_dict(data["state"])
        lo = sum(SPLIT[:rank])
        results = {}
        for step in range(2):
            x = data["x"][step][lo:lo + SPLIT[rank]].clone().requires_grad_(True)
            dy = data["dy"][step][lo:lo + SPLIT[rank]]
            m.zero_grad(set_to_none=True)
            y = m(x)
            y.backward(dy)
            results[step] = {"y": y.detach(), "dx": x.grad, "dw": m.weight.grad, "db": m.bias.grad}
        results["running_mean"] = m.running_mean.clone()
        results["running_var"] = m.running_var.clone()
        results["num_batches_tracked"] = m.num_batches_tracked.clone()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: a rank exiting mid-teardown aborts the other
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_global_batchnorm(tmp_path):
    n = sum(SPLIT)
    data = {"x": [torch.randn(n, C, 3, 2) * 2 + 1 for _ in range(2)],
            "dy": [torch.randn(n, C, 3, 2) for _ in range(2)]}
    ref = nn.BatchNorm2d(C).double()
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    data["state"] = {k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    ctx = mp.start_processes(_worker, args=(2, data, str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two gloo processes did not finish in {TIMEOUT_S} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for step in range(2):
        x64 = data["x"][step].double().requires_grad_(True)
        ref.zero_grad(set_to_none=True)
        y64 = activations.apply("silu", ref(x64))
        y64.backward(data["dy"][step].double())
        y = torch.cat([r[step]["y"] for r in ranks])
        dx = torch.cat([r[step]["dx"] for r in ranks])
        assert_close(y, y64, torch.float32, what=f"step {step} output")
        assert_close(dx, x64.grad, torch.float32, what=f"step {step} dx")
        # Each rank's weight gradient covers its own samples; their sum is the global one
        # (what DDP's gradient all-reduce adds up).
        assert_close(ranks[0][step]["dw"] + ranks[1][step]["dw"], ref.weight.grad, torch.float32, what="dweight")
        assert_close(ranks[0][step]["db"] + ranks[1][step]["db"], ref.bias.grad, torch.float32, what="dbias")
    for r in ranks:
        assert_close(r["running_mean"], ref.running_mean, torch.float32, what="running_mean")
        assert_close(r["running_var"], ref.running_var, torch.float32, what="running_var")
        assert int(r["num_batches_tracked"]) == 2


def test_without_process_group_is_batchnorm():
    assert not dist.is_initialized()
    m = SyncBatchNorm(C)
    ref = nn.BatchNorm2d(C).double()
    x = torch.randn(4, C, 2, 2)
    assert_close(m(x), ref(x.double()), torch.float32)
    assert_close(m.running_var, ref.running_var, torch.float32, what="running_var")
    m.eval(), ref.eval()
    assert_close(m(x), ref(x.double()), torch.float32, what="eval output")
    assert set(m.state_dict()) == set(nn.SyncBatchNorm(C).state_dict())
    with pytest.raises(ValueError, match="2D"):
        m(torch.randn(3))
    with pytest.raises(ValueError, match="activation"):
        SyncBatchNorm(C, activation="mish")
