"""Tolerance rule and input helpers shared by the tests.

The rule (DESIGN §7): compare every kernel against the float64 reference. In fp32 the error must
be far under 1e-4 relative to the output's scale. In fp16/bf16 the kernel's error may be at most
twice the error of an eager PyTorch computation at the same precision, plus one unit in the last
place of the output's scale (the final rounding that any implementation must do).
"""

from __future__ import annotations

import torch

LOW = (torch.float16, torch.bfloat16)
FP32_RTOL = 2e-5


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so a kernel that forgets to write shows up."""
    return t.fill_(float("nan"))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def scale(t: torch.Tensor) -> float:
    return max(t.double().abs().max().item(), 1e-30) if t.numel() else 1.0


def assert_close(ours: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                 eager: torch.Tensor | None = None, what: str = "output",
                 term_scale: float = 0.0) -> None:
    """Assert ``ours`` matches the float64 ``ref64`` under the rule above.

    ``eager`` is the same quantity computed by eager PyTorch in ``dtype`` (needed for fp16/bf16).
    ``term_scale``: the magnitude of the terms a result is a difference of, when that exceeds the
    result itself (dx = rstd * (g - mean g - xhat mean(g xhat)) nearly cancels for statistics of
    two values): rounding errors scale with the terms, not with their difference.
    """
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all() == torch.isfinite(ref64).all(), f"{what}: non-finite values differ"
    err = max_err(ours, ref64)
    s = max(scale(ref64), term_scale)
    if dtype in LOW:
        assert eager is not None, "low-precision comparisons need the eager error"
        ulp = torch.finfo(dtype).eps * s
        tol = 2.0 * max_err(eager, ref64) + ulp
    else:
        tol = FP32_RTOL * s
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} (scale {s:.3e}, {dtype})"


def record_launches(monkeypatch) -> list:
    """A list that receives the name of every Triton kernel launched while ``monkeypatch`` is
    active (recorded at the JIT function's ``run``, which both the interpreter's and the compiled
    launcher go through)."""
    from tritonorm.kernels import forward as fk

    names: list = []
    cls = type(fk._fwd_fused_kernel)
    original = cls.run

    def run(kernel, *args, **kwargs):
        names.append(kernel.fn.__name__)
        return original(kernel, *args, **kwargs)
    monkeypatch.setattr(cls, "run", run)
    return names


def record_param_launches(monkeypatch) -> list:
    """A list that receives (kernel name, PARAM_NC, PARAM_FULL) of every Triton launch while
    ``monkeypatch`` is active: how a call read its broadcast weight/bias (in place per sample,
    expanded to x's shape, or per channel)."""
    from tritonorm.kernels import forward as fk

    seen: list = []
    cls = type(fk._fwd_fused_kernel)
    original = cls.run

    def run(kernel, *args, **kwargs):
        seen.append((kernel.fn.__name__, kwargs.get("PARAM_NC", False), kwargs.get("PARAM_FULL", False)))
        return original(kernel, *args, **kwargs)
    monkeypatch.setattr(cls, "run", run)
    return seen


def row_kernels_only(monkeypatch) -> None:
    """Poisoned outputs, and the row/column kernels for every layout: channels_last GroupNorm
    with short groups would otherwise take the whole-pixel kernels (tests/test_pixels.py)."""
    from tritonorm import pixel_plan
    from tritonorm.kernels import launch

    monkeypatch.setattr(launch, "POISON", True)
    monkeypatch.setattr(pixel_plan, "ENABLED", False)
    launch.clear()


def small_tiles(regime):
    """Force ``regime`` with small tiles, so looped/split really loop and split (and the segment
    sums kernel splits too)."""
    from tritonorm import dispatch

    return dispatch.forced(regime, block_p=4, block_m=16, split=2) if regime != "fused" else dispatch.forced("fused")


def device_profile_overrides(monkeypatch, overrides: dict) -> None:
    """While ``monkeypatch`` is active, the device's own profile with the fields of ``overrides``
    replaced (tests whose small shapes must take a plan on a GPU too: a few SMs, small tiles).
    ``overrides`` is reset to ``sm_count=4``; a test adds to it before its first call (and calls
    ``launch.clear()`` when it does after a call)."""
    import dataclasses

    from tritonorm import dispatch
    from tritonorm.kernels import launch

    overrides.clear()
    overrides["sm_count"] = 4
    real = dispatch.profile_for_device
    monkeypatch.setattr(dispatch, "profile_for_device", lambda d: dataclasses.replace(real(d), **overrides))
    launch.clear()


def row_kernels_on_profile(monkeypatch, **fields) -> dict:
    """row_kernels_only, on the device's own profile with ``fields`` replaced
    (device_profile_overrides; sm_count 4 unless given); fresh plans. Returns the overrides."""
    from tritonorm.kernels import launch

    row_kernels_only(monkeypatch)
    overrides: dict = {}
    device_profile_overrides(monkeypatch, overrides)
    overrides.update(fields)
    launch.clear()
    return overrides


def assert_sample_group_grads(x, spec, leaves, residual, dy, y, y64, got, exp, live, labels, dtype, eager_y,
                              eager_g) -> None:
    """y and the gradients ``labels`` (of dx, dweight, dbias, dresidual) of a sample-group call
    against the float64 reference, rounding scaled by the terms they are made of (as
    tests/cases.py): dx is a difference of terms of size rstd * |dy| * |w|."""
    from tritonorm import reference

    x64 = x.detach().double()
    _, var = reference.moments(x64, spec)
    amax = (lambda t: 0.0 if t is None else t.double().abs().max().item())
    w_max = amax(leaves[1]) if leaves[1] is not None else 1.0
    y_terms = amax(reference.norm(x64, spec)) * w_max + amax(leaves[2]) + amax(residual)
    terms = (var + 1e-5).rsqrt().max().item() * amax(dy) * w_max * 1.2
    assert_close(y, y64, dtype, eager_y, "y", term_scale=y_terms)
    for i, name in enumerate(labels):
        assert got[i].dtype == live[i].dtype, name
        assert_close(got[i], exp[i], live[i].dtype, None if eager_g is None else eager_g[i], name,
                     term_scale=terms if name in ("dx", "dresidual") else 0.0)


def aten_ops_mode():
    """A TorchDispatchMode recording the aten ops run on real (not meta) tensors, each with its
    largest output's element count, in ``.ops``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class AtenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
            if outs and all(o.device.type != "meta" for o in outs):
                self.ops.append((func.__name__.split(".")[0], max(o.numel() for o in outs)))
            return out

    return AtenOps()


def kernels_outside_dispatch_modes(monkeypatch) -> None:
    """Run every Triton launch with the active TorchDispatchModes disabled, so an aten-op
    recorder (``aten_ops_mode``) sees the call's own torch ops, not the interpreter's host copies
    inside a launch."""
    from torch.utils._python_dispatch import _disable_current_modes

    from tritonorm.kernels import forward as fk

    cls = type(fk._fwd_fused_kernel)
    original = cls.run

    def run(kernel, *args, **kwargs):
        with _disable_current_modes():
            return original(kernel, *args, **kwargs)
    monkeypatch.setattr(cls, "run", run)


def saved_tensors(fn):
    """Run ``fn`` recording the tensors autograd saves for backward: (its result, those tensors)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved
