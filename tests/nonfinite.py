"""Comparisons that hold NaN and inf to their exact positions (tests of numerics at the edges).

``helpers.assert_close`` only checks that both sides are all-finite or not; here a result must
have NaN exactly where the float64 reference has NaN, +inf and -inf exactly where the reference
rounded to the result's dtype has them (a float64 value beyond fp16's range is inf in fp16), and
the finite values must pass the project's tolerance rule (helpers.py) on their own.
"""

from __future__ import annotations

import os

import torch

from helpers import FP32_RTOL, LOW


def _where(mask: torch.Tensor, limit: int = 6) -> str:
    idx = mask.nonzero().tolist()
    return f"{len(idx)} position(s), e.g. {idx[:limit]}"


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def assert_matches(ours: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                   eager: torch.Tensor | None = None, what: str = "output",
                   term_scale: float = 0.0) -> None:
    """NaN/inf positions exactly as the reference's; finite values under the tolerance rule.

    ``eager``: the same quantity from eager PyTorch in ``dtype`` (low precision only).
    ``term_scale``: the magnitude of the terms the result is a difference of (see helpers.py).
    """
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    ours = ours.detach()
    expect = ref64.detach().to(dtype)  # the reference as the result's dtype can hold it
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        diff = test(ours) != test(expect)
        assert not diff.any(), f"{what}: {name} positions differ from the float64 reference at {_where(diff)}"
    fin = torch.isfinite(expect)
    if not fin.any():
        return
    a, r = ours.double()[fin], ref64.double()[fin]
    err = (a - r).abs().max().item()
    s = max(r.abs().max().item(), term_scale, 1e-300)
    if dtype in LOW:
        assert eager is not None, "low-precision comparisons need the eager result"
        e = eager.detach().double()[fin]
        e_err = (e - r)[torch.isfinite(e)].abs().max().item() if torch.isfinite(e).any() else 0.0
        if not torch.isfinite(e).all():  # eager itself over/underflowed: judge at the output's rounding
            e_err = max(e_err, torch.finfo(dtype).eps * s)
        tol = 2.0 * e_err + torch.finfo(dtype).eps * s
    else:
        tol = FP32_RTOL * s
    # Results in the subnormal range hold only a few bits: float32 steps by 1.4e-45 there, and the
    # squares of inputs at ~1e-22 (a variance) are subnormal in any float32 arithmetic. A few
    # steps of that grid, far below every normal number (a fresh fuzz seed found a running_var of
    # 2.2e-43 off by 8e-46, under one step, against a relative tolerance of 4e-48).
    fi = torch.finfo(dtype)
    tol = max(tol, 16 * fi.tiny * fi.eps)  # fi.tiny * fi.eps: the smallest subnormal
    if err > tol and dtype == torch.bfloat16 and _INTERPRET:
        # Triton's interpreter rounds fp32 values below 2^-126 wrongly when it stores them as bf16
        # (a store of 1.56e-40 reads back 8.17e-39; torch's .to(bfloat16) and a GPU's
        # cvt.rn.bf16.f32 give 1.84e-40): a bf16 running_var of values at ~1e-20 (fuzz seed
        # 1024219153). There, values below 2^-126 are judged within that range's width.
        tiny = torch.finfo(torch.float32).tiny
        sub = r.abs() < tiny
        allowed = torch.full_like(r, tol)
        allowed[sub] = max(tol, tiny)
        bad = (a - r).abs() > allowed
        err = 0.0 if not bad.any() else (a - r).abs()[bad].max().item()
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} (scale {s:.3e}, {dtype})"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads included): the byte images of two tensors are equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    def image(t):  # a dense copy: view(uint8) needs unit stride, whatever t's strides are
        return torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().reshape(-1)).view(torch.uint8)
    return torch.equal(image(a), image(b))
