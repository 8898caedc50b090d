"""IterNorm and DBN against float64 references: outputs, gradients, covariance, running stats.

Tolerances: fp32 by tests/helpers.py (2e-5 of the output's scale), outputs and gradients. bf16:
the eager baseline is the fp32 computation rounded to bf16 (eigh takes no bf16), ours may be at
most twice its error plus one bf16 ulp of the output's scale.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from no_sync import cuda_sync_errors, forbid_host_reads
from tritonorm import orth
from tritonorm.nn.whitening import DBN, IterNorm
from tritonorm.orth import reference


def _correlated(n, c, device):
    """n samples of c correlated channels, standard deviations 1..2 along random axes.

    Covariance condition ~4: the uncoupled Newton iteration amplifies fp32 rounding once it has
    converged on worse-conditioned matrices (ALGORITHMS §2), which is not what these tests probe.
    """
    q, _ = torch.linalg.qr(torch.randn(c, c, device=device))
    return (torch.randn(n, c, device=device) * torch.linspace(1.0, 2.0, c, device=device)) @ q.T


def _make(kind, c, **kw):
    return IterNorm(c, **kw) if kind == "iternorm" else DBN(c, **kw)


def _method(kind):
    return "newton" if kind == "iternorm" else "eigen"


# (input shape, num_channels): why each is here.
CASES = [
    ((64, 6), None),          # (N, C), one group of 6 channels
    ((8, 10, 3, 3), 4),       # (N, C, H, W), groups 4, 4 and a smaller last group of 2
    ((8, 16, 5), 16),         # (N, C, L), one group of exactly BLOCK_N = 16 channels (m = 40)
]


@pytest.mark.parametrize("kind", ["iternorm", "dbn"])
@pytest.mark.parametrize("shape,nc", CASES)
def test_train_forward_backward_fp32(kind, shape, nc, device):
    c = shape[1]
    layer = _make(kind, c, num_channels=nc, affine=True).to(device)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = (torch.randn(shape, device=device) * 2 + 1).requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    xhat, means, wms = reference.whiten(x64, layer.group_size, _method(kind), layer.T, layer.eps)
    bshape = (1, c) + (1,) * (x.dim() - 2)
    y64 = xhat * w64.reshape(bshape) + layer.bias.detach().double().reshape(bshape)
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="y")
    assert_close(x.grad, x64.grad, torch.float32, what="dx")
    assert_close(layer.weight.grad, w64.grad, torch.float32, what="dweight")
    # Running stats after one step from (0, I): momentum · batch + (1 − momentum) · initial.
    m = layer.momentum
    rm = torch.cat([mu.reshape(-1) for mu in means])
    assert_close(_unpad_mean(layer), m * rm, torch.float32, what="running_mean")
    for got, wm in zip(_unpad_wm(layer), [w for ws in wms for w in ws], strict=True):
        eye = torch.eye(wm.shape[-1], dtype=torch.float64, device=device)
        assert_close(got, (1 - m) * eye + m * wm, torch.float32, what="running_wm")


def _unpad_mean(layer):
    c, size = layer.num_features, layer.group_size
    return torch.cat([layer.running_mean[g, :min(size, c - g * size), 0] for g in range(layer.num_groups)])


def _unpad_wm(layer):
    c, size = layer.num_features, layer.group_size
    return [layer.running_wm[g, :k, :k] for g in range(layer.num_groups) for k in [min(size, c - g * size)]]


@pytest.mark.parametrize("kind", ["iternorm", "dbn"])
def test_train_bf16(kind, device):
    layer = _make(kind, 8, num_channels=4).to(device)
    x = torch.randn(32, 8, device=device).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y64 = reference.whiten(x.double(), 4, _method(kind), 5, 1e-5)[0]
    y32 = reference.whiten(x.float(), 4, _method(kind), 5, 1e-5)[0]
    assert_close(y, y64, torch.bfloat16, eager=y32.bfloat16(), what="y")


def test_dbn_output_is_white(device):
    # ZCA: cov(x̂) = Σ^{-1/2}·(Σ − eps·I)·Σ^{-1/2} = I − eps·Σ^{-1}, exactly, per group.
    layer = DBN(6, num_channels=3).to(device)
    x = _correlated(200, 6, device) + 3.0
    y = layer(x).double()
    for g in range(2):
        yg = y[:, 3 * g:3 * g + 3]
        cov = (yg - yg.mean(0)).T @ (yg - yg.mean(0)) / yg.shape[0]
        xg = x[:, 3 * g:3 * g + 3].double()
        sigma = (xg - xg.mean(0)).T @ (xg - xg.mean(0)) / xg.shape[0] + 1e-5 * torch.eye(3, dtype=torch.float64)
        expect = torch.eye(3, dtype=torch.float64) - 1e-5 * torch.linalg.inv(sigma)
        assert (cov - expect).abs().max() <= 2e-5


def test_iternorm_covariance_follows_theory(device):
    # cov(x̂) = B_T·(Σ_N − eps/trΣ·I)·B_T: eigenvalues (λ − eps/trΣ)·b_T(λ)², λ = eig(Σ/trΣ).
    # Its distance to I shrinks with T.
    x = _correlated(300, 4, device)
    xc = (x - x.mean(0)).double()
    sigma = xc.T @ xc / x.shape[0] + 1e-5 * torch.eye(4, dtype=torch.float64)
    tr = sigma.trace()
    lam = torch.linalg.eigvalsh(sigma / tr)
    prev = float("inf")
    for t in range(1, 8):
        y = IterNorm(4, T=t, affine=False).to(device)(x).double()
        cov = (y - y.mean(0)).T @ (y - y.mean(0)) / y.shape[0]
        got = torch.linalg.eigvalsh(cov)
        expect = ((lam - 1e-5 / tr) * reference.newton_scalar(lam, t).square()).sort().values
        assert (got - expect).abs().max() <= 2e-5, f"T={t}"
        dist = (expect - 1).abs().max().item()
        assert dist < prev, f"T={t}: whitening error did not fall"
        prev = dist


@pytest.mark.parametrize("kind", ["iternorm", "dbn"])
def test_eval_uses_running_stats(kind, device):
    layer = _make(kind, 6, num_channels=4, momentum=0.5).to(device)
    for _ in range(2):
        layer(torch.randn(16, 6, 2, 2, device=device))
    layer.eval()
    before = (layer.running_mean.clone(), layer.running_wm.clone())
    x = torch.randn(3, 6, 2, 2, device=device)
    y = layer(x)
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_wm, before[1])
    x64 = x.double()
    parts = []
    for start, count, size, xg in reference.channel_groups(x64, 4):
        g = slice(start // 4, start // 4 + count)
        parts.append(layer.running_wm[g, :size, :size].double() @ (xg - layer.running_mean[g, :size].double()))
    expect = reference.ungroup(parts, x.shape)
    if layer.affine:
        expect = expect * layer.weight.double().reshape(1, -1, 1, 1) + layer.bias.double().reshape(1, -1, 1, 1)
    assert_close(y, expect, torch.float32, what="eval y")


@pytest.mark.filterwarnings("ignore:(overflow|invalid value):RuntimeWarning")  # the blow-up itself
def test_iternorm_divergence_falls_back_to_standardization(device):
    # 16 channels, 17 samples: centred rank 16 with λ_min ~ eps, the iteration blows up at T = 30.
    # The group is standardized instead (wm = diag(Σ)^{-1/2}), counted, and training goes on.
    layer = IterNorm(16, T=30).to(device)
    x = torch.randn(17, 16, device=device, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    var, mu = torch.var_mean(x64, dim=0, unbiased=False)
    y64 = (x64 - mu) / (var + layer.eps).sqrt()
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="y (standardized)")
    assert_close(x.grad, x64.grad, torch.float32, what="dx")
    m = layer.momentum
    eye = torch.eye(16, dtype=torch.float64, device=device)
    assert_close(layer.running_wm[0], (1 - m) * eye + m * torch.diag((var + layer.eps).rsqrt()).detach(),
                 torch.float32, what="running_wm (the matrix used)")
    assert orth.event_counts(layer) == {"fallbacks": 1, "nonfinite": 0}
    with pytest.raises(FloatingPointError, match="fallbacks=1"):
        orth.check(layer)


@pytest.mark.parametrize("kind", ["iternorm", "dbn"])
def test_non_finite_input_is_counted_and_spares_running_stats(kind, device):
    layer = _make(kind, 6, num_channels=4).to(device)
    x = torch.randn(16, 6, device=device)
    x[5, 1] = float("inf")  # group 0 (channels 0-3); group 1 (channels 4, 5) is finite
    y = layer(x)
    assert not torch.isfinite(y[:, :4]).any()
    y64 = reference.whiten(x[:, 4:].double(), 4, _method(kind), 5, 1e-5)[0]
    assert_close(y[:, 4:], y64 if layer.weight is None else y64 * layer.weight[4:].double(), torch.float32,
                 what="y of the finite group")
    assert torch.equal(layer.running_mean[0], torch.zeros(4, 1, device=device))
    assert torch.equal(layer.running_wm[0], torch.eye(4, device=device))
    assert torch.isfinite(layer.running_wm).all() and layer.running_mean[1].abs().sum() > 0
    assert orth.event_counts(layer)["nonfinite"] == 1
    with pytest.raises(FloatingPointError, match="nonfinite=1"):
        orth.check(layer)


def _pair(device):
    """IterNorm then DBN on (8, 10, 3, 3) with uneven groups, and its float64 reference."""
    it = IterNorm(10, num_channels=4, T=4).to(device)
    dbn = DBN(10, num_channels=3).to(device)
    with torch.no_grad():
        it.weight.uniform_(0.5, 1.5)

    def reference64(x64, w64):
        h = reference.whiten(x64, 4, "newton", 4, 1e-5)[0] * w64.reshape(1, -1, 1, 1)
        h = h + it.bias.detach().double().reshape(1, -1, 1, 1)
        return reference.whiten(h, 3, "eigen", 1, 1e-5)[0]

    return it, dbn, (lambda x: dbn(it(x))), reference64


def _check_pair_step(it, y, reference64, x, dy):
    x64 = x.detach().double().requires_grad_()
    w64 = it.weight.detach().double().requires_grad_()
    y64 = reference64(x64, w64)
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="y")
    assert_close(x.grad, x64.grad, torch.float32, what="dx")
    assert_close(it.weight.grad, w64.grad, torch.float32, what="dweight")


def test_training_step_reads_nothing_on_host(device):
    # forward + backward of IterNorm and DBN under a guard that raises on any .item(),
    # bool(tensor), float(tensor), tolist()... (tests/no_sync.py).
    it, dbn, forward, reference64 = _pair(device)
    x = (torch.randn(8, 10, 3, 3, device=device) * 2 + 1).requires_grad_()
    dy = torch.randn(8, 10, 3, 3, device=device)
    with forbid_host_reads():
        y = forward(x)
        y.backward(dy)
    _check_pair_step(it, y, reference64, x, dy)


@pytest.mark.gpu
def test_iternorm_step_does_not_sync_cuda(device):
    # PyTorch's own detector on a GPU (DBN is left out: torch.linalg.eigh syncs by design).
    layer = IterNorm(10, num_channels=4).to(device)
    x = torch.randn(8, 10, 3, 3, device=device)
    layer(x).sum().backward()  # compile the kernels outside the check
    with cuda_sync_errors():
        layer(x).sum().backward()


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's note about lru_cache in backend.py
def test_training_step_compiles_fullgraph(device):
    # A host read or a Python branch on a tensor value is a graph break: fullgraph=True fails on it.
    it, dbn, forward, reference64 = _pair(device)
    f = torch.compile(forward, fullgraph=True, backend="aot_eager")
    x = (torch.randn(8, 10, 3, 3, device=device) * 2 + 1).requires_grad_()
    dy = torch.randn(8, 10, 3, 3, device=device)
    y = f(x)
    y.backward(dy)
    _check_pair_step(it, y, reference64, x, dy)
    assert orth.event_counts(it) == {"fallbacks": 0, "nonfinite": 0}


@pytest.mark.parametrize("kwargs,exc,name", [
    ({"num_groups": 0}, ValueError, "num_groups"),
    ({"num_channels": 0}, ValueError, "num_channels"),
    ({"T": 0}, ValueError, "T"),
    ({"momentum": 2.0}, ValueError, "momentum"),
    ({"eps": 0.0}, ValueError, "eps"),
])
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        IterNorm(8, **kwargs)


def test_bad_inputs(device):
    layer = DBN(4).to(device)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(3, 5, device=device))
    with pytest.raises(ValueError, match="more than 1"):
        layer(torch.randn(1, 4, device=device))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(3, 4, dtype=torch.int64, device=device))
