"""Shared test setup.

Kernels run in Triton's interpreter on CPU tensors unless a CUDA device is present (then the
suite runs compiled on the GPU). Tests that need a real GPU carry ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

if HAS_CUDA:
    # On a GPU machine the same tests run compiled: tensors they create land on the GPU.
    torch.set_default_device("cuda")
else:
    # The kernels need the interpreter on CPU tensors; `make test` sets it, this covers a bare `pytest`
    # (the variable is read when triton is imported, so set it before anything imports triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (compiled Triton kernels)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (from its id), so inputs are fresh random data but a failure
    # can be reproduced by re-running the same test.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


@pytest.fixture
def planes_profile(monkeypatch):
    """For the planes kernels' tests (test_planes.py, test_planes_groups.py): poisoned outputs,
    fresh call and plan caches (a plan made under another test's profile must not be reused),
    and the device's own profile with a few SMs, so small shapes have channel blocks enough for
    planes_plan.applies on a GPU too. Yields the overrides (helpers.device_profile_overrides)."""
    from helpers import device_profile_overrides

    from tritonorm import core
    from tritonorm.kernels import launch

    monkeypatch.setattr(launch, "POISON", True)
    monkeypatch.setattr(core, "_CALLS", {})
    overrides: dict = {}
    device_profile_overrides(monkeypatch, overrides)
    yield overrides
    launch.clear()


@pytest.fixture(params=["fused", "looped"])
def planes_regime(request, planes_profile):
    """fused: the device's limits (every sample, or a group's, in one tile); looped:
    256-element fused limits and 512-element tiles, so the samples take several tiles, the last
    one partial."""
    from tritonorm.kernels import launch

    if request.param == "looped":
        planes_profile.update(fused_max={4: 256, 2: 256}, fused_max_backward={4: 256, 2: 256}, tile=512)
    launch.clear()
    return request.param
