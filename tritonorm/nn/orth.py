"""Orthogonalized layers (OLM/OWN, ONI) and centered weight normalization (ALGORITHMS §1, §2, §8).

``OrthLinear`` and ``OrthConv1d/2d/3d`` subclass ``nn.Linear``/``nn.ConvNd``: the stored ``weight``
is the free parameter V, and every forward uses ``scale · orthogonalize(V)``. Their state dicts
load into and from the plain layers (the fixed scale is a non-persistent buffer).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from ..orth import api, reference


class _OrthMixin:
    """Shared by the orthogonalized layers: settings, the per-output scale and the eval cache."""

    def _init_orth(self, method: str, group_size: int | None, iters: int, eps: float,
                   scale: float, learnable_scale: bool, backend: str) -> None:
        api.check_method(method)
        api.check_common(iters=iters, eps=eps, group_size=group_size)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite number, got {scale!r}")
        self.method, self.group_size, self.iters, self.eps = method, group_size, iters, eps
        self.backend = backend
        init = torch.full((self.weight.shape[0],), float(scale), dtype=self.weight.dtype,
                          device=self.weight.device)
        if learnable_scale:
            self.scale = nn.Parameter(init)
        else:
            self.register_buffer("scale", init, persistent=False)
        # [fallbacks, nonfinite] groups, counted on the device by every forward (docs/orthogonalization.md);
        # read with tritonorm.orth.event_counts/check. Not persistent: state dicts stay those of nn layers.
        self.register_buffer("orth_events", api.new_events(self.weight.device), persistent=False)
        self._cache_key = None
        self._cache = None

    def orthogonal_weight(self) -> torch.Tensor:
        """``scale[:, None, …] · orthogonalize(weight)``, shape of ``weight``.

        In eval mode, when no gradient is needed, the result is cached until ``weight`` or
        ``scale`` changes (tracked by their version counters, identity and dtype/device). Training
        (and anything ``torch.compile`` traces) recomputes it on every call, with no host read.
        """
        w, s = self.weight, self.scale
        needs_grad = torch.is_grad_enabled() and (w.requires_grad or s.requires_grad)
        cacheable = not self.training and not needs_grad and not torch.compiler.is_compiling()
        key = (w._version, s._version, w.data_ptr(), s.data_ptr(), w.dtype, w.device) if cacheable else None
        if cacheable and self._cache_key == key:
            return self._cache
        v = api.orthogonalize(w, method=self.method, group_size=self.group_size, iters=self.iters,
                              eps=self.eps, backend=self.backend, events=self.orth_events)
        out = v * s.reshape(-1, *([1] * (w.dim() - 1))).to(v.dtype)
        self._cache_key, self._cache = (key, out) if cacheable else (None, None)
        return out

    def _orth_repr(self) -> str:
        return (f", method={self.method!r}, group_size={self.group_size}, iters={self.iters}, "
                f"learnable_scale={isinstance(self.scale, nn.Parameter)}")


class OrthLinear(_OrthMixin, nn.Linear):
    """Drop-in ``nn.Linear`` whose weight (out, in) is orthogonalized per row group on every forward.

    ``method``: ``"newton_schulz"`` (ONI, ``iters`` steps) or ``"eigen"`` (OLM). ``scale``: the
    per-output factor after orthogonalization (1 for linear, as in ONI_Linear), learnable when
    ``learnable_scale``. Input (*, in) → output (*, out).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 method: str = "newton_schulz", group_size: int | None = None, iters: int = 5,
                 eps: float = 1e-5, scale: float = 1.0, learnable_scale: bool = False,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_orth(method, group_size, iters, eps, scale, learnable_scale, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.orthogonal_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._orth_repr()


def _conv_class(base: type[nn.Module], dims: int) -> type[nn.Module]:
    class OrthConv(_OrthMixin, base):
        def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                     dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                     method: str = "newton_schulz", group_size: int | None = None, iters: int = 5,
                     eps: float = 1e-5, scale: float = math.sqrt(2.0), learnable_scale: bool = False,
                     backend: str = "auto", device=None, dtype=None) -> None:
            super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                             bias, padding_mode, device=device, dtype=dtype)
            self._init_orth(method, group_size, iters, eps, scale, learnable_scale, backend)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.orthogonal_weight(), self.bias)

        def extra_repr(self) -> str:
            return super().extra_repr() + self._orth_repr()

    OrthConv.__name__ = OrthConv.__qualname__ = f"OrthConv{dims}d"
    OrthConv.__doc__ = (
        f"Drop-in ``nn.Conv{dims}d`` whose weight (out, in/groups, *kernel) is flattened to rows of "
        "length in/groups·prod(kernel) and orthogonalized per row group on every forward.\n\n"
        "``scale`` defaults to √2 (variance preserved through ReLU, as in ONI/OWN conv layers).")
    return OrthConv


OrthConv1d = _conv_class(nn.Conv1d, 1)
OrthConv2d = _conv_class(nn.Conv2d, 2)
OrthConv3d = _conv_class(nn.Conv3d, 3)


class CenteredWeightNorm(nn.Module):
    """Parametrization (``torch.nn.utils.parametrize``) for centered weight normalization (CWN):
    per output row of V (out, *rest): ``w = scale · (v − mean v) / (‖v − mean v‖ + eps)``.

    ``scale`` is a float, or with ``learnable_scale=True`` a parameter of shape (``num_rows``,)
    initialized to ``scale``. The ``+ eps`` follows the PyTorch reference (ALGORITHMS §8).
    Computed in fp32 for fp16/bf16 weights. Pure PyTorch: autograd gives the closed-form gradient.
    """

    def __init__(self, scale: float = 1.0, eps: float = 1e-5, learnable_scale: bool = False,
                 num_rows: int | None = None) -> None:
        super().__init__()
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite number, got {scale!r}")
        if learnable_scale:
            if not isinstance(num_rows, int) or num_rows < 1:
                raise ValueError(f"num_rows must be a positive int with learnable_scale=True, got {num_rows!r}")
            self.scale = nn.Parameter(torch.full((num_rows,), float(scale)))
        else:
            self.scale = float(scale)
        self.eps = eps

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() < 2:
            raise ValueError(f"CenteredWeightNorm needs a weight with >= 2 dims, got shape {tuple(v.shape)}")
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        return reference.centered_weight_norm(v.to(acc), self.scale, self.eps).to(v.dtype)


def centered_weight_norm(module: nn.Module, name: str = "weight", *, scale: float = 1.0, eps: float = 1e-5,
                         learnable_scale: bool = False) -> nn.Module:
    """Register ``CenteredWeightNorm`` on ``module.<name>`` and return ``module``.

    Afterwards ``module.<name>`` is the normalized weight and the free parameter lives at
    ``module.parametrizations.<name>.original`` (PyTorch's parametrize convention).
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module has no tensor attribute name={name!r}")
    if weight.dim() < 2:
        raise ValueError(f"name={name!r} must be a weight with >= 2 dims, got shape {tuple(weight.shape)}")
    cwn = CenteredWeightNorm(scale, eps, learnable_scale, num_rows=weight.shape[0])
    if learnable_scale:
        cwn.scale.data = cwn.scale.data.to(device=weight.device, dtype=weight.dtype)
    parametrize.register_parametrization(module, name, cwn)
    return module
