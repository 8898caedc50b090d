"""The "torch" regime: the same forward and backward as the Triton launchers, run by PyTorch ops.

For tiny shapes a single ATen kernel can beat any Triton launch (launch latency dominates).
The dispatcher selects this regime only from a tuned table/cache entry (or ``forced``); the
heuristic never picks it, because no measurement yet says where it wins (docs/dispatch.md).

Where the scope is one ATen has a fused op for (BatchNorm, GroupNorm, LayerNorm rows, all
centred), that op runs; other scopes run a composite of PyTorch ops. Residual and activation are
applied after. Statistics are fp32, shaped ``spec.stat_shape``, like the launchers'.
"""

from __future__ import annotations

import math

import torch

from .. import activations
from ..reference import _broadcast_stat, _grouped, moments
from ..scope import Spec
from .layout import alloc_out

_NAMES = {activations.code(n): n for n in (None, *activations.NAMES)}


def _aten(x, spec: Spec, weight, bias, eps):
    """(y_affine, mean, rstd) from a fused ATen op when the scope has one, else None."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() < 2:
        return None
    n, c = x.shape[0], x.shape[1]
    aten = torch.ops.aten
    if spec.letters == "N" + spec.spatial and spec.num_groups == 1 and spec.sample_groups == 1:
        y, mean, rstd = aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        return y, mean, rstd
    if spec.letters == "C" + spec.spatial and x.dim() > 2 or spec.letters == "C" and x.dim() == 2:
        hw = math.prod(x.shape[2:])
        y, mean, rstd = aten.native_group_norm(x, weight, bias, n, c, hw, spec.num_groups, eps)
        return y, mean, rstd
    return None


def forward(x, spec: Spec, weight, bias, residual, eps: float, center: bool, act: int, given=None):
    """Returns (y, mean, rstd, var) as ``launch.forward`` does."""
    stat_shape = spec.stat_shape(x.shape)
    fast = _aten(x, spec, weight, bias, eps) if center and given is None and x.numel() else None
    if fast is not None:
        z, mean, rstd = fast
        mean = mean.float().reshape(stat_shape)
        rstd = rstd.float().reshape(stat_shape)
        var = rstd.reciprocal().square() - eps
        z = z.float()
    else:
        if given is None:
            mean, var = moments(x, spec, center)
            mean, var = mean.float(), var.float()
            rstd = torch.rsqrt(var + eps)
        else:
            mean = given[0].reshape(stat_shape).float()
            rstd = given[1].reshape(stat_shape).float()
            var = rstd.reciprocal().square() - eps
        xg, _ = _grouped(x.float(), spec)
        xhat = (xg - _broadcast_stat(mean, spec, x.shape)) * _broadcast_stat(rstd, spec, x.shape)
        z = xhat.reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if weight is not None:
            z = z * weight.float().reshape(shape)
        if bias is not None:
            z = z + bias.float().reshape(shape)
    if residual is not None:
        z = z + residual.float()
    y = alloc_out(x)
    y.copy_(activations.apply(_NAMES[act], z))
    return y, mean.contiguous(), rstd.contiguous(), var.contiguous()


def backward(dy, x, spec: Spec, weight, bias, residual, mean, rstd, center: bool, act: int,
             given: bool, need_dx: bool, need_dw: bool, need_db: bool, need_dres: bool):
    """Returns (dx, dweight, dbias, dresidual) as ``launch.backward`` does (closed form)."""
    shape = x.shape
    xg, dims = _grouped(x.float(), spec)
    mean_b = _broadcast_stat(mean.float(), spec, shape)
    rstd_b = _broadcast_stat(rstd.float(), spec, shape)
    xhat = (xg - mean_b if center else xg) * rstd_b
    gshape = tuple(size if name in ("G", "Cg") else 1 for name, size, _ in spec.logical_axes(shape))
    w = weight.float().reshape(gshape) if weight is not None else None
    dz = dy.float().reshape(xg.shape)
    if act != 0:
        z = xhat * w if w is not None else xhat
        if bias is not None:
            z = z + bias.float().reshape(gshape)
        if residual is not None:
            z = z + residual.float().reshape(xg.shape)
        dz = dz * activations.grad(_NAMES[act], z)
    dx = dw = db = dres = None
    if need_dx:
        g = dz * w if w is not None else dz
        if given:
            d = g * rstd_b
        else:
            c2 = (g * xhat).mean(dim=dims, keepdim=True)
            d = g - xhat * c2
            if center:
                d = d - g.mean(dim=dims, keepdim=True)
            d = d * rstd_b
        dx = alloc_out(x)
        dx.copy_(d.reshape(shape))
    red = tuple(i for i, (name, _, _) in enumerate(spec.logical_axes(shape)) if name not in ("G", "Cg"))
    if need_dw:
        dw = (dz * xhat).sum(dim=red).reshape(-1).to(weight.dtype)
    if need_db:
        db = dz.sum(dim=red).reshape(-1).to(bias.dtype)
    if need_dres:
        if act != 0:
            dres = alloc_out(x)
            dres.copy_(dz.reshape(shape))
        else:
            dres = dy
    return dx, dw, db, dres
