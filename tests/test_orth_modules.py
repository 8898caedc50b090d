"""OrthLinear, OrthConv1d/2d/3d and CenteredWeightNorm against float64 functional references.

Tolerances: fp32 by tests/helpers.py (2e-5 of the output's scale) for outputs and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_close
from no_sync import cuda_sync_errors, forbid_host_reads
from tritonorm import orth
from tritonorm.nn.orth import (CenteredWeightNorm, OrthConv1d, OrthConv2d, OrthConv3d, OrthLinear,
                               centered_weight_norm)
from tritonorm.orth import api, reference


def _ref_weight64(layer, method):
    """float64 ``scale · orthogonalize(weight)`` with autograd to the weight and scale copies."""
    w64 = layer.weight.detach().double().requires_grad_()
    s64 = layer.scale.detach().double().requires_grad_()
    v = reference.orthogonalize(w64, method, layer.group_size, layer.iters, layer.eps)
    return w64, s64, v * s64.reshape(-1, *([1] * (w64.dim() - 1)))


@pytest.mark.parametrize("method", ["newton_schulz", "eigen"])
@pytest.mark.parametrize("learnable", [False, True])
def test_orth_linear_train(method, learnable, device):
    layer = OrthLinear(40, 12, method=method, group_size=8, learnable_scale=learnable, device=device)
    assert torch.equal(layer.scale, torch.ones(12, device=device))  # linear default: 1
    x = torch.randn(5, 40, device=device)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w64, s64, wref = _ref_weight64(layer, method)
    b64 = layer.bias.detach().double().requires_grad_()
    y64 = F.linear(x.double(), wref, b64)
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="y")
    assert_close(layer.weight.grad, w64.grad, torch.float32, what="dweight")
    assert_close(layer.bias.grad, b64.grad, torch.float32, what="dbias")
    if learnable:
        assert_close(layer.scale.grad, s64.grad, torch.float32, what="dscale")
    else:
        assert not isinstance(layer.scale, nn.Parameter)


@pytest.mark.parametrize("cls,conv,in_shape,kernel", [
    (OrthConv1d, F.conv1d, (2, 6, 9), 3),
    (OrthConv2d, F.conv2d, (2, 4, 6, 6), (3, 3)),
    (OrthConv3d, F.conv3d, (1, 2, 4, 4, 4), 2),
])
def test_orth_conv_train(cls, conv, in_shape, kernel, device):
    layer = cls(in_shape[1], 10, kernel, padding=1, group_size=4, iters=3, device=device)
    assert torch.allclose(layer.scale, torch.full((10,), math.sqrt(2.0), device=device))  # conv default √2
    x = torch.randn(in_shape, device=device)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w64, _, wref = _ref_weight64(layer, "newton_schulz")
    y64 = conv(x.double(), wref, layer.bias.detach().double(), padding=1)
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="y")
    assert_close(layer.weight.grad, w64.grad, torch.float32, what="dweight")


def test_eval_caches_until_weight_changes(monkeypatch, device):
    layer = OrthLinear(20, 6, device=device).eval()
    calls = []
    real = api.orthogonalize
    monkeypatch.setattr(api, "orthogonalize", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 20, device=device)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
        assert len(calls) == 1 and torch.equal(y1, y2)
        layer.weight.add_(torch.randn_like(layer.weight))  # an optimizer step, in place
        y3 = layer(x)
        assert len(calls) == 2
    _, _, wref = _ref_weight64(layer, "newton_schulz")
    assert_close(y3, F.linear(x.double(), wref, layer.bias.double()), torch.float32, what="y after update")
    # Eval with gradients wanted: recomputed each call, and gradients reach the weight.
    layer(x).sum().backward()
    assert len(calls) == 3 and layer.weight.grad is not None
    # Training mode never uses the cache.
    layer.train()
    with torch.no_grad():
        layer(x)
        layer(x)
    assert len(calls) == 5


def _net(device):
    """OrthConv2d → flatten → OrthLinear (ONI and OLM), and its float64 functional reference."""
    conv = OrthConv2d(3, 6, 3, group_size=3, iters=4, device=device)
    lin = OrthLinear(6 * 3 * 3, 5, method="eigen", device=device)

    def forward(x):
        return lin(conv(x).flatten(1))

    def reference64(x):
        wc64, _, wc = _ref_weight64(conv, "newton_schulz")
        wl64, _, wl = _ref_weight64(lin, "eigen")
        h = F.conv2d(x.double(), wc, conv.bias.detach().double())
        return (wc64, wl64), F.linear(h.flatten(1), wl, lin.bias.detach().double())

    return (conv, lin), forward, reference64


def _check_step(layers, y, reference64, x, dy):
    (wc64, wl64), y64 = reference64(x)
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="y")
    assert_close(layers[0].weight.grad, wc64.grad, torch.float32, what="conv dweight")
    assert_close(layers[1].weight.grad, wl64.grad, torch.float32, what="linear dweight")


def test_training_step_reads_nothing_on_host(device):
    # forward + backward of OrthConv2d (Newton-Schulz) and OrthLinear (eigen) under a guard that
    # raises on any .item(), bool(tensor), float(tensor), tolist()... (tests/no_sync.py).
    layers, forward, reference64 = _net(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    dy = torch.randn(2, 5, device=device)
    with forbid_host_reads():
        y = forward(x)
        y.backward(dy)
    _check_step(layers, y, reference64, x, dy)
    assert orth.event_counts(layers[0]) == {"fallbacks": 0, "nonfinite": 0}


@pytest.mark.gpu
def test_training_step_does_not_sync_cuda(device):
    # The same on a GPU with PyTorch's sync detector (C++ syncs included). ONI layers only:
    # method="eigen" calls torch.linalg.eigh, which syncs by PyTorch's design.
    conv = OrthConv2d(3, 6, 3, group_size=3, iters=4, device=device)
    lin = OrthLinear(6 * 3 * 3, 5, device=device)
    x = torch.randn(2, 3, 5, 5, device=device)
    lin(conv(x).flatten(1)).sum().backward()  # compile the kernels outside the check
    with cuda_sync_errors():
        lin(conv(x).flatten(1)).sum().backward()
    assert orth.event_counts(conv) == {"fallbacks": 0, "nonfinite": 0}


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's note about lru_cache in backend.py
def test_training_step_compiles_fullgraph(device):
    # A host read or a Python branch on a tensor value is a graph break, which fullgraph=True
    # turns into an error. aot_eager traces forward and backward without generating code.
    layers, forward, reference64 = _net(device)
    f = torch.compile(forward, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 5, 5, device=device)
    dy = torch.randn(2, 5, device=device)
    y = f(x)
    y.backward(dy)
    _check_step(layers, y, reference64, x, dy)


@pytest.mark.filterwarnings("ignore:(overflow|invalid value):RuntimeWarning")  # the blow-up itself
def test_layer_falls_back_and_counts_divergence(device):
    # 16 outputs of 17 inputs at T = 30: the Newton iteration blows up (tests/test_orth.py). The
    # layer trains on the fallback (rows centred and scaled to unit norm), counts it, and only
    # check() raises.
    layer = OrthLinear(17, 16, iters=30, device=device)
    x = torch.randn(4, 17, device=device)
    y = layer(x)
    y.square().sum().backward()
    w64 = layer.weight.detach().double()
    wc = w64 - w64.mean(1, keepdim=True)
    expect = F.linear(x.double(), wc / (wc.square().sum(1, keepdim=True) + 1e-5).sqrt(), layer.bias.double())
    assert_close(y, expect, torch.float32, what="y on the fallback")
    assert torch.isfinite(layer.weight.grad).all()
    model = nn.Sequential(nn.Linear(17, 17), layer)
    assert orth.event_counts(model) == {"fallbacks": 1, "nonfinite": 0}
    with pytest.raises(FloatingPointError, match=r"1: fallbacks=1"):  # named by its path in the model
        orth.check(model)
    assert "orth_events" not in layer.state_dict()
    orth.reset_events(model)
    orth.check(model)


def test_state_dict_compatible_with_plain_layers(device):
    plain = nn.Conv2d(3, 8, 3, device=device)
    layer = OrthConv2d(3, 8, 3, device=device)
    layer.load_state_dict(plain.state_dict())
    assert torch.equal(layer.weight, plain.weight)
    plain.load_state_dict(layer.state_dict())


@pytest.mark.parametrize("kwargs,exc,name", [
    ({"method": "qr"}, ValueError, "method"),
    ({"iters": 0}, ValueError, "iters"),
    ({"group_size": 0}, ValueError, "group_size"),
    ({"scale": "big"}, TypeError, "scale"),
])
def test_module_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        OrthLinear(10, 4, **kwargs)


def test_cwn_matches_closed_form(device):
    # Forward and the Lua closed-form gradient (ALGORITHMS §8) with eps = 0, in float64:
    # ∇v = (g/‖v_c‖)·(∇w − mean(∇w) − (ŵ·∇w)·ŵ), per output row.
    conv = nn.Conv2d(3, 5, 3, device=device, dtype=torch.float64)
    centered_weight_norm(conv, scale=1.7, eps=0.0)
    v = conv.parametrizations.weight.original
    w = conv.weight
    flat = w.reshape(5, -1)
    assert flat.mean(1).abs().max() <= 1e-12
    assert (flat.norm(dim=1) - 1.7).abs().max() <= 1e-12
    gw = torch.randn_like(w)
    (w * gw).sum().backward()
    vc = v.detach().reshape(5, -1) - v.detach().reshape(5, -1).mean(1, keepdim=True)
    what = vc / vc.norm(dim=1, keepdim=True)
    g = gw.reshape(5, -1)
    expect = 1.7 / vc.norm(dim=1, keepdim=True) * (
        g - g.mean(1, keepdim=True) - (what * g).sum(1, keepdim=True) * what)
    assert (v.grad.reshape(5, -1) - expect).abs().max() <= 1e-12


def test_cwn_fp32_learnable_scale(device):
    lin = centered_weight_norm(nn.Linear(12, 4, device=device), learnable_scale=True)
    param = lin.parametrizations.weight[0].scale
    assert isinstance(param, nn.Parameter) and param.shape == (4,)
    x = torch.randn(3, 12, device=device)
    lin(x).sum().backward()
    v64 = lin.parametrizations.weight.original.detach().double().requires_grad_()
    s64 = param.detach().double().requires_grad_()
    y64 = F.linear(x.double(), reference.centered_weight_norm(v64, s64, 1e-5), lin.bias.detach().double())
    y64.sum().backward()
    assert_close(lin.parametrizations.weight.original.grad, v64.grad, torch.float32, what="dv")
    assert_close(param.grad, s64.grad, torch.float32, what="dscale")


def test_cwn_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        centered_weight_norm(nn.Linear(3, 2), name="bias")
    with pytest.raises(ValueError, match="name"):
        centered_weight_norm(nn.Linear(3, 2), name="nope")
    with pytest.raises(ValueError, match="num_rows"):
        CenteredWeightNorm(learnable_scale=True)
    with pytest.raises(ValueError, match="eps"):
        CenteredWeightNorm(eps=-1.0)
