"""tritonorm.orthogonalize and its Newton-Schulz kernels against float64 references.

Tolerances: fp32 by tests/helpers.py (2e-5 of the output's scale), the same for gradients. bf16:
the eager baseline is the same algorithm in fp32 rounded to bf16 (``torch.linalg.eigh`` takes no
bf16, and that is the most accurate result a bf16 output can hold); ours may be at most twice its
error plus one bf16 ulp of the output's scale (the helpers' rule).

Shapes keep groups at most half their row length: the Newton iteration's fp32 rounding error grows
with the condition number of S, and ALGORITHMS §2 shows n ≈ d groups diverge (tested separately).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from helpers import assert_close, poison_
import no_sync
from no_sync import forbid_host_reads
from tritonorm import orth
from tritonorm.orth import orthogonalize, ops, reference

# (shape, group_size): why each is here.
SHAPES = [
    ((12, 40), None),        # one group, n not a power of two (padded to BLOCK 16)
    ((20, 4, 3, 3), 8),      # conv-shaped, groups of 8 with a smaller last group of 4
    ((32, 8, 3), 16),        # Conv1d-shaped, two full groups of exactly BLOCK_N = 16 rows
    ((24, 3, 2, 2, 4), 20),  # Conv3d-shaped, a group of 20 (BLOCK 32) and a tail of 4
]
METHODS = ["newton_schulz", "eigen"]


def _eigen_raw64(w64: torch.Tensor, group_size: int | None, eps: float) -> torch.Tensor:
    """OWN as the PyTorch reference computes it: autograd straight through ``eigh`` (float64)."""
    rows = w64.shape[0]
    z = w64.reshape(rows, -1)
    outs = []
    for start, count, size in reference.chunks(rows, group_size or rows):
        zg = z[start:start + count * size].reshape(count, size, -1)
        zc = zg - zg.mean(-1, keepdim=True)
        lam, u = torch.linalg.eigh(reference.gram(zc, eps))
        p = u @ torch.diag_embed(lam.rsqrt()) @ u.transpose(-1, -2)
        outs.append((p @ zc).reshape(count * size, -1))
    return torch.cat(outs).reshape(w64.shape)


def _oracle64(w: torch.Tensor, method: str, group_size, iters: int, eps: float = 1e-5):
    w64 = w.detach().double().requires_grad_()
    if method == "eigen":
        return w64, _eigen_raw64(w64, group_size, eps)
    return w64, reference.orthogonalize(w64, method, group_size, iters, eps)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,group_size", SHAPES)
def test_forward_backward_fp32(method, shape, group_size, device):
    w = torch.randn(shape, device=device, requires_grad=True)
    y = orthogonalize(w, method=method, group_size=group_size, iters=5)
    dy = torch.randn_like(y)
    y.backward(dy)
    w64, y64 = _oracle64(w, method, group_size, 5)
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="W")
    assert_close(w.grad, w64.grad, torch.float32, what="dL/dweight")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,group_size", [SHAPES[0], SHAPES[1]])
def test_forward_backward_bf16(method, shape, group_size, device):
    w = torch.randn(shape, device=device).bfloat16().requires_grad_()
    y = orthogonalize(w, method=method, group_size=group_size, iters=5)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    w64, y64 = _oracle64(w, method, group_size, 5)
    y64.backward(dy.double())
    w32 = w.detach().float().requires_grad_()
    y32 = reference.orthogonalize(w32, method, group_size, 5, 1e-5)
    y32.backward(dy.float())
    assert_close(y, y64, torch.bfloat16, eager=y32.bfloat16(), what="W")
    assert_close(w.grad, w64.grad, torch.bfloat16, eager=w32.grad.bfloat16(), what="dL/dweight")


def test_large_group_takes_batched_matmul_path(device):
    # 72 rows > MAX_FUSED_ROWS: the Newton steps run as batched matmuls (forward and backward).
    assert 72 > ops.MAX_FUSED_ROWS
    w = torch.randn(72, 160, device=device, requires_grad=True)
    y = orthogonalize(w, iters=4)
    dy = torch.randn_like(y)
    y.backward(dy)
    w64, y64 = _oracle64(w, "newton_schulz", None, 4)
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="W")
    assert_close(w.grad, w64.grad, torch.float32, what="dL/dweight")


def _random_sn(groups: int, n: int, device) -> torch.Tensor:
    """Random S/‖S‖_F with condition number ~10, float64 (G, n, n)."""
    z = torch.randn(groups, n, 3 * n, dtype=torch.float64, device=device)
    s = z @ z.transpose(-1, -2)
    return s / torch.linalg.matrix_norm(s)[:, None, None]


@pytest.mark.parametrize("groups,n", [(1, 5), (3, 16), (2, 23)])  # padded, exact BLOCK, BLOCK 32
def test_newton_kernels_direct(groups, n, device):
    iters = 4
    sn64 = _random_sn(groups, n, device).requires_grad_()
    sn = sn64.detach().float().contiguous()
    b = poison_(torch.empty_like(sn))
    hist = poison_(sn.new_empty(groups, iters, n, n))
    ops.newton_fwd(sn, iters, True, b=b, hist=hist)
    b64 = reference.newton_iterate(sn64, iters)
    assert_close(b, b64, torch.float32, what="B_T")
    for t in range(iters):
        assert_close(hist[:, t], reference.newton_iterate(sn64.detach(), t), torch.float32, what=f"B_{t}")
    db = torch.randn_like(sn)
    b64.backward(db.double())
    dsn = poison_(torch.empty_like(sn))
    ops.newton_bwd(sn, hist, db, dsn=dsn)
    assert_close(dsn, sn64.grad, torch.float32, what="dL/dS_N")


@pytest.mark.parametrize("group_size", [None, 6])
def test_singular_values_follow_scalar_iteration(group_size, device):
    # W·Wᵀ = B_T·S_N·B_T, so each singular value of W is √λ·b_T(λ) for λ an eigenvalue of
    # S_N = S/‖S‖_F; the orthogonality error max|λ·b_T(λ)² − 1| must fall with T as b_T converges.
    w = torch.randn(12, 30, device=device)
    prev = math.inf
    for iters in range(1, 7):
        y = orthogonalize(w, iters=iters, group_size=group_size)
        err_t = 0.0
        for start, count, size in reference.chunks(12, group_size or 12):
            z = w[start:start + count * size].double().reshape(count, size, -1)
            zc = z - z.mean(-1, keepdim=True)
            s = reference.gram(zc, 1e-5)
            lam = torch.linalg.eigvalsh(s / torch.linalg.matrix_norm(s)[:, None, None])
            predicted = (lam.sqrt() * reference.newton_scalar(lam, iters)).sort(dim=-1).values
            sv = torch.linalg.svdvals(y[start:start + count * size].double().reshape(count, size, -1))
            assert (sv.sort(dim=-1).values - predicted).abs().max() <= 2e-5, f"iters={iters}"
            group_err = (predicted.square() - 1).abs().max().item()
            wg = y[start:start + count * size].double().reshape(count, size, -1)
            eye = torch.eye(size, dtype=torch.float64, device=device)
            measured = torch.linalg.matrix_norm(wg @ wg.transpose(-1, -2) - eye, ord=2).max().item()
            assert abs(measured - group_err) <= 5e-5, f"iters={iters}: {measured} vs {group_err}"
            err_t = max(err_t, group_err)
        assert err_t < prev, f"orthogonality error did not fall at iters={iters}"
        prev = err_t


def test_newton_converges_to_eigen(device):
    # With enough steps on a well-conditioned group, ONI reaches OLM (same S^{-1/2}·Zc).
    w = torch.randn(8, 64, device=device)
    a = orthogonalize(w, method="newton_schulz", iters=12)
    b = orthogonalize(w, method="eigen")
    assert (a - b).abs().max() <= 1e-4


def test_eigen_backward_finite_with_repeated_eigenvalues(device):
    # Rows already orthogonal with equal norms: S = 9·I + eps·I, every eigenvalue repeated.
    # Autograd through eigh divides by λᵢ − λⱼ here; ours must be finite and right.
    m = torch.randn(4, 12, dtype=torch.float64, device=device)
    q, _ = torch.linalg.qr((m - m.mean(1, keepdim=True)).T)
    z = 3.0 * q.T + torch.randn(4, 1, dtype=torch.float64, device=device)  # row offsets are centred away
    w64 = z.clone().requires_grad_()
    torch.autograd.gradcheck(lambda v: reference.orthogonalize(v, "eigen", None, 5, 1e-5), (w64,))
    w = z.float().requires_grad_()
    orthogonalize(w, method="eigen").sum().backward()
    assert torch.isfinite(w.grad).all()


def _fallback64(w64: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The documented fallback of a diverged group, ``diag(S)^{-1/2}·Zc``: its centred rows
    scaled to ``1/sqrt(‖row‖² + eps)`` (float64)."""
    z = w64.reshape(w64.shape[0], -1)
    zc = z - z.mean(1, keepdim=True)
    return (zc / (zc.square().sum(1, keepdim=True) + eps).sqrt()).reshape(w64.shape)


def _diverging_and_stable_groups(device) -> torch.Tensor:
    """(32, 17): a random group of 16 rows of length 17 (centred rank 16 = n, so λ_min(S_N) ~ 1e-5:
    the iteration is finite garbage by T = 10, inf/NaN by T = 30), then 16 orthonormal centred
    rows times 3 (S = 9·I + eps·I, where the iteration is stable at any T)."""
    ones = torch.ones(17, 1, dtype=torch.float64, device=device)
    q, _ = torch.linalg.qr(torch.cat([ones, torch.randn(17, 16, dtype=torch.float64, device=device)], 1))
    stable = 3.0 * q[:, 1:].T + torch.randn(16, 1, dtype=torch.float64, device=device)  # offsets are centred away
    return torch.cat([torch.randn(16, 17, dtype=torch.float64, device=device), stable]).float()


@pytest.mark.filterwarnings("ignore:(overflow|invalid value):RuntimeWarning")  # the blow-up itself
@pytest.mark.parametrize("backend", ["auto", "reference"])  # fused kernel op / batched matmuls
@pytest.mark.parametrize("iters", [10, 30])  # finite garbage at 10, inf/NaN by 30
def test_newton_divergence_falls_back_per_group(iters, backend, device):
    w = _diverging_and_stable_groups(device).requires_grad_()
    events = orth.new_events(device)
    y = orthogonalize(w, iters=iters, group_size=16, backend=backend, events=events)
    dy = torch.randn_like(y)
    y.backward(dy)
    # Oracle: the fallback on the diverged group, float64 Newton-Schulz on the stable one.
    w64 = w.detach().double().requires_grad_()
    y64 = torch.cat([_fallback64(w64[:16]), reference.orthogonalize(w64[16:], "newton_schulz", 16, iters, 1e-5)])
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="W")
    assert_close(w.grad, w64.grad, torch.float32, what="dL/dweight")  # finite though B_T blew up
    assert orth.event_counts(events) == {"fallbacks": 1, "nonfinite": 0}
    with pytest.raises(FloatingPointError, match="fallbacks=1"):
        orth.check(events)
    orth.reset_events(events)
    orth.check(events)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_weight_gives_nan_group_and_is_counted(method, device):
    w = torch.randn(16, 20, device=device)
    w[3, 5] = float("nan")
    events = orth.new_events(device)
    y = orthogonalize(w, method=method, group_size=8, events=events)
    assert torch.isnan(y[:8]).all(), "the group with the NaN is NaN, not a plausible number"
    w64, y64 = _oracle64(w[8:], method, 8, 5)
    assert_close(y[8:], y64, torch.float32, what="W of the finite group")
    counts = orth.event_counts(events)
    assert counts["nonfinite"] == 1 and counts["fallbacks"] == (1 if method == "newton_schulz" else 0)
    with pytest.raises(FloatingPointError, match="nonfinite=1"):
        orth.check(events)


def test_host_read_guard_catches_reads():
    no_sync.self_test()  # the guard the no-host-read tests rely on


@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_read_nothing_on_host(method, device):
    # No .item(), bool(tensor), float(tensor)... anywhere in forward or backward, even when a
    # group diverges (the fallback is chosen on the device).
    w = _diverging_and_stable_groups(device).requires_grad_()
    events = orth.new_events(device)
    with forbid_host_reads():
        y = orthogonalize(w, method=method, group_size=16, iters=10, events=events)
        y.backward(torch.randn_like(y))
    if method == "eigen":
        _, y64 = _oracle64(w, method, 16, 10)
    else:
        w64 = w.detach().double()
        y64 = torch.cat([_fallback64(w64[:16]), reference.orthogonalize(w64[16:], method, 16, 10, 1e-5)])
    assert_close(y, y64, torch.float32, what="W")
    assert orth.event_counts(events)["fallbacks"] == (1 if method == "newton_schulz" else 0)


def test_events_argument_is_checked(device):
    w = torch.randn(4, 10, device=device)
    for bad, exc in ((torch.zeros(2), TypeError), (torch.zeros(3, dtype=torch.int64), TypeError), ([0, 0], TypeError),
                     (torch.zeros(2, dtype=torch.int64, device="meta"), ValueError)):
        with pytest.raises(exc, match="events"):
            orthogonalize(w, events=bad)
    with pytest.raises(TypeError, match="source"):
        orth.check("model")


@pytest.mark.parametrize("kwargs,exc,name", [
    ({"method": "svd"}, ValueError, "method"),
    ({"iters": 0}, ValueError, "iters"),
    ({"iters": 2.0}, TypeError, "iters"),
    ({"group_size": 0}, ValueError, "group_size"),
    ({"group_size": True}, TypeError, "group_size"),
    ({"eps": -1.0}, ValueError, "eps"),
    ({"backend": "cuda"}, ValueError, "backend"),
])
def test_bad_arguments(kwargs, exc, name, device):
    w = torch.randn(4, 10, device=device)
    before = w.clone()
    with pytest.raises(exc, match=name):
        orthogonalize(w, **kwargs)
    assert torch.equal(w, before)


def test_bad_weight():
    with pytest.raises(ValueError, match="weight"):
        orthogonalize(torch.randn(10))
    with pytest.raises(TypeError, match="weight"):
        orthogonalize(torch.ones(4, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight"):
        orthogonalize([[1.0, 2.0]])


def test_group_larger_than_row_warns(device):
    with pytest.warns(UserWarning, match="cannot be orthonormal"):
        orthogonalize(torch.randn(6, 5, device=device), method="eigen")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        orthogonalize(torch.randn(6, 5, device=device), method="eigen", group_size=4)


def test_reference_backend_float64(device):
    w = torch.randn(10, 30, dtype=torch.float64, device=device)
    y = orthogonalize(w, backend="reference", iters=5)
    assert y.dtype == torch.float64
    assert torch.equal(y, reference.orthogonalize(w, "newton_schulz", None, 5, 1e-5))


def test_registered_op_passes_opcheck(device):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch of the kernel op.
    sn = _random_sn(2, 5, device).float().requires_grad_()
    torch.library.opcheck(ops._newton_fwd_op, (sn, 3, True))
    b, _, bad = ops._newton_fwd_op(sn.detach(), 3, False)
    assert bad.dtype == torch.bool and bad.shape == (2,) and not bad.any()


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's note about lru_cache in backend.py
def test_traces_under_torch_compile_fullgraph(device):
    w = torch.randn(12, 40, device=device, requires_grad=True)
    f = torch.compile(lambda v: orthogonalize(v, group_size=6), fullgraph=True, backend="aot_eager")
    y = f(w)
    dy = torch.randn_like(y)
    y.backward(dy)
    w64, y64 = _oracle64(w, "newton_schulz", 6, 5)
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="W (compiled)")
    assert_close(w.grad, w64.grad, torch.float32, what="dL/dweight (compiled)")
