"""tritonorm.nn modules against their torch counterparts run in float64: outputs, gradients,
running statistics and num_batches_tracked over train and eval steps; state_dict both ways;
constructor arguments and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_close
from tritonorm import activations, reference
from tritonorm.nn.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                                  InstanceNorm2d, InstanceNorm3d, LayerNorm, Norm, RMSNorm)
from tritonorm.scope import parse

# (ours, torch, constructor args and kwargs, input shape). Each row is there for a behaviour:
CASES = [
    (BatchNorm1d, nn.BatchNorm1d, (5,), {}, (4, 5)),                                  # 2-D input
    (BatchNorm1d, nn.BatchNorm1d, (3,), {"momentum": None}, (2, 3, 5)),               # cumulative average
    (BatchNorm2d, nn.BatchNorm2d, (4,), {}, (3, 4, 3, 3)),
    (BatchNorm2d, nn.BatchNorm2d, (4,), {"affine": False, "track_running_stats": False}, (2, 4, 3, 2)),
    (BatchNorm3d, nn.BatchNorm3d, (2,), {"eps": 1e-3, "momentum": 0.3}, (2, 2, 2, 3, 2)),
    (GroupNorm, nn.GroupNorm, (2, 6), {}, (2, 6, 3, 3)),
    (GroupNorm, nn.GroupNorm, (3, 3), {"affine": False}, (3, 3, 5)),
    (LayerNorm, nn.LayerNorm, ((3, 4),), {}, (2, 3, 3, 4)),                           # 2 trailing dims
    (LayerNorm, nn.LayerNorm, (8,), {"bias": False}, (2, 3, 8)),
    (RMSNorm, nn.RMSNorm, (8,), {}, (3, 8)),                                          # eps=None
    (InstanceNorm1d, nn.InstanceNorm1d, (3,), {}, (2, 3, 6)),
    (InstanceNorm2d, nn.InstanceNorm2d, (4,), {"affine": True, "track_running_stats": True}, (2, 4, 3, 3)),
    (InstanceNorm3d, nn.InstanceNorm3d, (2,), {"track_running_stats": True, "momentum": None}, (2, 2, 2, 2, 3)),
    # torch 2.13's keyword-only bias=False: weight kept, no shift.
    (BatchNorm2d, nn.BatchNorm2d, (4,), {"bias": False}, (2, 4, 3, 2)),
    (GroupNorm, nn.GroupNorm, (2, 4), {"bias": False}, (2, 4, 5)),
    (InstanceNorm1d, nn.InstanceNorm1d, (3,), {"affine": True, "bias": False}, (2, 3, 6)),
]


def _ids(case):
    return f"{case[0].__name__}-{case[3]}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_module_matches_torch(case):
    ours_cls, torch_cls, args, kwargs, shape = case
    ours = ours_cls(*args, **kwargs)
    theirs = torch_cls(*args, **kwargs).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p))
    theirs.load_state_dict(ours.state_dict())
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(shape) * 2 + 1
        x.requires_grad_(True)
        x64 = x.detach().double().requires_grad_(True)
        y, y64 = ours(x), theirs(x64)
        mode = "train" if training else "eval"
        assert_close(y, y64, torch.float32, what=f"{mode} output")
        dy = torch.randn_like(y)
        y.backward(dy)
        y64.backward(dy.double())
        assert_close(x.grad, x64.grad, torch.float32, what=f"{mode} dx")
        for (name, p), p64 in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(p.grad, p64.grad, torch.float32, what=f"{mode} d{name}")
            p.grad = None
            p64.grad = None
        for (name, b), b64 in zip(ours.named_buffers(), theirs.buffers()):
            if b.is_floating_point():
                assert_close(b, b64, torch.float32, what=f"{mode} {name}")
            else:
                assert torch.equal(b, b64), f"{name}: {b} != {b64}"


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu_tanh"])
def test_fused_activation(activation):
    ours = GroupNorm(2, 4, activation=activation)
    theirs = nn.GroupNorm(2, 4).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 3, 3)
    y64 = activations.apply(activation, theirs(x.double()))
    assert_close(ours(x), y64, torch.float32)
    assert f"activation={activation!r}" in repr(ours)


def test_state_dict_loads_both_ways_and_same_names():
    for ours_cls, torch_cls, args, kwargs, _ in CASES:
        ours, theirs = ours_cls(*args, **kwargs), torch_cls(*args, **kwargs)
        sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
        assert {k: v.shape for k, v in sd_ours.items()} == {k: v.shape for k, v in sd_theirs.items()}
        ours.load_state_dict(sd_theirs)
        theirs.load_state_dict(sd_ours)
        assert isinstance(ours, torch_cls)


def test_eval_without_running_stats_uses_batch_stats():
    ours = BatchNorm2d(3, track_running_stats=False).eval()
    theirs = nn.BatchNorm2d(3, track_running_stats=False).double().eval()
    x = torch.randn(4, 3, 2, 2)
    assert_close(ours(x), theirs(x.double()), torch.float32)


def test_constructor_and_forward_errors():
    with pytest.raises(ValueError, match="activation"):
        BatchNorm2d(4, activation="swish")
    with pytest.raises(TypeError, match="activation"):
        LayerNorm(4, activation=3)
    bn = BatchNorm2d(3)
    with pytest.raises(ValueError, match="4D"):
        bn(torch.randn(2, 3, 4))
    before = bn.running_mean.clone()
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(torch.randn(1, 3, 1, 1))
    assert torch.equal(bn.running_mean, before)
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNorm(5)(torch.randn(2, 4))


# ---------------------------------------------------------------------------------------------
# Norm: the generic module, checked against the reference for its scope.


@pytest.mark.parametrize("scope,kwargs,shape", [
    ("batch_group", {"num_groups": 2, "track_running_stats": True}, (3, 4, 2, 2)),  # running stats per group
    ("positional", {}, (2, 4, 3)),                                                  # PONO-style, over C
    ("NL", {"track_running_stats": True, "center": False}, (3, 2, 3)),              # letters, RMS stats
])
def test_norm_module_matches_reference(scope, kwargs, shape):
    m = Norm(shape[1], scope, **kwargs, activation="tanh")
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    spec = parse(scope, len(shape), kwargs.get("num_groups"), shape[1])
    center = kwargs.get("center", True)
    rm = None if m.running_mean is None else m.running_mean.double().clone()
    rv = None if m.running_var is None else m.running_var.double().clone()
    for training in (True, False):
        m.train(training)
        x = torch.randn(shape, requires_grad=True)
        x64 = x.detach().double().requires_grad_(True)
        w64 = m.weight.detach().double().requires_grad_(True)
        y = m(x)
        y64 = reference.norm(x64, spec, w64, m.bias.double(), 1e-5, center, "tanh", None, rm, rv,
                             0.1, training=training or rv is None)
        assert_close(y, y64, torch.float32, what=f"{scope} output")
        dy = torch.randn_like(y)
        y.backward(dy)
        y64.backward(dy.double())
        assert_close(x.grad, x64.grad, torch.float32, what="dx")
        assert_close(m.weight.grad, w64.grad, torch.float32, what="dweight")
        m.weight.grad = None
        if rv is not None:
            assert_close(m.running_var, rv, torch.float32, what="running_var")
    if m.num_batches_tracked is not None:
        assert int(m.num_batches_tracked) == 1


def test_norm_module_arguments():
    with pytest.raises(ValueError, match="num_features"):
        Norm(0)
    with pytest.raises(ValueError, match="num_groups"):
        Norm(6, "group", num_groups=4)
    with pytest.raises(ValueError, match="num_groups"):
        Norm(6, "batch", num_groups=2)
    with pytest.raises(ValueError, match="track_running_stats"):
        Norm(6, "layer", track_running_stats=True)
    with pytest.raises(ValueError, match="momentum"):
        Norm(6, "batch", momentum=2.0)
    m = Norm(4, "batch_group", num_groups=2, track_running_stats=True)
    assert m.running_mean.shape == (2,) and m.weight.shape == (4,)
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    with pytest.raises(ValueError, match="input must have shape"):
        m(torch.randn(2, 3, 4))
    assert int(m.num_batches_tracked) == 0


@pytest.mark.parametrize("cls", [BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                                 InstanceNorm2d, InstanceNorm3d, LayerNorm])
def test_bias_keyword_mirrors_torch(cls):
    import inspect

    from tritonorm.nn import SyncBatchNorm

    for ours in (cls, SyncBatchNorm):
        theirs = getattr(nn, ours.__name__)
        p_ours = inspect.signature(ours.__init__).parameters
        p_theirs = inspect.signature(theirs.__init__).parameters
        # Same parameters, in the same order and kinds, with the same defaults; plus activation
        # (and bias, which an older torch's class lacks: init_base below).
        extra = {"activation"} | ({"bias"} if "bias" not in p_theirs else set())
        assert [(k, v.kind, v.default) for k, v in p_theirs.items()] == \
            [(k, v.kind, v.default) for k, v in p_ours.items() if k not in extra]
    args = (2, 4) if cls is GroupNorm else (4,)
    kw = {"affine": True} if "Instance" in cls.__name__ else {}
    m = cls(*args, bias=False, **kw)
    assert m.bias is None and m.weight is not None
    if "bias" in inspect.signature(getattr(nn, cls.__name__).__init__).parameters:
        assert list(m.state_dict()) == list(getattr(nn, cls.__name__)(*args, bias=False, **kw).state_dict())


@pytest.mark.parametrize("cls", [BatchNorm2d, GroupNorm, InstanceNorm2d])
def test_bias_false_on_a_torch_without_the_keyword(cls, monkeypatch):
    """torch 2.11's BatchNorm/GroupNorm/InstanceNorm have no ``bias`` keyword (the GPU machine's
    torch: tnn.BatchNorm2d(64) raised TypeError there). init_base builds them with a bias and drops
    it; reset_parameters and the forward work without it."""
    from tritonorm.nn import modules

    monkeypatch.setattr(modules, "_TAKES_BIAS", {b: False for b in (nn.BatchNorm2d, nn.GroupNorm,
                                                                      nn.InstanceNorm2d)})
    real = {b: b.__init__ for b in (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)}
    for b, init in real.items():  # the old signature: bias= is a TypeError
        monkeypatch.setattr(b, "__init__", lambda self, *a, _init=init, **k: _init(self, *a, **k)
                            if "bias" not in k else (_ for _ in ()).throw(TypeError("bias")))
    args = (2, 4) if cls is GroupNorm else (4,)
    kw = {"affine": True} if cls is InstanceNorm2d else {}
    plain = cls(*args, **kw)
    assert plain.bias is not None
    m = cls(*args, bias=False, **kw)
    assert m.bias is None and "bias" not in m.state_dict()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(4)) and m.bias is None
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 5, 6)
    y = m(x)
    spec = parse({BatchNorm2d: "batch", GroupNorm: "group", InstanceNorm2d: "instance"}[cls], 4,
                 2 if cls is GroupNorm else None, 4)
    ref = reference.norm(x.double(), spec, weight=m.weight.detach().double())
    assert_close(y, ref, torch.float32, None, "y")


def test_rms_norm_keeps_channels_last():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    m = RMSNorm(5)
    with torch.no_grad():
        m.weight.normal_()
    y = m(x)
    expected = nn.RMSNorm(5)
    expected.load_state_dict(m.state_dict())
    ref = expected.double()(x.double())
    assert y.stride() == ref.stride() == x.stride()
    assert_close(y, ref, torch.float32)
