"""diffusers' adaptive norms on tritonorm (tritonorm.nn.adaptive) against the float64 original."""

from __future__ import annotations

import copy

import pytest
import torch

import tritonorm
from helpers import assert_close
from tritonorm.kernels import launch

dn = pytest.importorskip("diffusers.models.normalization")
from tritonorm.nn import adaptive  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def _modules():
    return [
        ("group", lambda: dn.AdaGroupNorm(8, 6, 2, act_fn="silu")),
        ("ln chunk1", lambda: dn.AdaLayerNorm(8, output_dim=12, chunk_dim=1)),
        ("ln affine", lambda: dn.AdaLayerNorm(8, output_dim=16, norm_elementwise_affine=True)),
        ("zero", lambda: dn.AdaLayerNormZero(8)),
        ("continuous", lambda: dn.AdaLayerNormContinuous(8, 5)),
    ]


@pytest.mark.parametrize("name,make", _modules(), ids=[n for n, _ in _modules()])
def test_forward_and_backward_match_the_float64_original(name, make):
    orig = _randomize(make())
    ours = copy.deepcopy(orig)
    ours.__class__ = adaptive.subclass_for(type(orig))
    assert isinstance(ours, type(orig)) and ours.state_dict().keys() == orig.state_dict().keys()
    ref = copy.deepcopy(orig).double()
    args = adaptive._probe_args(orig)
    ins = [a.clone().requires_grad_() if a is not None else None for a in args]
    ins64 = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    out = ours(*ins)
    out64 = ref(*ins64)
    out, out64 = (out if isinstance(out, tuple) else (out,)), (out64 if isinstance(out64, tuple) else (out64,))
    for a, e in zip(out, out64):
        assert_close(a, e, torch.float32, term_scale=4.0)
    dys = [torch.randn_like(o) for o in out]
    leaves = [a for a in ins if a is not None] + list(ours.parameters())
    leaves64 = [a for a in ins64 if a is not None] + list(ref.parameters())
    g = torch.autograd.grad(out, leaves, dys, allow_unused=True)
    g64 = torch.autograd.grad(out64, leaves64, [d.double() for d in dys], allow_unused=True)
    for a, e in zip(g, g64):
        assert (a is None) == (e is None)
        if a is not None:
            assert_close(a, e, torch.float32, what="grad", term_scale=8.0)


def test_patch_replaces_probed_modules_and_unpatch_restores():
    model = torch.nn.ModuleDict({"g": _randomize(dn.AdaGroupNorm(8, 6, 2)), "z": _randomize(dn.AdaLayerNormZero(8)),
                                 "emb": dn.AdaLayerNorm(8, num_embeddings=10)})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tritonorm.patch(model)
    assert type(model["g"]).__module__ == "tritonorm.nn.adaptive"
    assert type(model["z"]).__module__ == "tritonorm.nn.adaptive"
    assert type(model["emb"]) is dn.AdaLayerNorm  # a label embedding: no probe input, left alone
    assert any(n == "emb" for n, _, _ in tritonorm.report(model).left_alone)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    tritonorm.unpatch(model)
    assert type(model["g"]) is dn.AdaGroupNorm and type(model["z"]) is dn.AdaLayerNormZero
