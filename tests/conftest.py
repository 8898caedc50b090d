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
