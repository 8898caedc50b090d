"""Implementations compared side by side: tritonorm, eager PyTorch, torch.compile, and apex or
Liger-Kernel when importable. Each provider turns (case, inputs) into a forward function, or
None where it has no implementation of the case."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import tritonorm
from tritonorm import activations


def _eager(case, x, kw):
    act = case.activation
    w, b = kw.get("weight"), kw.get("bias")
    if case.kind == "batch_norm":
        return lambda: activations.apply(act, F.batch_norm(x, None, None, w, b, training=True))
    if case.kind == "group_norm":
        return lambda: activations.apply(act, F.group_norm(x, case.num_groups, w, b))
    if case.kind == "ghost_batch_norm":  # what Ghost BN implementations run: BatchNorm per chunk
        vbs = x.shape[0] // case.sample_groups
        return lambda: activations.apply(act, torch.cat(
            [F.batch_norm(c, None, None, w, b, training=True) for c in x.split(vbs)]))
    if case.kind == "instance_norm":
        return lambda: activations.apply(act, F.instance_norm(x, weight=w, bias=b))
    if case.kind == "layer_norm":
        return lambda: activations.apply(act, F.layer_norm(x, x.shape[-1:], w, b))
    if case.kind == "rms_norm":
        return lambda: activations.apply(act, F.rms_norm(x, x.shape[-1:], w, eps=1e-5))
    if case.kind == "ada_layer_norm":  # DiT: LN(x) * (1 + scale) + shift, three kernels
        return lambda: activations.apply(act, F.layer_norm(x, x.shape[-1:]) * w + b)
    if case.kind == "ada_group_norm":  # AdaGroupNorm / ResnetBlock2D scale_shift
        return lambda: activations.apply(act, F.group_norm(x, case.num_groups) * w + b)
    if case.kind == "cond_batch_norm":  # BigGAN's ccbn: BatchNorm without affine, then gain, bias
        return lambda: activations.apply(act, F.batch_norm(x, None, None, training=True) * w + b)
    if case.kind in ("add_rms_norm", "add_layer_norm"):  # h = x + residual, then the norm of h
        r = kw["add_residual"]
        if case.kind == "add_layer_norm":
            return lambda: activations.apply(act, F.layer_norm(x + r, x.shape[-1:], w, b))
        return lambda: activations.apply(act, F.rms_norm(x + r, x.shape[-1:], w, eps=1e-5))
    return None


def _tritonorm(case, x, kw):
    from tritonorm.tuning.suites import run

    return lambda: run(case, x, kw)



def _compile(case, x, kw):
    eager = _eager(case, x, kw)
    if eager is None:
        return None
    compiled = torch.compile(eager, dynamic=False)
    return compiled


def _apex(case, x, kw):
    if case.kind not in ("layer_norm", "rms_norm") or importlib.util.find_spec("apex") is None:
        return None
    from apex.normalization import fused_layer_norm as fln  # type: ignore

    w = kw.get("weight")
    if case.kind == "layer_norm":
        return lambda: fln.fused_layer_norm_affine(x, w, kw.get("bias"), x.shape[-1:], 1e-5)
    return lambda: fln.fused_rms_norm_affine(x, w, x.shape[-1:], 1e-5)


def _liger(case, x, kw):
    if case.kind not in ("layer_norm", "rms_norm") or importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.ops import layer_norm as lln, rms_norm as lrms  # type: ignore

    w = kw.get("weight")
    if case.kind == "layer_norm":
        return lambda: lln.LigerLayerNormFunction.apply(x, w, kw.get("bias"), 1e-5)
    return lambda: lrms.LigerRMSNormFunction.apply(x, w, 1e-5)


PROVIDERS = {"tritonorm": _tritonorm, "eager": _eager, "compile": _compile, "apex": _apex, "liger": _liger}
DEFAULT = ("tritonorm", "eager", "compile", "apex", "liger")


def make(name: str, case, x, kw):
    """The provider's forward function for these inputs, or None."""
    return PROVIDERS[name](case, x, kw)
