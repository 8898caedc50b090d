"""Drop-in normalization modules running on ``tritonorm.norm``.

Each class subclasses its ``torch.nn`` counterpart and only replaces the computation, so the
constructor arguments, parameter and buffer names, shapes, defaults, ``state_dict`` keys and the
``momentum=None`` / ``track_running_stats`` / ``num_batches_tracked`` behaviour are PyTorch's own.
The one addition is ``activation=`` (keyword-only): ``relu``, ``leaky_relu`` (slope 0.01),
``silu``, ``gelu``, ``gelu_tanh``, ``sigmoid`` or ``tanh``, applied in the same kernel after the
affine. ``Norm`` is the generic module for any scope (docs/modules.md).

The class attribute ``activation = None`` lets ``tritonorm.patch`` turn a torch module into one of
these by swapping its class: every Parameter and buffer stays the same object.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import activations, functional
from ..core import norm
from ..scope import ALIASES

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "LayerNorm", "RMSNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "Norm"]


def _extra(module: nn.Module, base: str) -> str:
    act = getattr(module, "activation", None)
    return base if act is None else f"{base}, activation={act!r}"


def _momentum_factor(module: nn.Module) -> float:
    """PyTorch's BatchNorm rule: count the batch, then the factor (1/count for momentum=None).
    Each attribute is read once: a buffer read goes through ``nn.Module.__getattr__``, which
    costs more than the arithmetic here."""
    momentum = module.momentum
    if module.training and module.track_running_stats:
        count = module.num_batches_tracked
        if count is not None:
            count.add_(1)
            if momentum is None:
                # As in PyTorch: a cumulative average reads the counter on the host.
                return 1.0 / float(count)
    return 0.0 if momentum is None else momentum


def _call_norm(module: nn.Module, *inputs):
    """Run ``module``'s computation (``_norm_forward``). Every tritonorm module's ``forward`` goes
    through here so that ``torch.fx.symbolic_trace`` records one call per norm (``torch.fx.wrap``
    below) instead of tracing into Python that branches on shapes, flags and buffers, which a
    symbolic tensor cannot answer; torch.fx keeps torch's own norms opaque (leaf modules) the same
    way. Eager mode and torch.compile just call through."""
    return module._norm_forward(*inputs)


torch.fx.wrap("_call_norm")


def _takes_bias(base: type) -> bool:
    """Whether ``base.__init__`` has the keyword ``bias`` (BatchNorm, GroupNorm and InstanceNorm
    took it only in later torch releases; LayerNorm has had it since torch 2.1)."""
    import inspect

    found = _TAKES_BIAS.get(base)
    if found is None:
        found = _TAKES_BIAS[base] = "bias" in inspect.signature(base.__init__).parameters
    return found


_TAKES_BIAS: dict = {}


def init_base(base: type, module: nn.Module, *args, bias: bool = True) -> None:
    """``base.__init__(module, *args, bias=bias)`` on every supported torch: where ``base`` has
    no ``bias`` keyword, the module is built with one and ``bias=False`` then drops it (the
    parameter ``None``, as newer torch leaves it; ``reset_parameters`` below copes)."""
    if _takes_bias(base):
        base.__init__(module, *args, bias=bias)
        return
    base.__init__(module, *args)
    if not bias and module._parameters.get("bias") is not None:
        module.register_parameter("bias", None)


class _ResetWithoutBias:
    """``reset_parameters`` for a module whose ``bias`` may be ``None`` under an older torch,
    whose own reset zeroes the bias unconditionally."""

    def reset_parameters(self) -> None:
        if self._parameters.get("bias", False) is not None or self.weight is None:
            return super().reset_parameters()
        if hasattr(self, "reset_running_stats"):
            self.reset_running_stats()
        nn.init.ones_(self.weight)


class _Leaf:
    """``forward`` through ``_call_norm``; subclasses define ``_norm_forward``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _call_norm(self, input)


class _BatchNormMixin(_ResetWithoutBias, _Leaf):
    activation = None

    def _norm_forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = _momentum_factor(self)
        training = self.training
        running_mean, running_var = self.running_mean, self.running_var
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        # norm itself (functional.batch_norm is this call): one Python frame less per forward.
        return norm(input, "batch", weight=self.weight, bias=self.bias, eps=self.eps, activation=self.activation,
                    running_mean=running_mean, running_var=running_var, momentum=factor, training=bn_training)

    def extra_repr(self) -> str:
        return _extra(self, super().extra_repr())


def _batch_norm_class(base: type) -> type:
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True, activation=None):
        act = activations.check(activation)
        init_base(base, self, num_features, eps, momentum, affine, track_running_stats, device, dtype,
                  bias=bias)
        self.activation = act

    name = base.__name__
    doc = (f"``torch.nn.{name}`` on tritonorm's kernels, plus ``activation=`` fused after the "
           "affine. Statistics per channel over N and the spatial axes.")
    return type(name, (_BatchNormMixin, base), {"__init__": __init__, "__doc__": doc,
                                                "__module__": __name__})


BatchNorm1d = _batch_norm_class(nn.BatchNorm1d)
BatchNorm2d = _batch_norm_class(nn.BatchNorm2d)
BatchNorm3d = _batch_norm_class(nn.BatchNorm3d)


class GroupNorm(_ResetWithoutBias, _Leaf, nn.GroupNorm):
    """``torch.nn.GroupNorm`` on tritonorm's kernels, plus ``activation=`` (GroupNorm + SiLU in
    one pass is the diffusion U-Net case)."""

    activation = None

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *,
                 bias=True, activation=None):
        act = activations.check(activation)
        init_base(nn.GroupNorm, self, num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self.activation = act

    def _norm_forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input
        if x.dim() > 5:
            # Groups reduce every spatial axis, so flattening them changes nothing.
            x = x.reshape(x.shape[0], x.shape[1], -1)
        y = functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                  activation=self.activation)
        return y.reshape(input.shape)

    def extra_repr(self) -> str:
        return _extra(self, super().extra_repr())


class LayerNorm(_Leaf, nn.LayerNorm):
    """``torch.nn.LayerNorm`` (trailing ``normalized_shape``, elementwise affine, ``bias=False``
    allowed) on tritonorm's kernels, plus ``activation=``."""

    activation = None

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None,
                 dtype=None, *, activation=None):
        act = activations.check(activation)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.activation = act

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        return _call_norm(self, input, residual)

    def _norm_forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        # With a residual: (y, h), h = input + residual, y = the norm of h (vLLM's convention).
        if residual is not None:
            return functional.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias,
                                             self.eps, activation=self.activation)
        return functional.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                                     activation=self.activation)

    def extra_repr(self) -> str:
        return _extra(self, super().extra_repr())


class RMSNorm(_Leaf, nn.RMSNorm):
    """``torch.nn.RMSNorm`` on tritonorm's kernels (``eps=None``: the input dtype's machine
    epsilon, as in PyTorch), plus ``activation=``."""

    activation = None

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None,
                 *, activation=None):
        act = activations.check(activation)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.activation = act

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        return _call_norm(self, input, residual)

    def _norm_forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        # With a residual: (y, h), h = input + residual, y = the norm of h (vLLM's convention).
        if residual is not None:
            return functional.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                                           activation=self.activation)
        return functional.rms_norm(input, self.normalized_shape, self.weight, self.eps,
                                   activation=self.activation)

    def extra_repr(self) -> str:
        return _extra(self, super().extra_repr())


class _InstanceNormMixin(_ResetWithoutBias, _Leaf):
    activation = None

    # torch's forward (input checks, unbatched input) calls our _apply_instance_norm.
    _norm_forward = nn.modules.instancenorm._InstanceNorm.forward

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        return functional.instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps,
            activation=self.activation)

    def extra_repr(self) -> str:
        return _extra(self, super().extra_repr())


def _instance_norm_class(base: type) -> type:
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, device=None, dtype=None, *, bias=True, activation=None):
        act = activations.check(activation)
        init_base(base, self, num_features, eps, momentum, affine, track_running_stats, device, dtype,
                  bias=bias)
        self.activation = act

    name = base.__name__
    doc = (f"``torch.nn.{name}`` on tritonorm's kernels, plus ``activation=``. Statistics per "
           "(sample, channel); running statistics as in PyTorch (batch average of the "
           "per-instance mean and unbiased variance).")
    return type(name, (_InstanceNormMixin, base), {"__init__": __init__, "__doc__": doc,
                                                   "__module__": __name__})


InstanceNorm1d = _instance_norm_class(nn.InstanceNorm1d)
InstanceNorm2d = _instance_norm_class(nn.InstanceNorm2d)
InstanceNorm3d = _instance_norm_class(nn.InstanceNorm3d)


def _scope_reduces_c(scope: str) -> bool:
    key = scope.strip().lower()
    if key in ALIASES:
        return key in ("layer", "group", "batch_group", "positional")
    return "c" in key


class Norm(nn.Module):
    """Normalization over any scope of an ``(N, C, *spatial)`` input: ``tritonorm.norm`` as a module.

    Args:
        num_features: C, the size of the channel axis (per-channel ``weight``/``bias``).
        scope: an alias (``batch``, ``layer``, ``instance``, ``group``, ``batch_group``,
            ``positional``) or axis letters (``"NHW"``, ``"CW"``, ...).
        num_groups: channel groups when the scope reduces C (``group``/``batch_group`` default 32).
        eps, center (False: RMS normalization), affine, bias (False: no shift even if affine),
        activation: as in ``tritonorm.norm``.
        track_running_stats, momentum: BatchNorm-style running statistics, allowed when the scope
            reduces N and every spatial axis. Shape (C,), or (num_groups,) when the scope also
            reduces C. ``momentum=None`` is the cumulative average, as in ``torch.nn.BatchNorm``.
    The forward also takes ``residual=`` (added after the affine, before the activation).
    """

    def __init__(self, num_features: int, scope: str = "group", *, num_groups: int | None = None,
                 eps: float = 1e-5, center: bool = True, affine: bool = True, bias: bool = True,
                 activation: str | None = None, track_running_stats: bool = False,
                 momentum: float | None = 0.1, device=None, dtype=None):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not isinstance(scope, str):
            raise TypeError(f"scope must be a string (an alias or axis letters), got {type(scope).__name__}")
        if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int)):
            raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
        reduces_c = _scope_reduces_c(scope)
        if num_groups is not None and not reduces_c:
            raise ValueError(f"num_groups={num_groups} needs a scope that reduces C; scope={scope!r} does not")
        groups = num_groups
        if reduces_c and groups is None:
            groups = 32 if scope.strip().lower() in ("group", "batch_group") else 1
        if groups is not None and (groups < 1 or num_features % groups):
            raise ValueError(f"num_groups={groups} must be >= 1 and divide num_features={num_features}")
        if momentum is not None:
            if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
                raise ValueError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a positive finite number, got {eps!r}")
        for name, flag in (("center", center), ("affine", affine), ("bias", bias),
                           ("track_running_stats", track_running_stats)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        act = activations.check(activation)
        key = scope.strip().lower()
        if track_running_stats:
            if key in ALIASES and key not in ("batch", "batch_group"):
                raise ValueError(f"track_running_stats needs a scope that reduces N and every spatial "
                                 f"axis; scope={scope!r} does not")
            if key not in ALIASES and "n" not in key:
                raise ValueError(f"track_running_stats needs a scope that reduces N; scope={scope!r} does not")
        self.num_features, self.scope, self.num_groups = num_features, scope, num_groups
        self.eps, self.center, self.affine, self.activation = eps, center, affine, act
        self.momentum, self.track_running_stats = momentum, track_running_stats
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(num_features, **kw)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            n_stats = groups if reduces_c else num_features
            self.register_buffer("running_mean", torch.zeros(n_stats, **kw) if center else None)
            self.register_buffer("running_var", torch.ones(n_stats, **kw))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            if self.running_mean is not None:
                self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return _call_norm(self, input, residual)

    def _norm_forward(self, input: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"input must have shape (N, {self.num_features}, *spatial), "
                             f"got {tuple(input.shape)}")
        factor = _momentum_factor(self)
        training = self.training or self.running_var is None
        keep = not self.training or self.track_running_stats
        return norm(input, self.scope, num_groups=self.num_groups, weight=self.weight,
                    bias=self.bias, eps=self.eps, center=self.center, activation=self.activation,
                    residual=residual,
                    running_mean=self.running_mean if keep else None,
                    running_var=self.running_var if keep else None,
                    momentum=factor, training=training)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, scope={self.scope!r}"
        if self.num_groups is not None:
            s += f", num_groups={self.num_groups}"
        s += f", eps={self.eps}, center={self.center}, affine={self.affine}"
        if self.track_running_stats:
            s += f", momentum={self.momentum}, track_running_stats=True"
        return _extra(self, s)
