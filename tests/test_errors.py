"""Bad input: ValueError/TypeError naming the argument, and nothing changed."""

from __future__ import annotations

import pytest
import torch

import tritonorm
from tritonorm import functional as TF

X = torch.randn(2, 8, 3, 3)


def _call(**kw):
    args = dict(x=X, scope="group", num_groups=4)
    args.update(kw)
    x = args.pop("x")
    scope = args.pop("scope")
    return tritonorm.norm(x, scope, **args)


@pytest.mark.parametrize("kw,exc,words", [
    (dict(scope="bogus"), ValueError, ["scope", "bogus"]),
    (dict(scope="NZ", num_groups=None), ValueError, ["scope", "'Z'"]),
    (dict(scope="NHH", num_groups=None), ValueError, ["repeated", "'H'"]),
    (dict(scope="", num_groups=None), ValueError, ["scope"]),
    (dict(scope=3), TypeError, ["scope"]),
    (dict(num_groups=3), ValueError, ["num_groups=3", "8 channels"]),
    (dict(num_groups=0), ValueError, ["num_groups"]),
    (dict(num_groups=2.0), TypeError, ["num_groups"]),
    (dict(scope="batch", num_groups=2), ValueError, ["num_groups", "does not reduce C"]),
    (dict(scope="instance", num_groups=1), ValueError, ["num_groups"]),
    (dict(weight=torch.ones(7)), ValueError, ["weight", "(8,)"]),
    (dict(bias=torch.ones(8, 1)), ValueError, ["bias", "(8,)"]),
    (dict(weight=torch.ones(8, dtype=torch.int32)), TypeError, ["weight", "floating"]),
    (dict(weight=[1.0] * 8), TypeError, ["weight"]),
    (dict(residual=torch.ones(2, 8, 3)), ValueError, ["residual", "shape"]),
    (dict(residual=torch.ones(2, 8, 3, 3, dtype=torch.float64)), TypeError, ["residual", "dtype"]),
    (dict(activation="swish"), ValueError, ["activation", "swish"]),
    (dict(activation=1), TypeError, ["activation"]),
    (dict(backend="cuda"), ValueError, ["backend", "cuda"]),
    (dict(eps=0.0), ValueError, ["eps", "> 0"]),
    (dict(eps=-1e-5), ValueError, ["eps"]),
    (dict(eps=float("nan")), ValueError, ["eps"]),
    (dict(eps="1e-5"), TypeError, ["eps"]),
    # momentum is checked only where it is used: running statistics updated in training.
    (dict(momentum=1.5, scope="batch", num_groups=None, running_mean=torch.zeros(8),
          running_var=torch.ones(8)), ValueError, ["momentum"]),
    (dict(momentum=-0.1, scope="batch", num_groups=None, running_mean=torch.zeros(8),
          running_var=torch.ones(8)), ValueError, ["momentum"]),
    (dict(center=1), TypeError, ["center"]),
    (dict(x=torch.ones(2, 8, 3, 3, dtype=torch.int64)), TypeError, ["x", "floating"]),
    (dict(x=[1.0]), TypeError, ["x"]),
    (dict(x=torch.ones(4)), ValueError, ["x", "1-D"]),
    (dict(x=torch.ones(1, 2, 1, 1, 1, 1)), ValueError, ["x", "6-D"]),
    (dict(x=torch.ones(2, 8), scope="instance", num_groups=None), ValueError, ["instance", "spatial"]),
])
def test_bad_arguments_raise_naming_the_argument(kw, exc, words):
    with pytest.raises(exc) as info:
        _call(**kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


RUNNING_ERRORS = [
    (dict(scope="layer"), ["running statistics", "N"]),
    (dict(scope="NHW", running_mean=torch.zeros(4)), ["running_mean", "(8,)"]),
    (dict(scope="NCHW", num_groups=4, running_mean=torch.zeros(8), running_var=torch.ones(8)), ["running_mean", "(4,)"]),
    (dict(scope="batch", running_mean=None), ["together"]),
    (dict(scope="batch", center=False), ["running_mean", "center=False"]),
    (dict(scope="batch", activation="nope"), ["activation"]),
    (dict(scope="batch", weight=torch.ones(3)), ["weight"]),
    (dict(scope="batch", x=torch.randn(1, 8, 1, 1)), ["single value"]),
]


@pytest.mark.parametrize("kw,words", RUNNING_ERRORS)
def test_failing_calls_leave_running_stats_untouched(kw, words):
    rm, rv = torch.randn(8), torch.rand(8) + 0.5
    args = dict(x=X, running_mean=rm, running_var=rv, training=True)
    args.update(kw)
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises((ValueError, TypeError)) as info:
        x = args.pop("x")
        tritonorm.norm(x, args.pop("scope"), **args)
    for w in words:
        assert w in str(info.value)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_single_value_statistic_in_training_raises_but_not_in_eval():
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value"):
        tritonorm.norm(x, "batch")
    with pytest.raises(ValueError, match="more than 1 value"):
        tritonorm.norm(x, "instance")
    rm, rv = torch.zeros(4), torch.ones(4)
    y = tritonorm.norm(x, "batch", running_mean=rm, running_var=rv, training=False)
    assert torch.allclose(y, x / (1 + 1e-5) ** 0.5)


def test_device_mismatch_is_named():
    meta_w = torch.ones(8, device="meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        _call(weight=meta_w)


def test_functional_errors():
    with pytest.raises(ValueError, match="normalized_shape"):
        TF.layer_norm(torch.randn(2, 3, 4), (3,))
    with pytest.raises(ValueError, match="weight"):
        TF.layer_norm(torch.randn(2, 3, 4), (4,), weight=torch.ones(3))
    with pytest.raises(TypeError, match="normalized_shape"):
        TF.rms_norm(torch.randn(2, 4), "4")
    with pytest.raises(ValueError, match="spatial"):
        TF.instance_norm(torch.randn(2, 4))
    with pytest.raises(ValueError, match="running_mean"):
        TF.instance_norm(torch.randn(2, 4, 3), running_mean=torch.zeros(3), running_var=torch.ones(4))


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("TRITONORM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="TRITONORM_BACKEND"):
        tritonorm.norm(X, "group", num_groups=4)


def test_triton_backend_rejects_float64():
    with pytest.raises(TypeError, match="float64"):
        tritonorm.norm(X.double(), "group", num_groups=4, backend="triton")
