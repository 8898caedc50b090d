"""Launching a plan's kernel without Triton's per-call binder.

``kernel[grid](*args, **constexprs)`` re-derives on every call what a launch plan already fixes:
the specialization of every argument (the plan's ints and dtypes never change; only the 16-byte
alignment of the tensors can), the cache key, the options. That costs ~15-20 us a launch, more
than the rest of a call. A ``Launcher`` belongs to one plan (kernel, grid, constexprs fixed): the
first launch for a given alignment pattern goes through Triton's ``run``, which compiles or finds
the kernel and returns it; the launcher then checks, with Triton's own binder, that the argument
list it will pass is exactly the one Triton bound (values and order), and from then on calls the
compiled kernel's launcher directly with that list, as ``JITFunction.run`` itself does.

It falls back to ``kernel[grid]`` (and stays there) whenever it cannot be sure: the interpreter,
a Triton whose objects look different, a binder disagreeing. Launch hooks (profilers) are called
as ``JITFunction.run`` calls them.
``TRITONORM_FAST_LAUNCH=0`` turns it off; ``enabled(False)`` too (the launch recorders do, so
every launch goes through ``run`` where they see it).
"""

from __future__ import annotations

import contextlib
import os

import torch

_ON = [os.environ.get("TRITONORM_FAST_LAUNCH", "1") not in ("0", "")]
# A callable told the kernel's name at every direct launch (the host benchmark counts launches
# with it; ``kernel[grid]`` launches are seen at JITFunction.run instead).
ON_DIRECT_LAUNCH = [None]


@contextlib.contextmanager
def enabled(on: bool):
    """Turn direct launches on or off inside the block."""
    prev = _ON[0]
    _ON[0] = on
    try:
        yield
    finally:
        _ON[0] = prev


class Launcher:
    """``kernel[grid](*args, **constexprs)`` for a grid and constexprs fixed by a plan."""

    __slots__ = ("kernel", "grid", "constexprs", "tail", "compiled", "usable")

    def __init__(self, kernel, grid, constexprs: dict):
        self.kernel, self.grid, self.constexprs = kernel, tuple(grid), constexprs
        self.compiled: dict = {}  # (device, extra names, tensors' dtypes and alignment) -> kernel
        # Direct launches need the compiled-mode JITFunction (the interpreter has no compiled
        # kernel). The bound list is the positional arguments, then every later parameter from
        # the call's keyword tensors, the constexprs or its default: its recipe is built at the
        # first call and checked against Triton's binder.
        self.usable = hasattr(kernel, "device_caches") and hasattr(kernel, "params")
        self.tail = None  # [(name, from the call's keywords?, constant)] after the positional args

    def _recipe(self, n_args: int, extra: dict):
        tail = []
        for p in self.kernel.params[n_args:]:
            if p.name in extra:
                tail.append((p.name, True, None))
            elif p.name in self.constexprs:
                tail.append((p.name, False, self.constexprs[p.name]))
            elif p.has_default:
                tail.append((p.name, False, p.default))
            else:
                return None
        return tuple(tail)

    def __call__(self, *args, **extra):
        if self.usable and _ON[0]:
            from triton import knobs
            from triton.runtime import driver

            device = driver.active.get_current_device()
            # What Triton specializes a plan's tensors on: dtype and 16-byte alignment (a plan's
            # ints are fixed, its floats never specialized).
            tensors = (*args, *extra.values()) if extra else args
            key = (device, tuple(extra), tuple((a.dtype, a.data_ptr() % 16 == 0) for a in tensors
                                               if isinstance(a, torch.Tensor)))
            compiled = self.compiled.get(key)
            if compiled is None:
                compiled = self.kernel[self.grid](*args, **extra, **self.constexprs)
                self._remember(key, device, compiled, args, extra)
                return
            if ON_DIRECT_LAUNCH[0] is not None:
                ON_DIRECT_LAUNCH[0](self.kernel.fn.__name__)
            # What JITFunction.run does once it has the kernel, launch hooks included.
            grid = self.grid
            stream = driver.active.get_current_stream(device)
            bound = (*args, *[extra[name] if keyword else value for name, keyword, value in self.tail])
            hooks = knobs.runtime
            compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                         compiled.function, compiled.packed_metadata,
                         compiled.launch_metadata(grid, stream, *bound), hooks.launch_enter_hook,
                         hooks.launch_exit_hook, *bound)
            return
        self.kernel[self.grid](*args, **extra, **self.constexprs)

    def _remember(self, key, device, compiled, args, extra) -> None:
        """Keep ``compiled`` for direct launches if Triton's binder binds exactly our list."""
        try:
            recipe = self._recipe(len(args), extra)
            if recipe is None or (self.tail is not None and recipe != self.tail):
                raise LookupError("no fixed recipe for the bound arguments")
            self.tail = recipe
            binder = self.kernel.device_caches[device][4]
            bound, _, _ = binder(*args, **extra, **self.constexprs)
            ours = (*args, *[extra[name] if keyword else value for name, keyword, value in recipe])
            values = tuple(bound.values())
            same = len(values) == len(ours) and all(
                a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)
                for a, b in zip(values, ours))
            if same and all(hasattr(compiled, k) for k in ("run", "function", "packed_metadata",
                                                           "launch_metadata")):
                self.compiled[key] = compiled
            else:
                self.usable = False
        except Exception:  # another Triton's internals: stay on the portable path
            self.usable = False
