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
        ("continuous rms", lambda: dn.AdaLayerNormContinuous(8, 5, norm_type="rms_norm")),
        # With their own embeddings: integer timesteps; diffusion timesteps and class labels.
        ("ln emb", lambda: dn.AdaLayerNorm(8, num_embeddings=10)),
        ("ln emb chunk1", lambda: dn.AdaLayerNorm(8, num_embeddings=10, output_dim=12, chunk_dim=1)),
        ("zero emb", lambda: dn.AdaLayerNormZero(8, num_embeddings=7)),
    ]


def _double(a):
    if isinstance(a, torch.dtype):
        return torch.float64  # hidden_dtype
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().double().requires_grad_()
    return a


def _leaf(a):
    return a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


@pytest.mark.parametrize("name,make", _modules(), ids=[n for n, _ in _modules()])
def test_forward_and_backward_match_the_float64_original(name, make):
    orig = _randomize(make())
    ours = copy.deepcopy(orig)
    ours.__class__ = adaptive.subclass_for(type(orig))
    assert isinstance(ours, type(orig)) and ours.state_dict().keys() == orig.state_dict().keys()
    ref = copy.deepcopy(orig).double()
    args = adaptive._probe_args(orig)
    ins, ins64 = [_leaf(a) for a in args], [_double(a) for a in args]
    torch.manual_seed(0)  # the same label dropout (training mode) for both
    out = ours(*ins)
    torch.manual_seed(0)
    out64 = ref(*ins64)
    out, out64 = (out if isinstance(out, tuple) else (out,)), (out64 if isinstance(out64, tuple) else (out64,))
    for a, e in zip(out, out64):
        assert_close(a, e, torch.float32, term_scale=4.0)
    dys = [torch.randn_like(o) for o in out]
    leaves = [a for a in ins if isinstance(a, torch.Tensor) and a.requires_grad] + list(ours.parameters())
    leaves64 = [a for a in ins64 if isinstance(a, torch.Tensor) and a.requires_grad] + list(ref.parameters())
    g = torch.autograd.grad(out, leaves, dys, allow_unused=True)
    g64 = torch.autograd.grad(out64, leaves64, [d.double() for d in dys], allow_unused=True)
    for a, e in zip(g, g64):
        assert (a is None) == (e is None)
        if a is not None:
            assert_close(a, e, torch.float32, what="grad", term_scale=8.0)


def test_patch_replaces_probed_modules_and_unpatch_restores():
    model = torch.nn.ModuleDict({"g": _randomize(dn.AdaGroupNorm(8, 6, 2)), "z": _randomize(dn.AdaLayerNormZero(8)),
                                 "emb": _randomize(dn.AdaLayerNorm(8, num_embeddings=10)),
                                 "zemb": _randomize(dn.AdaLayerNormZero(8, num_embeddings=7))})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tritonorm.patch(model)
    for key in model:
        assert type(model[key]).__module__ == "tritonorm.nn.adaptive", key
    assert tritonorm.report(model).left_alone == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # state_dict round trip: a patched module loads an unpatched one's state and vice versa.
    fresh = dn.AdaLayerNormZero(8, num_embeddings=7)
    fresh.load_state_dict(model["zemb"].state_dict())
    model["zemb"].load_state_dict(_randomize(dn.AdaLayerNormZero(8, num_embeddings=7)).state_dict())
    tritonorm.unpatch(model)
    assert type(model["g"]) is dn.AdaGroupNorm and type(model["z"]) is dn.AdaLayerNormZero
    assert type(model["emb"]) is dn.AdaLayerNorm and type(model["zemb"]) is dn.AdaLayerNormZero
    assert all(torch.equal(state["zemb." + k], v) for k, v in fresh.state_dict().items())
