"""``forbid_host_reads()``: make every read of a tensor's values by the host raise inside a block.

A CUDA training step must not wait for the GPU. ``torch.cuda.set_sync_debug_mode`` catches that
on a GPU only; on CPU this guard catches the same thing at its source, the Python-level calls that
turn tensor values into host values or make a result's size depend on them (``.item()``,
``bool(t)``, ``float(t)``, ``int(t)``, ``t.tolist()``, ``t.numpy()``, ``nonzero``,
``masked_select``, ``unique``, indexing with a boolean mask or a 0-dim integer tensor...). An
``if`` on a tensor calls ``__bool__``, so data-dependent Python branches are caught too.

Triton's interpreter, which stands in for the GPU in these tests, copies kernel arguments to NumPy
to run them; calls made from Triton's own modules are let through (a compiled launch reads no
values).
"""

from __future__ import annotations

import contextlib
import sys

import torch

_METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
            "__array__", "nonzero", "masked_select", "unique", "unique_consecutive")
_FUNCTIONS = ("nonzero", "masked_select", "unique", "unique_consecutive", "is_nonzero")


class HostRead(AssertionError):
    pass


def _from_triton() -> bool:
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if frame.f_globals.get("__name__", "").startswith("triton."):
            return True
        frame = frame.f_back
    return False


def _guard(name, real):
    def guarded(*args, **kwargs):
        if _from_triton():
            return real(*args, **kwargs)
        raise HostRead(f"host read of tensor values: {name}")
    return guarded


def _syncing_index(index) -> bool:
    """A boolean mask needs nonzero() (a size read); a 0-dim integer tensor is read as an int."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and (i.dtype == torch.bool or (i.dim() == 0 and not i.is_floating_point()))
               for i in parts)


def _guard_index(name, real):
    def guarded(self, index, *rest):
        if _syncing_index(index) and not _from_triton():
            raise HostRead(f"host read of tensor values: Tensor.{name} with a mask or 0-dim tensor index")
        return real(self, index, *rest)
    return guarded


@contextlib.contextmanager
def forbid_host_reads():
    saved = []
    try:
        for name in ("__getitem__", "__setitem__"):
            real = getattr(torch.Tensor, name)
            saved.append((torch.Tensor, name, real))
            setattr(torch.Tensor, name, _guard_index(name, real))
        for name in _METHODS:
            real = getattr(torch.Tensor, name, None)
            if real is not None:
                saved.append((torch.Tensor, name, real))
                setattr(torch.Tensor, name, _guard(f"Tensor.{name}", real))
        for name in _FUNCTIONS:
            real = getattr(torch, name)
            saved.append((torch, name, real))
            setattr(torch, name, _guard(f"torch.{name}", real))
        yield
    finally:
        for owner, name, real in reversed(saved):
            setattr(owner, name, real)


def self_test() -> None:
    """The guard itself: each kind of host read raises inside, nothing outside."""
    t = torch.tensor([1.0, 2.0])
    with forbid_host_reads():
        for read in (lambda: t.sum().item(), lambda: bool(t[0] > 0), lambda: float(t[0]),
                     lambda: int(t[1]), lambda: t.tolist(), lambda: t.nonzero(), lambda: torch.nonzero(t),
                     lambda: [0, 1][t[0].long()], lambda: t[t > 1], lambda: t[t.argmax()],
                     lambda: 1 if t[0] > 0 else 0):
            try:
                read()
            except HostRead:
                continue
            raise AssertionError("a host read went through the guard")
        assert torch.equal(torch.where(t > 1, t, -t), torch.tensor([-1.0, 2.0]))  # device-side is fine
    assert t.sum().item() == 3.0


@contextlib.contextmanager
def cuda_sync_errors():
    """On a GPU: make any host-device synchronization inside the block raise (PyTorch's own
    detector, which also sees syncs inside C++ ops, such as ``torch.linalg.eigh``'s)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
