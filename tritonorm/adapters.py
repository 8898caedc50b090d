"""Third-party norm layers that ``patch`` runs on tritonorm when they behave like one of ours.

Model libraries write their own norm classes (transformers' ``LlamaRMSNorm``, ``Qwen2RMSNorm``,
``MistralRMSNorm``, ``GemmaRMSNorm``, ``ConvNextLayerNorm``; diffusers' ``ResnetBlock2D`` calls
its SiLU itself, and with ``scale_shift`` modulates norm2 per sample). Nothing here trusts a
class name: a candidate (a leaf module whose only tensors are a 1-D ``weight`` and maybe
``bias``, with an ``eps``/``variance_epsilon``) is run on a probe input, on a copy with random
parameters, against each tritonorm formula in turn; the first that matches replaces it, and a
candidate that matches none is left alone and reported.

A replaced module becomes an ``AdaptedNorm`` that holds the same Parameter objects under the
same names (state_dict keys unchanged) and keeps the original outside ``_modules`` for
``unpatch``.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from . import functional
from .core import norm
from .nn.modules import _call_norm

torch.fx.wrap("_call_norm")

# (kind, description). Tried in this order on a probe.
KINDS = {
    "rms": "RMSNorm over the last dim: x / rms(x) * weight",
    "rms_offset": "RMSNorm over the last dim with weight 1 + w at fp32 (Gemma)",
    "layer": "LayerNorm over the last dim",
    "layer_channels_first": "LayerNorm over dim 1 of (N, C, *spatial) (ConvNeXt channels_first)",
}


class AdaptedNorm(nn.Module):
    """A third-party norm running on tritonorm (see the module docstring); ``original`` is the
    module it stands in for, whose Parameters it shares."""

    def __init__(self, original: nn.Module, kind: str, eps: float):
        super().__init__()
        object.__setattr__(self, "original", original)
        self.kind, self.eps, self.activation = kind, float(eps), None
        self.weight = original.weight
        self.bias = getattr(original, "bias", None) if kind.startswith("layer") else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _call_norm(self, input)

    def _norm_forward(self, input: torch.Tensor) -> torch.Tensor:
        d = self.weight.shape[0]
        if self.kind == "rms":
            return functional.rms_norm(input, (d,), self.weight, self.eps, activation=self.activation)
        if self.kind == "rms_offset":
            # Gemma: (1 + w) at fp32, and so is the kernel's weight here: one rounding, as Gemma's.
            return functional.rms_norm(input, (d,), 1.0 + self.weight.float(), self.eps,
                                       activation=self.activation)
        if self.kind == "layer":
            return functional.layer_norm(input, (d,), self.weight, self.bias, self.eps,
                                         activation=self.activation)
        return norm(input, "C", weight=self.weight, bias=self.bias, eps=self.eps, training=False,
                    activation=self.activation)

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__} as {self.kind}, eps={self.eps}"


def _eps_of(module: nn.Module):
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(module, name, None)
        if isinstance(v, float) and v > 0:
            return v
    return None


def is_candidate(module: nn.Module) -> bool:
    """A leaf whose only tensors are a 1-D ``weight`` (and ``bias``), with an epsilon, named a norm."""
    if "norm" not in type(module).__name__.lower() or next(module.children(), None) is not None:
        return False
    params = dict(module.named_parameters(recurse=False))
    if set(params) not in ({"weight"}, {"weight", "bias"}) or params["weight"].dim() != 1:
        return False
    if any(b is not None for b in module._buffers.values()):
        return False
    return _eps_of(module) is not None


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2 * torch.finfo(dtype).eps


def _probe_inputs(kind: str, d: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (2, d, 3, 2) if kind == "layer_channels_first" else (2, 3, d)
    return (torch.randn(shape, generator=g) * 2 + 0.5).to(device=like.device, dtype=like.dtype)


def _same(a, b, dtype) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        return False
    s = max(b.detach().double().abs().max().item(), 1e-30)
    return (a.detach().double() - b.detach().double()).abs().max().item() <= _tolerance(dtype) * s


def match(module: nn.Module) -> tuple[str | None, str]:
    """(kind, "") of the first tritonorm formula ``module`` computes, or (None, why not)."""
    eps = _eps_of(module)
    probe = copy.deepcopy(module)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    d = probe.weight.shape[0]
    kinds = [k for k in KINDS if not k.startswith("layer") or getattr(probe, "bias", None) is not None]
    for kind in kinds:
        x = _probe_inputs(kind, d, probe.weight)
        try:
            with torch.no_grad():
                want = probe(x)
                got = AdaptedNorm(probe, kind, eps)(x)
        except Exception:  # the module refuses this probe's shape: not this kind
            continue
        if _same(got, want, x.dtype):
            return kind, ""
    return None, "computes none of tritonorm's norms on a probe input (" + ", ".join(kinds) + ")"


# --- diffusers ResnetBlock2D: GroupNorm + SiLU fused ------------------------------------------

def fusible_resnet_block(block: nn.Module) -> str | None:
    """Why ``block`` (a diffusers ResnetBlock2D) cannot take ``resnet_forward``, or None if it can."""
    if type(block).__name__ != "ResnetBlock2D" or not type(block).__module__.startswith("diffusers"):
        return "not a diffusers ResnetBlock2D"
    if "forward" in block.__dict__:
        return "its forward is overridden on the instance"
    if type(block.nonlinearity) is not nn.SiLU:
        return f"its nonlinearity is {type(block.nonlinearity).__name__}, not SiLU"
    for name in ("norm1", "norm2"):
        m = getattr(block, name)
        if not isinstance(m, nn.GroupNorm) or getattr(m, "activation", None) is not None:
            return f"{name} is not a plain GroupNorm"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{name} has hooks, which would see a different tensor"
    if block.nonlinearity._forward_hooks or block.nonlinearity._forward_pre_hooks:
        return "its nonlinearity has hooks"
    return None


def _group_norm_silu(m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return functional.group_norm(x, m.num_groups, m.weight, m.bias, m.eps, activation="silu")


def _group_norm_scale_shift_silu(m: nn.GroupNorm, x: torch.Tensor, scale: torch.Tensor,
                                 shift: torch.Tensor) -> torch.Tensor:
    """``silu(m(x) * (1 + scale) + shift)`` with scale, shift (N, C, 1, 1) as one norm call with a
    per-sample affine: (xhat w + b)(1 + s) + t = xhat (w (1 + s)) + (b (1 + s) + t)."""
    weight, bias = 1 + scale, shift
    if m.weight is not None:
        view = (1, -1) + (1,) * (x.dim() - 2)
        bias = m.bias.view(view) * weight + shift if m.bias is not None else shift
        weight = m.weight.view(view) * weight
    return norm(x, "group", num_groups=m.num_groups, weight=weight, bias=bias, eps=m.eps, activation="silu")


def resnet_forward(block, input_tensor, temb, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward with each GroupNorm + SiLU pair in one kernel, the
    ``scale_shift`` time embedding folded into norm2's (per-sample) affine in the same kernel (the
    SiLU on ``temb`` stays as it was). Installed on the instance as
    ``functools.partial(resnet_forward, block)``, which deepcopy and pickle carry."""
    h = _group_norm_silu(block.norm1, input_tensor)
    if block.upsample is not None:
        if h.shape[0] >= 64:
            input_tensor, h = input_tensor.contiguous(), h.contiguous()
        input_tensor, h = block.upsample(input_tensor), block.upsample(h)
    elif block.downsample is not None:
        input_tensor, h = block.downsample(input_tensor), block.downsample(h)
    h = block.conv1(h)
    if block.time_emb_proj is not None:
        if not block.skip_time_act:
            temb = block.nonlinearity(temb)
        temb = block.time_emb_proj(temb)[:, :, None, None]
    if block.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError("`temb` should not be None when `time_embedding_norm` is scale_shift")
        scale, shift = torch.chunk(temb, 2, dim=1)
        h = _group_norm_scale_shift_silu(block.norm2, h, scale, shift)
    else:
        if block.time_embedding_norm == "default" and temb is not None:
            h = h + temb
        h = _group_norm_silu(block.norm2, h)
    h = block.conv2(block.dropout(h))
    if block.conv_shortcut is not None:
        if block.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = block.conv_shortcut(input_tensor)
    return (input_tensor + h) / block.output_scale_factor


def resnet_matches(block: nn.Module) -> bool:
    """``resnet_forward`` equals the block's own forward on a probe (a copy, eval mode)."""
    probe = copy.deepcopy(block).eval()
    w = probe.conv1.weight
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(2, probe.in_channels, 4, 4, generator=g).to(w)
    temb = None
    if probe.time_emb_proj is not None:
        temb = torch.randn(2, probe.time_emb_proj.in_features, generator=g).to(w)
    try:
        with torch.no_grad():
            want = probe(x, temb)
            got = resnet_forward(probe, x, temb)
    except Exception:
        return False
    return _same(got, want, w.dtype)


def install_resnet_forward(block: nn.Module) -> None:
    block.__dict__["forward"] = functools.partial(resnet_forward, block)
