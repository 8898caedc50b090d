"""Activation memory: the bytes a forward call keeps alive for its backward, tritonorm against eager.

Measured, not modelled: the forward runs under ``torch.autograd.graph.saved_tensors_hooks`` and
every tensor autograd saves is recorded; the figure is the sum of the distinct storages those
tensors hold (a tensor saved twice, or two views of one buffer, count once), less the storages
of the weight and bias, which are parameters and live anyway. Exact on CPU. Saved bytes are an
affine function of the batch (every saved tensor is per sample or per parameter), so a suite case
is measured at batch 1 and 2 with its full per-sample shape and extrapolated to its batch
exactly. On a CUDA machine every case is measured so; on CPU (Triton's interpreter) cases whose
per-sample size exceeds MAX_SAMPLE_ELEMENTS are measured at their ``scaled()`` shape instead
(marked "scaled"), where the statistics weigh more against x than in the real shape.
torch.compile's saved bytes are measured the same way when asked (``compiled=True``; the hooks see
the tensors its compiled graph saves).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..tuning.suites import Case, make_inputs

# Per-sample elements above which the interpreter is too slow (minutes): measure the scaled case.
MAX_SAMPLE_ELEMENTS = 1 << 16


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, less those of ``exclude``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _fns(case: Case, x, kw, residual):
    """(tritonorm, eager) forward functions of a case on prepared inputs."""
    import tritonorm

    from .providers import _eager

    if case.kind.startswith("add_"):
        return _add_fns(case, x, kw, residual)
    ours = lambda: tritonorm.norm(x, case.scope, backend="triton", **kw)  # noqa: E731
    return ours, _eager(case, x, kw)


def _add_fns(case, x, kw, residual):
    import torch.nn.functional as F

    import tritonorm

    w, b = kw.get("weight"), kw.get("bias")

    def ours():
        return tritonorm.add_norm(x, residual, "C", weight=w, bias=b, center=case.center, backend="triton")

    def eager():
        h = x + residual
        if case.center:
            return F.layer_norm(h, h.shape[-1:], w, b), h
        return F.rms_norm(h, h.shape[-1:], w, eps=1e-5), h
    return ours, eager


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _compiled(eager):
    """The eager function under torch.compile, compiled before measuring (tracing saves nothing
    real). Dynamo's cache is reset first: every case's eager function shares one code object, and
    past its recompile limit dynamo would silently run eager."""
    torch._dynamo.reset()
    fn = torch.compile(eager, dynamic=False)
    fn()
    return fn


def measure(case: Case, dtype=torch.float32, batch: int | None = None,
            compiled: bool = False) -> tuple[int, ...]:
    """(tritonorm, eager[, torch.compile]) saved bytes of ``case`` at its own shape (or with
    batch ``batch``)."""
    shape = case.shape if batch is None else (batch, *case.shape[1:])
    c = replace(case, shape=shape)
    x, kw = make_inputs(c, dtype, _device(), requires_grad=True)
    residual = kw.pop("add_residual", None)
    ours, eager = _fns(c, x, kw, residual)
    params = (kw.get("weight"), kw.get("bias"))
    out = (saved_bytes(ours, params), saved_bytes(eager, params))
    if compiled:
        out += (saved_bytes(_compiled(eager), params),)
    return out


def report(case: Case, dtype=torch.float32, compiled: bool = False) -> dict:
    """Saved bytes of a suite case for tritonorm and eager (and torch.compile), and the ratios."""
    per_sample = math.prod(case.shape[1:])
    scaled = per_sample > MAX_SAMPLE_ELEMENTS and _device() == "cpu"
    base = case.scaled() if scaled else case
    n = base.shape[0]
    sg = max(1, base.sample_groups)
    if sg > 1 or n <= 2:
        got = measure(base, dtype, compiled=compiled)
    else:  # exact affine extrapolation from batch 1 and 2
        one = measure(base, dtype, 1, compiled)
        two = measure(base, dtype, 2, compiled)
        got = tuple(a + (b - a) * (n - 1) for a, b in zip(one, two))
    ours, eager = got[:2]
    row = dict(suite=case.suite, case=case.name, dtype=str(dtype).replace("torch.", ""),
               shape="x".join(map(str, base.shape)) + (" (scaled)" if scaled else ""),
               tritonorm_bytes=ours, eager_bytes=eager, ratio=ours / eager if eager else float("nan"))
    if compiled:
        row.update(compile_bytes=got[2], ratio_compile=ours / got[2] if got[2] else float("nan"))
    return row
