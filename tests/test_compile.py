"""torch.compile(fullgraph=True) over the functionals, patched models and the modules: no graph
break (fullgraph raises on one), same outputs, gradients and running-statistic updates as eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import FP32_RTOL, max_err, scale
from tritonorm import functional as tf
from tritonorm.nn.modules import Norm
from tritonorm.nn.switchable import SwitchNorm2d
from tritonorm.patching import patch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _close(a, b, what):
    err, s = max_err(a, b), scale(b)
    assert err <= FP32_RTOL * s + 1e-7, f"{what}: compiled differs from eager by {err:.3e} (scale {s:.3e})"


def _check(fn, inputs, backend="aot_eager"):
    """Compile ``fn``, run it and eager on copies of ``inputs``; compare outputs and gradients."""
    eager_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    comp_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    y_e, y_c = fn(*eager_in), compiled(*comp_in)
    _close(y_c, y_e, "output")
    dy = torch.randn_like(y_e)
    y_e.backward(dy)
    y_c.backward(dy)
    for i, (a, b) in enumerate(zip(comp_in, eager_in)):
        if b.requires_grad:
            _close(a.grad, b.grad, f"grad of input {i}")
    return comp_in, eager_in


def test_functional_batch_norm_updates_running_stats_under_compile():
    def fn(x, w, b, rm, rv):
        return tf.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, activation="relu")

    x = torch.randn(3, 4, 3, 3, requires_grad=True)
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    comp_in, eager_in = _check(fn, [x, w, b, torch.zeros(4), torch.ones(4)])
    _close(comp_in[3], eager_in[3], "running_mean")
    _close(comp_in[4], eager_in[4], "running_var")
    assert not torch.equal(comp_in[4], torch.ones(4)), "running_var was not updated"


@pytest.mark.parametrize("name", ["group_norm", "layer_norm", "rms_norm", "instance_norm"])
def test_functionals_trace_without_graph_break(name):
    x = torch.randn(2, 4, 3, 4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    fns = {
        "group_norm": lambda x, w, b: tf.group_norm(x, 2, w, b, activation="silu"),
        "layer_norm": lambda x, w, b: tf.layer_norm(x, (4,), w, b, activation="gelu"),
        "rms_norm": lambda x, w, b: tf.rms_norm(x, (4,), w, eps=1e-6) + b,
        "instance_norm": lambda x, w, b: tf.instance_norm(x, weight=w, bias=b),
    }
    _check(fns[name], [x, w, b])


def _patched_cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(),
                         nn.LayerNorm(36))


def test_patched_model_train_and_eval_under_compile():
    model = patch(_patched_cnn())
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        model.train(training)
        twin.train(training)
        x = torch.randn(3, 2, 3, 3)
        y_c, y_e = compiled(x), twin(x)
        _close(y_c, y_e, "output")
        y_c.square().sum().backward()
        y_e.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            _close(p.grad, q.grad, f"grad {name}")
        for (name, a), b in zip(model.named_buffers(), twin.buffers()):
            if a.is_floating_point():
                _close(a, b, name)
            else:
                assert torch.equal(a, b), name


def test_norm_and_switch_norm_modules_under_compile():
    norm = Norm(4, "batch_group", num_groups=2, track_running_stats=True, activation="tanh")
    twin = copy.deepcopy(norm)
    x = torch.randn(3, 4, 2, 2)
    _close(torch.compile(norm, fullgraph=True, backend="aot_eager")(x), twin(x), "Norm output")
    _close(norm.running_var, twin.running_var, "Norm running_var")

    sn = SwitchNorm2d(4)
    sn_twin = copy.deepcopy(sn)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_c = torch.compile(sn, fullgraph=True, backend="aot_eager")(x)
    y_e = sn_twin(x2)
    _close(y_c, y_e, "SwitchNorm2d output")
    dy = torch.randn_like(y_e)
    y_c.backward(dy)
    y_e.backward(dy)
    _close(x.grad, x2.grad, "SwitchNorm2d dx")
    _close(sn.mean_weight.grad, sn_twin.mean_weight.grad, "SwitchNorm2d dmean_weight")
    _close(sn.running_var, sn_twin.running_var, "SwitchNorm2d running_var")


def test_inductor_group_norm_silu():
    # One inductor run (the CPU backend compiles C++: slow); the op stays a custom op in the graph.
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    _check(lambda x, w, b: tf.group_norm(x, 2, w, b, activation="silu") * 2, [x, w, b], backend="inductor")


@pytest.mark.parametrize("name", ["group_norm", "layer_norm"])
def test_dynamic_shapes_compile_fullgraph_against_float64(name):
    """torch.compile(dynamic=True): sizes and float arguments are symbolic, so the argument checks
    must trace (math.isfinite on a symbolic eps did not). Two shapes through one compiled
    function, forward and backward against float64 PyTorch."""
    import torch.nn.functional as F

    from helpers import assert_close

    if name == "group_norm":
        def fn(x, w, b, eps):
            return tf.group_norm(x, 4, w, b, eps=eps, activation="silu")

        def ref(x, w, b, eps):
            return F.silu(F.group_norm(x, 4, w, b, eps=eps))
        shapes, c = [(2, 8, 4, 4), (3, 8, 6, 5)], 8
    else:
        def fn(x, w, b, eps):
            return tf.layer_norm(x, (x.shape[-1],), w, b, eps=eps)

        def ref(x, w, b, eps):
            return F.layer_norm(x, (x.shape[-1],), w, b, eps=eps)
        shapes, c = [(3, 5, 16), (2, 7, 16)], 16
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        w, b = torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True)
        y = compiled(x, w, b, 1e-3)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), dy)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        y64 = ref(x64, w64, b64, 1e-3)
        grads64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
        assert_close(y, y64, torch.float32)
        for g, g64 in zip(grads, grads64):
            assert_close(g, g64, torch.float32)
