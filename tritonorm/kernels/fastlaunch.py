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

Per call, finding the compiled variant still reads every tensor's dtype and address (~3 us a
launch, a fifth of a split plan's host time). ``Launcher.keyed`` skips that for callers that
know more: a plan's launches see the same tensors in the same roles every call (its own fresh
buffers, 16-byte aligned, of dtypes it fixes; the caller's tensors, or stand-ins for them), so
the caller's tensors' dtypes, with all of them aligned (``call_key``), fix every argument's
specialization. ``TRITONORM_FAST_LAUNCH_CHECK=1`` checks that on every such launch (the tests
run with it).
"""

from __future__ import annotations

import contextlib
import operator
import os

import torch
from triton import knobs
from triton.runtime import driver

_ON = [os.environ.get("TRITONORM_FAST_LAUNCH", "1") not in ("0", "")]
# A callable told the kernel's name at every direct launch (the host benchmark counts launches
# with it; ``kernel[grid]`` launches are seen at JITFunction.run instead).
ON_DIRECT_LAUNCH = [None]
_DTYPE = operator.attrgetter("dtype")
_CHECK = [os.environ.get("TRITONORM_FAST_LAUNCH_CHECK", "0") not in ("0", "")]


def call_key(*tensors):
    """A plan call's key for ``Launcher.keyed``: the dtypes of the caller's tensors (None where
    absent), or None when one of them is off 16-byte alignment (then every launch keys on
    everything)."""
    ptrs = 0
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
        else:
            ptrs |= t.data_ptr()
            key.append(t.dtype)
    if ptrs & 15:
        return None
    # The second slot: (device, stream, by_call key), found at the call's first
    # direct launch and shared by the rest (a plan's launches run on one device and stream).
    return [tuple(key), None]


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

    __slots__ = ("kernel", "grid", "grid3", "constexprs", "hooks", "n_tensors", "tail", "const_tail", "compiled",
                 "usable", "by_call", "last")

    def __init__(self, kernel, grid, constexprs: dict):
        self.kernel, self.grid, self.constexprs = kernel, tuple(grid), constexprs
        self.grid3 = (*self.grid, 1, 1)[:3]
        # Direct launches need the compiled-mode JITFunction (the interpreter has no compiled
        # kernel); with pre-run hooks installed every launch goes through ``run``, which calls them.
        self.usable = hasattr(kernel, "device_caches") and hasattr(kernel, "params")
        self.hooks = getattr(kernel, "pre_run_hooks", ())
        # (device, positional count, keyword names, misaligned-tensor bits, tensors' dtypes)
        # -> the compiled kernel.
        self.compiled: dict = {}
        # Fixed at the first call: how many leading positional arguments are tensors (a plan
        # passes its tensors first, then sizes and geometry, the same kinds every call); and the
        # bound list after the positional arguments, [(name, from the call's keywords?,
        # constant)], checked against Triton's binder; const_tail: its values when it takes
        # nothing from the keywords.
        self.n_tensors = None
        self.tail = None
        self.const_tail = None
        # keyed: (device, call key) -> the compiled kernel; last: what the latest call launched
        # directly (None: through ``run``).
        self.by_call: dict = {}
        self.last = None

    def with_constexprs(self, **constexprs) -> "Launcher":
        """Another launcher of the same kernel and grid, with these constexprs changed or added
        (a compiled variant of its own)."""
        return Launcher(self.kernel, self.grid, dict(self.constexprs, **constexprs))

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

    def keyed(self, ckey, *args, **extra):
        """``self(*args, **extra)`` for a plan whose call key ``ckey`` (``call_key`` of the
        caller's tensors) fixes every argument's specialization, as the module docstring says;
        ``ckey`` None: the full path."""
        if ckey is None or not (self.usable and _ON[0]) or self.hooks:
            return self(*args, **extra)
        where = ckey[1]
        if where is None:
            active = driver.active
            device = active.get_current_device()
            where = ckey[1] = (device, active.get_current_stream(device), (device, ckey[0]))
        device, stream, key = where
        compiled = self.by_call.get(key)
        if compiled is None:  # the full path, which launches; its kernel serves the key from now on
            self.last = None
            self(*args, **extra)
            if self.last is not None:
                self.by_call[key] = self.last
            return
        if _CHECK[0] and self._key(device, args, extra)[1] is not compiled:
            raise RuntimeError(f"tritonorm internal: {self.kernel.fn.__name__}: call key {ckey[0]} does not "
                               "fix the launch's specialization")
        self._direct(compiled, stream, args, extra)

    def __call__(self, *args, **extra):
        if not (self.usable and _ON[0]) or self.hooks:
            self.kernel[self.grid](*args, **extra, **self.constexprs)
            return
        if self.n_tensors is None:
            n = 0
            while n < len(args) and isinstance(args[n], torch.Tensor):
                n += 1
            self.n_tensors = n
        active = driver.active
        device = active.get_current_device()
        try:
            key, compiled = self._key(device, args, extra)
        except AttributeError:  # not the tensors of the first call: Triton binds it
            self.kernel[self.grid](*args, **extra, **self.constexprs)
            return
        if compiled is None:
            compiled = self.kernel[self.grid](*args, **extra, **self.constexprs)
            self._remember(key, device, compiled, args, extra)
            return
        self.last = compiled
        self._direct(compiled, active.get_current_stream(device), args, extra)

    def _key(self, device, args, extra):
        """(key, the compiled kernel kept for it or None): what Triton specializes a plan's
        tensors on, dtype and 16-byte alignment (a plan's ints are fixed, its floats never
        specialized)."""
        n = self.n_tensors
        tensors = args[:n] + tuple(extra.values()) if extra else args[:n]
        misaligned = 0
        for t in tensors:
            misaligned = misaligned + misaligned + (t.data_ptr() & 15 != 0)
        key = (device, len(args), tuple(extra) if extra else (), misaligned, *map(_DTYPE, tensors))
        return key, self.compiled.get(key)

    def _direct(self, compiled, stream, args, extra) -> None:
        """What JITFunction.run does once it has the kernel, launch hooks included
        (``launch_metadata`` is None without an enter hook)."""
        if ON_DIRECT_LAUNCH[0] is not None:
            ON_DIRECT_LAUNCH[0](self.kernel.fn.__name__)
        if extra:
            bound = (*args, *[extra[name] if keyword else value for name, keyword, value in self.tail])
        else:
            bound = args + self.const_tail
        hooks = knobs.runtime
        enter = hooks.launch_enter_hook
        meta = None if enter is None else compiled.launch_metadata(self.grid, stream, *bound)
        g0, g1, g2 = self.grid3
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, meta, enter,
                     hooks.launch_exit_hook, *bound)

    def _remember(self, key, device, compiled, args, extra) -> None:
        """Keep ``compiled`` for direct launches if Triton's binder binds exactly our list."""
        try:
            recipe = self._recipe(len(args), extra)
            if recipe is None or (self.tail is not None and recipe != self.tail):
                raise LookupError("no fixed recipe for the bound arguments")
            if any(isinstance(a, torch.Tensor) for a in args[self.n_tensors:]):
                raise LookupError("tensors after the leading ones")
            self.tail = recipe
            self.const_tail = None if any(keyword for _, keyword, _ in recipe) else tuple(v for _, _, v in recipe)
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
