"""The compiled variants the dispatcher picks for the benchmark suites, found by recording.

A *variant* is what Triton compiles once: a kernel, the specialization of each runtime argument
(a tensor's dtype and whether its pointer is 16-byte aligned; an int's width, whether it is 1
(then a compile-time constant) or a multiple of 16), the constexpr values, and the launch
options (num_warps, num_stages). ``spec_of`` mirrors Triton's binder (JITFunction's
``specialize_impl``) so variants can be counted without compiling; the compile step
(tritonorm/aot/compile.py) runs Triton's own binder and uses its answer.

The suites are driven through the public API (``tritonorm.norm`` forward, then autograd for
the gradients of x, weight and bias) on CPU tensors of the real suite shapes made with
``torch.empty``: nothing is launched (LaunchRecorder stubs the kernels), so no page of a
400 MB input is ever touched. Meta tensors would be cheaper still, but ``torch.library``
sends them to the ops' fake implementations, which launch nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch

from ..tuning import suites
from .record import Arg, Launch, LaunchRecorder, planning_for

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TRITON_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
                 "int32": "i32", "int64": "i64", "uint8": "u8", "int8": "i8", "bool": "i1"}


def spec_of(arg: Arg, specialize: bool = True, align: bool = True) -> tuple:
    """What Triton's binder makes of an argument (the part of its cache key).

    ``specialize=False``: the parameter is in the kernel's do_not_specialize (Triton 3.9 then
    drops both the ==1 constant and the divisibility mark of ints); ``align=False``: in
    do_not_specialize_on_alignment."""
    if arg.kind == "tensor":
        return ("*" + _TRITON_DTYPE.get(arg.dtype, arg.dtype), "D" if align and arg.ptr_mod16 == 0 else "")
    if arg.kind == "tuple":  # Triton specializes a tuple's elements one by one
        return ("tuple", tuple(spec_of(a, specialize, align) for a in arg.value))
    if arg.kind == "int":
        v = arg.value
        width = "i32" if -2**31 <= v < 2**31 else ("i64" if -2**63 <= v < 2**63 else "u64")
        if not specialize:
            return (width, None)
        if v == 1:
            return ("constexpr", 1)
        return (width, "D" if align and v % 16 == 0 else "")
    if arg.kind == "bool":
        return ("u1",)
    if arg.kind == "float":
        return ("fp32",)
    if arg.kind == "none":
        return ("constexpr", None)
    return ("constexpr", arg.value)


@dataclass
class Variant:
    """One compile: the launch that first asked for it, and every context that asked."""

    key: tuple
    launch: Launch
    contexts: list = field(default_factory=list)   # tags dicts of the launches

    @property
    def kernel(self) -> str:
        return self.launch.name

    def constexprs(self) -> dict:
        return {n: a.value for n, a in self.launch.args.items() if a.kind == "constexpr"}

    def specialized(self) -> dict:
        """Runtime args Triton turned into constants (==1) or marked 16-divisible."""
        out = {}
        for n, a in self.launch.args.items():
            if a.kind == "int":
                s = _spec(self.launch, n)
                if s[0] == "constexpr" or s[1] == "D":
                    out[n] = "==1" if s[0] == "constexpr" else "%16"
        return out

    def to_json(self) -> dict:
        """What the compile worker needs (and the report shows)."""
        return {
            "kernel": self.launch.qualname,
            "args": {n: a.to_json() for n, a in self.launch.args.items()},
            "options": {k: v for k, v in self.launch.options.items()
                        if isinstance(v, (int, float, bool, str, type(None)))},
            "contexts": self.contexts,
        }


def variant_key(launch: Launch) -> tuple:
    options = tuple(sorted((k, repr(v)) for k, v in launch.options.items()))
    return (launch.qualname, tuple((n, _spec(launch, n)) for n in launch.args), options)


def _spec(launch: Launch, name: str) -> tuple:
    return spec_of(launch.args[name], name not in launch.no_specialize, name not in launch.no_align)


def unique_variants(launches: list[Launch]) -> list[Variant]:
    found: dict = {}
    for launch in launches:
        key = variant_key(launch)
        v = found.get(key)
        if v is None:
            v = found[key] = Variant(key, launch)
        if launch.tags not in v.contexts:
            v.contexts.append(launch.tags)
    return list(found.values())


# -- driving the suites ------------------------------------------------------------------------

def empty_inputs(case: suites.Case, dtype: torch.dtype, channels_last: bool):
    """(x, kwargs) like ``suites.make_inputs`` but with x from ``torch.empty`` (never touched)."""
    x = torch.empty(case.shape, dtype=dtype, device="cpu")  # CPU even where cuda is the default
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_(True)
    c = case.shape[1]
    kw = dict(num_groups=case.num_groups, center=case.center, activation=case.activation)
    if case.sample_groups > 1:  # Ghost BatchNorm: else the suite would compile plain BatchNorm's
        kw["sample_groups"] = case.sample_groups
    if case.affine:
        kw["weight"] = torch.ones(c, dtype=dtype, device="cpu", requires_grad=True)
        if case.center:
            kw["bias"] = torch.zeros(c, dtype=dtype, device="cpu", requires_grad=True)
    if case.kind in suites.ADAPTIVE_KINDS:  # per-sample modulation, as make_inputs: read in place
        shape = suites.ada_param_shape(case)
        kw["weight"] = torch.ones(shape, dtype=dtype, device="cpu", requires_grad=True)
        kw["bias"] = torch.zeros(shape, dtype=dtype, device="cpu", requires_grad=True)
    return x, kw


def run_case(case: suites.Case, dtype: torch.dtype, channels_last: bool, backward: bool = True,
             rec: LaunchRecorder | None = None) -> None:
    """One training call of the case as the benchmarks make it: forward, then the gradients of
    x, weight and bias (as ``tritonorm bench`` measures them). With ``rec``, launches are
    tagged phase="forward" / "backward"."""
    import tritonorm

    phase = rec.tag if rec is not None else (lambda **_: contextlib.nullcontext())
    x, kw = empty_inputs(case, dtype, channels_last)
    with phase(phase="forward"):
        y = tritonorm.norm(x, case.scope, **kw)
    if backward:
        leaves = [t for t in (x, kw.get("weight"), kw.get("bias")) if t is not None]
        with phase(phase="backward"):
            torch.autograd.grad(y, leaves, torch.empty_like(y))


def layouts_of(case: suites.Case, layouts: str) -> list[bool]:
    """channels_last flags to run a case with: ``suite`` (as the suite lists it) or ``both``
    (NCHW and channels_last for every image case)."""
    if len(case.shape) < 4 or layouts == "suite":
        return [case.channels_last]
    return [False, True]


def record_suites(suite_names=("all",), dtypes=tuple(DTYPES), layouts: str = "both",
                  profile: str = "h200") -> list[Launch]:
    """Every launch of every case of the suites, tagged with suite, case, dtype, layout, phase."""
    rec = LaunchRecorder()
    seen = set()
    with planning_for(profile), rec:
        for suite in suite_names:
            for case in suites.cases(suite):
                for cl in layouts_of(case, layouts):
                    for dname in dtypes:
                        key = (case.kind, case.shape, case.scope, case.num_groups, case.sample_groups, cl,
                               case.activation, case.center, dname)
                        if key in seen:  # "both" makes some suite cases twice
                            continue
                        seen.add(key)
                        layout = ("cl" if cl else "nchw") if len(case.shape) >= 4 else "rows"
                        tags = dict(suite=case.suite, case=_case_name(case, cl), dtype=dname, layout=layout)
                        with rec.tag(**tags):
                            run_case(case, DTYPES[dname], cl, rec=rec)
    return rec.launches


def _case_name(case: suites.Case, cl: bool) -> str:
    name = case.name.removesuffix(" cl")
    return name + (" cl" if cl else "")


# -- recompiles as the batch changes -----------------------------------------------------------

# One layer per suite (a middle one), its batch (rows for the LLM layer) swept 1..64.
RECOMPILE_LAYERS = {
    "resnet50": ("bn 256x56^2", lambda n: replace(_case("resnet50", "bn 256x56^2 b32"), shape=(n, 256, 56, 56))),
    "sd-unet": ("gn32+silu 640x32^2", lambda n: replace(_case("sd-unet", "gn32+silu 640x32^2 b1"),
                                                         shape=(n, 640, 32, 32))),
    "llm": ("ln Nx4096", lambda n: replace(_case("llm", "ln 32x4096"), shape=(n, 4096))),
    "nnunet": ("in3d 128x32^3", lambda n: replace(_case("nnunet", "in3d 128x32^3 b2"), shape=(n, 128, 32, 32, 32))),
}


def _case(suite: str, name: str) -> suites.Case:
    for c in suites.cases(suite):
        if c.name == name:
            return c
    raise KeyError(f"{suite}: no case named {name!r}")


def recompiles(suite: str, batches=range(1, 65), dtype: str = "bf16", profile: str = "h200") -> dict:
    """Distinct variants per kernel as the batch of the suite's layer sweeps ``batches``.

    Returns {"layer", "total": distinct variants over all kernels, "per_kernel": {kernel: count},
    "varying": {kernel: {arg: sorted distinct specializations}} (what makes them differ)}.
    """
    label, make = RECOMPILE_LAYERS[suite]
    rec = LaunchRecorder()
    with planning_for(profile), rec:
        for n in batches:
            with rec.tag(batch=n):
                run_case(make(n), DTYPES[dtype], False)
    variants = unique_variants(rec.launches)
    per_kernel: dict = {}
    varying: dict = {}
    for v in variants:
        per_kernel[v.kernel] = per_kernel.get(v.kernel, 0) + 1
    for kernel in per_kernel:
        keys = [v for v in variants if v.kernel == kernel]
        diffs = {}
        for name, a in keys[0].launch.args.items():
            values = {_spec_label(v.launch, name) for v in keys}
            if len(values) > 1:
                diffs[name] = sorted(values, key=str)
        opts = {repr(sorted(v.launch.options.items())) for v in keys}
        if len(opts) > 1:
            diffs["options"] = sorted(opts)
        varying[kernel] = diffs
    return {"layer": label, "total": len(variants), "per_kernel": per_kernel, "varying": varying}


def _spec_label(launch: Launch, name: str) -> str:
    a = launch.args.get(name)
    if a is None:  # a keyword some launches of the kernel pass and others leave at its default
        return "(default)"
    s = _spec(launch, name)
    if s[0] == "constexpr":
        return f"={s[1]}" if a.kind == "int" else str(s[1])
    return f"{s[0]}{'%16' if len(s) > 1 and s[1] == 'D' else ''}"
