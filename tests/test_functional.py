"""tritonorm.functional against torch.nn.functional (float64 on both sides as the oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tritonorm.functional as TF
from helpers import assert_close
from tritonorm.kernels import launch


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _compare(ours_fn, torch_fn, tensors, dy, stateful=()):
    """Run ours in fp32 (Triton) and torch in float64 on copies; compare outputs, grads, state."""
    ours_in = [t.clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]
    ref_in = [t.double().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]
    st_ours = [s.clone() for s in stateful]
    st_ref = [s.double().clone() for s in stateful]
    y = ours_fn(*ours_in, *st_ours)
    y64 = torch_fn(*ref_in, *st_ref)
    assert_close(y, y64, torch.float32)
    live = [i for i, t in enumerate(ours_in) if t is not None]
    g = torch.autograd.grad(y, [ours_in[i] for i in live], dy)
    g64 = torch.autograd.grad(y64, [ref_in[i] for i in live], dy.double())
    for a, e in zip(g, g64):
        assert_close(a, e, torch.float32, what="grad")
    for a, e in zip(st_ours, st_ref):
        assert_close(a, e, torch.float32, what="running stat")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 3, 2)])
def test_batch_norm(shape, training):
    x, w, b, dy = torch.randn(shape), torch.randn(shape[1]), torch.randn(shape[1]), torch.randn(shape)
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    _compare(lambda x, w, b, rm, rv: TF.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-4),
             lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-4),
             [x, w, b], dy, stateful=[rm, rv])


@pytest.mark.parametrize("shape,groups", [((2, 6, 4, 4), 3), ((3, 4, 5), 2), ((3, 12), 3), ((1, 6, 2, 2, 2), 6)])
def test_group_norm(shape, groups):
    x, w, b, dy = torch.randn(shape), torch.randn(shape[1]), torch.randn(shape[1]), torch.randn(shape)
    _compare(lambda x, w, b: TF.group_norm(x, groups, w, b, 1e-5),
             lambda x, w, b: F.group_norm(x, groups, w, b, 1e-5), [x, w, b], dy)


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm(use_input_stats):
    shape = (3, 4, 5, 3)
    x, w, b, dy = torch.randn(shape), torch.randn(4), torch.randn(4), torch.randn(shape)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    _compare(lambda x, w, b, rm, rv: TF.instance_norm(x, rm, rv, w, b, use_input_stats, 0.3),
             lambda x, w, b, rm, rv: F.instance_norm(x, rm, rv, w, b, use_input_stats, 0.3),
             [x, w, b], dy, stateful=[rm, rv])


@pytest.mark.parametrize("shape,normalized", [((2, 5, 33), (33,)), ((3, 4, 6), (4, 6)), ((7, 16), (16,))])
def test_layer_norm_and_rms_norm(shape, normalized):
    x, dy = torch.randn(shape), torch.randn(shape)
    w, b = torch.randn(normalized), torch.randn(normalized)
    _compare(lambda x, w, b: TF.layer_norm(x, normalized, w, b),
             lambda x, w, b: F.layer_norm(x, normalized, w, b), [x, w, b], dy)
    _compare(lambda x, w: TF.rms_norm(x, normalized, w, 1e-6),
             lambda x, w: F.rms_norm(x, normalized, w, 1e-6), [x, w], dy)


def test_rms_norm_default_eps_is_the_dtype_epsilon():
    x = torch.randn(3, 8) * 1e-4
    ours = TF.rms_norm(x, (8,))
    ref = F.rms_norm(x.double(), (8,), eps=torch.finfo(torch.float32).eps)
    assert_close(ours, ref, torch.float32)


def test_fused_extras_match_composition():
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    w, b = torch.randn(16), torch.randn(16)
    ours = TF.layer_norm(x, (16,), w, b, residual=r, activation="gelu_tanh")
    ref = F.gelu(F.layer_norm(x.double(), (16,), w.double(), b.double()) + r.double(), approximate="tanh")
    assert_close(ours, ref, torch.float32)
