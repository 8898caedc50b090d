"""Recording kernel launches instead of running them, and planning for a GPU that is not here.

``LaunchRecorder`` replaces the ``run`` method of Triton's kernel objects for the duration of a
``with`` block. ``kernel[grid](*args, **kw)`` calls ``run`` in both of Triton's modes (3.6 and 3.9):
``JITFunction.run`` when kernels are compiled, ``InterpretedFunction.run`` under
``TRITON_INTERPRET=1`` (``KernelInterface.__getitem__`` returns ``lambda *a, **k: self.run(...)``).
So the recorder sees every launch of the host path, whatever its argument lists are, and
nothing runs: the outputs stay as allocated.

Uses: counting launches per call and timing the host path with the launch stubbed
(``describe=False``: the cheapest record, a name and a grid), and collecting the compiled
variants the dispatcher picks (``describe=True``: every argument, as Triton's binder sees it).

``planning_for("h200")`` makes the launchers plan for a named device profile on any machine, and
lets CPU tensors take the Triton path without the interpreter (the kernels do not run anyway).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
from dataclasses import dataclass, field

_lock = threading.Lock()


@dataclass(frozen=True)
class Arg:
    """One kernel argument as the binder sees it.

    kind: "tensor" (dtype, ptr_mod16: the data pointer modulo 16, shape, stride), "int",
    "float", "bool", "none", "constexpr" (value), or "other" (repr).
    """

    kind: str
    value: object = None
    dtype: str = ""
    ptr_mod16: int = 0
    shape: tuple = ()
    stride: tuple = ()

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def to_json(self) -> dict:
        out = {"kind": self.kind}
        if self.kind == "tuple":  # the kernels' geometry tuples: their elements, each described
            out["value"] = [a.to_json() for a in self.value]
            return out
        if self.kind == "tensor":
            out.update(dtype=self.dtype, ptr_mod16=self.ptr_mod16, shape=list(self.shape),
                       stride=list(self.stride))
        else:
            out["value"] = self.value
        return out

    @staticmethod
    def from_json(d: dict) -> "Arg":
        if d["kind"] == "tensor":
            return Arg("tensor", dtype=d["dtype"], ptr_mod16=d["ptr_mod16"], shape=tuple(d["shape"]),
                       stride=tuple(d["stride"]))
        if d["kind"] == "tuple":
            return Arg("tuple", tuple(Arg.from_json(e) for e in d["value"]))
        return Arg(d["kind"], d.get("value"))


def describe_arg(value, constexpr: bool = False) -> Arg:
    if constexpr:
        v = getattr(value, "value", value)  # tl.constexpr wrapper
        return Arg("constexpr", v if isinstance(v, (bool, int, float, str, type(None))) else repr(v))
    if value is None:
        return Arg("none")
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        try:
            ptr = value.data_ptr()
        except Exception:  # meta tensors and the like: no storage; report as aligned
            ptr = 0
        return Arg("tensor", dtype=str(value.dtype).replace("torch.", ""), ptr_mod16=ptr % 16,
                   shape=tuple(getattr(value, "shape", ())), stride=tuple(value.stride()))
    if isinstance(value, tuple):
        return Arg("tuple", tuple(describe_arg(v) for v in value))
    if isinstance(value, bool):
        return Arg("bool", value)
    if isinstance(value, int):
        return Arg("int", value)
    if isinstance(value, float):
        return Arg("float", value)
    return Arg("other", repr(value))


@dataclass
class Launch:
    """One recorded ``kernel[grid](...)``. ``fn``: the kernel's Python function; ``args``: name ->
    Arg in parameter order (empty when not described); ``options``: launch options such as
    num_warps; ``tags``: what the caller was doing (set with ``LaunchRecorder.tag``)."""

    fn: object
    grid: tuple
    args: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    # Parameters the kernel declares do_not_specialize / do_not_specialize_on_alignment.
    no_specialize: frozenset = frozenset()
    no_align: frozenset = frozenset()

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))

    @property
    def qualname(self) -> str:
        """``module:function``: enough to import the kernel again in another process."""
        return f"{self.fn.__module__}:{self.fn.__qualname__}"


def _python_fn(kernel):
    """The user's function behind a JITFunction or InterpretedFunction."""
    return getattr(kernel, "fn", kernel)


@functools.lru_cache(maxsize=None)
def _signature(fn):
    """(parameter names, set of constexpr names) of a kernel's Python function."""
    params = inspect.signature(fn).parameters
    names = tuple(params)
    const = frozenset(n for n, p in params.items() if "constexpr" in str(p.annotation))
    return names, const


def _declared(kernel, attr: str, names: tuple) -> frozenset:
    """Names in a kernel's do_not_specialize-style list (given as names or indices); the
    interpreter keeps the decorator's arguments in ``kwargs``."""
    items = getattr(kernel, attr, None)
    if items is None:
        items = (getattr(kernel, "kwargs", None) or {}).get(attr)
    out = set()
    for item in items or ():
        out.add(names[item] if isinstance(item, int) and item < len(names) else item)
    return frozenset(out)


def _kernel_classes() -> list:
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:  # the interpreter module imports numpy and friends; present in every supported triton
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except Exception:
        pass
    return classes


class LaunchRecorder:
    """Record (and by default stub) every Triton kernel launch inside the ``with`` block.

    ``describe``: describe every argument (dtype, alignment, shape of tensors; values of ints and
    constexprs). Off, a launch costs a list append, for timing the host path.
    ``launch``: also run the kernel (counting real launches on a GPU); off by default.
    ``keep``: keep the Launch records; off, only ``count`` grows (long timing loops).

    Not re-entrant across threads: while it is active, launches from every thread are recorded.
    """

    def __init__(self, describe: bool = True, launch: bool = False, keep: bool = True):
        self.describe = describe
        self.launch = launch
        self.keep = keep
        self.launches: list[Launch] = []
        self.count = 0
        self._tags: dict = {}
        self._saved: list = []

    # -- the context manager ------------------------------------------------------------------
    def __enter__(self) -> "LaunchRecorder":
        recorder = self
        # Plans launch directly once a kernel is compiled (kernels/fastlaunch.py), past run():
        # while recording, every launch goes through run.
        from ..kernels import fastlaunch

        self._fast_was = fastlaunch._ON[0]
        fastlaunch._ON[0] = False
        with _lock:
            for cls in _kernel_classes():
                original = cls.__dict__["run"]

                def run(kernel, *args, grid, warmup, _original=original, **kwargs):
                    if warmup:
                        return _original(kernel, *args, grid=grid, warmup=warmup, **kwargs)
                    recorder._record(kernel, grid, args, kwargs)
                    if recorder.launch:
                        return _original(kernel, *args, grid=grid, warmup=warmup, **kwargs)
                    return None

                self._saved.append((cls, original))
                cls.run = run
        return self

    def __exit__(self, *exc) -> None:
        from ..kernels import fastlaunch

        fastlaunch._ON[0] = self._fast_was
        with _lock:
            while self._saved:
                cls, original = self._saved.pop()
                cls.run = original

    # -- recording ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def tag(self, **tags):
        """Attach ``tags`` (e.g. case="bn 64x112^2", phase="backward") to launches in the block."""
        prev = self._tags
        self._tags = {**prev, **tags}
        try:
            yield
        finally:
            self._tags = prev

    def clear(self) -> None:
        self.launches.clear()
        self.count = 0

    def _record(self, kernel, grid, args, kwargs) -> None:
        self.count += 1
        if not self.keep:
            return
        fn = _python_fn(kernel)
        if callable(grid) and not isinstance(grid, tuple):
            grid = ("callable",)
        rec = Launch(fn=fn, grid=tuple(grid), tags=dict(self._tags))
        if self.describe:
            names, const = _signature(fn)
            bound = dict(zip(names, args))
            options = {}
            for k, v in kwargs.items():
                if k in names:
                    bound[k] = v
                else:
                    options[k] = v
            rec.args = {n: describe_arg(bound[n], n in const) for n in names if n in bound}
            rec.options = options
            rec.no_specialize = _declared(kernel, "do_not_specialize", names)
            rec.no_align = _declared(kernel, "do_not_specialize_on_alignment", names)
        self.launches.append(rec)

    def names(self) -> list[str]:
        return [launch.name for launch in self.launches]


def record_launches(**kw) -> LaunchRecorder:
    """``with record_launches() as rec: ...``; then ``rec.count``, ``rec.launches``."""
    return LaunchRecorder(**kw)


# -- planning for a device that is not here ---------------------------------------------------

_PROFILE_FUNCS = ("profile_for", "profile_for_device")


@contextlib.contextmanager
def planning_for(profile_name: str = "h200"):
    """Inside the block, the launchers plan for ``dispatch.PROFILES[profile_name]`` whatever
    device the tensors are on, and CPU tensors take the Triton path (without the interpreter:
    combine with a LaunchRecorder, since nothing can run).

    Every loaded tritonorm module's ``profile_for`` / ``profile_for_device`` (the functions, or
    names imported from dispatch) is replaced, so this does not depend on which launcher module
    looks the profile up.
    """
    from .. import backend, dispatch

    profile = dispatch.profile_named(profile_name)
    import tritonorm.kernels.launch  # noqa: F401  (so its lookup is patched too)

    saved = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "tritonorm" or name.startswith("tritonorm.")):
            continue
        for attr in _PROFILE_FUNCS:
            if callable(getattr(module, attr, None)):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, lambda device=None, _p=profile: _p)
    saved.append((backend, "interpreter_enabled", backend.interpreter_enabled))
    backend.interpreter_enabled = lambda: True
    dispatch.clear_memo()
    try:
        yield profile
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
        dispatch.clear_memo()
