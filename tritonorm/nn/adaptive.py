"""Adaptive (conditioned) normalization modules of diffusers on tritonorm's kernels.

``AdaGroupNorm``, ``AdaLayerNorm``, ``AdaLayerNormZero`` and ``AdaLayerNormContinuous`` modulate
the normalized x per sample, ``norm(x) * (1 + scale) + shift`` with scale and shift projected from
an embedding. Eager runs that as a norm, a multiply and an add (three kernels, two x-sized
intermediates); here the modulation is the norm's broadcast weight and bias (docs/api.md,
"Broadcast (adaptive) affine"), one norm call.

Each class is a subclass of the diffusers class made on first use (diffusers stays optional and is
imported only then), with the constructor, submodules, state_dict and forward signature of the
original; only ``forward`` differs. A configuration whose computation differs from what the fused
call does (an FP32LayerNorm, a custom norm) runs the original forward. ``subclass_for(cls)`` gives
the subclass for a diffusers class (None if not one of these); ``tritonorm.patch`` uses it, after
checking on a probe input that the module behaves the same.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as TF
from ..core import norm

NAMES = ("AdaGroupNorm", "AdaLayerNorm", "AdaLayerNormZero", "AdaLayerNormContinuous")
_MADE: dict[type, type] = {}


def _layer_norm(x, ln, scale, shift):
    """``ln(x) * (1 + scale) + shift`` as one layer_norm with a broadcast affine; ``ln`` an
    nn.LayerNorm (its own affine folded in: w (1 + s), b (1 + s) + shift)."""
    weight = 1 + scale
    bias = shift
    if getattr(ln, "weight", None) is not None:
        bias = shift + (ln.bias * weight if ln.bias is not None else 0)
        weight = ln.weight * weight
    elif getattr(ln, "bias", None) is not None:
        bias = shift + ln.bias * weight
    return TF.layer_norm(x, ln.normalized_shape, weight=weight, bias=bias, eps=ln.eps)


def _plain_layer_norm(m) -> bool:
    return isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward or \
        type(m).__name__ == "LayerNorm" and type(m).__module__.startswith("tritonorm")


def _ada_group_norm_forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:  # the (N, C, 1, 1) modulation is 4-D: another rank runs the original
        return type(self).__mro__[1].forward(self, x, emb)
    if self.act:
        emb = self.act(emb)
    emb = self.linear(emb)
    emb = emb[:, :, None, None]
    scale, shift = emb.chunk(2, dim=1)
    return norm(x, "group", num_groups=self.num_groups, weight=1 + scale, bias=shift, eps=self.eps)


def _ada_layer_norm_forward(self, x, timestep=None, temb=None):
    if not _plain_layer_norm(self.norm):
        return type(self).__mro__[1].forward(self, x, timestep, temb)
    if self.emb is not None:
        temb = self.emb(timestep)
    temb = self.linear(self.silu(temb))
    if self.chunk_dim == 1:
        shift, scale = temb.chunk(2, dim=1)
        shift, scale = shift[:, None, :], scale[:, None, :]
    else:
        scale, shift = temb.chunk(2, dim=0)
    if scale.dim() != x.dim() and tuple(scale.shape) != tuple(self.norm.normalized_shape):
        return self.norm(x) * (1 + scale) + shift  # a shape the broadcast affine does not take
    return _layer_norm(x, self.norm, scale, shift)


def _ada_layer_norm_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if not _plain_layer_norm(self.norm):
        return type(self).__mro__[1].forward(self, x, timestep, class_labels, hidden_dtype, emb)
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    x = _layer_norm(x, self.norm, scale_msa[:, None], shift_msa[:, None])
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _diffusers_rms_norm(m, x) -> bool:
    """diffusers' own RMSNorm (norm_type="rms_norm") over x's last dim, parameters in x's dtype
    (a weight of another dtype changes the output's dtype: the original forward runs)."""
    if type(m).__name__ != "RMSNorm" or not type(m).__module__.startswith("diffusers."):
        return False
    params = [t for t in (m.weight, getattr(m, "bias", None)) if t is not None]
    return tuple(m.dim) == tuple(x.shape[-1:]) and all(t.dtype == x.dtype for t in params)


def _rms_norm(x, rms, scale, shift):
    """``rms(x) * (1 + scale) + shift`` as one RMS normalization with a broadcast affine."""
    weight, bias = 1 + scale, shift
    if getattr(rms, "bias", None) is not None:
        bias = shift + rms.bias * weight
    if rms.weight is not None:
        weight = rms.weight * weight
    return TF._last_dims(x, tuple(rms.dim), weight, bias, rms.eps, False, None, None, None, "rms_norm")


def _ada_layer_norm_continuous_forward(self, x, conditioning_embedding):
    rms = _diffusers_rms_norm(self.norm, x)
    if not (rms or _plain_layer_norm(self.norm)):
        return type(self).__mro__[1].forward(self, x, conditioning_embedding)
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    if rms:
        return _rms_norm(x, self.norm, scale[:, None, :], shift[:, None, :])
    return _layer_norm(x, self.norm, scale[:, None, :], shift[:, None, :])


_FORWARDS = {"AdaGroupNorm": _ada_group_norm_forward, "AdaLayerNorm": _ada_layer_norm_forward,
             "AdaLayerNormZero": _ada_layer_norm_zero_forward,
             "AdaLayerNormContinuous": _ada_layer_norm_continuous_forward}


def subclass_for(cls: type) -> type | None:
    """tritonorm's subclass of one of diffusers' adaptive norm classes (None for any other)."""
    if cls in _MADE:
        return _MADE[cls]
    if not cls.__module__.startswith("diffusers.") or cls.__name__ not in _FORWARDS:
        return None
    try:
        from diffusers.models import normalization as dn
    except Exception:  # diffusers missing or broken: nothing to replace
        return None
    if getattr(dn, cls.__name__, None) is not cls:
        return None
    made = type(cls.__name__, (cls,), {"forward": _FORWARDS[cls.__name__], "__module__": __name__,
                                        "__doc__": f"diffusers' {cls.__name__} on tritonorm's kernels "
                                                   "(tritonorm.nn.adaptive)."})
    _MADE[cls] = made
    return made


def __getattr__(name: str):
    """``tritonorm.nn.adaptive.AdaGroupNorm`` etc.: the subclasses, made on first access."""
    if name in NAMES:
        from diffusers.models import normalization as dn

        return subclass_for(getattr(dn, name))
    raise AttributeError(name)


def probe(module: nn.Module, original: type) -> bool:
    """Whether ``module`` gives the same outputs under its tritonorm class as under ``original``
    on a small random input (patch's check before replacing it)."""
    args = _probe_args(module)
    if args is None:
        return False
    made = subclass_for(original)
    rng = torch.random.fork_rng(devices=[]) if args[0].device.type == "cpu" else torch.random.fork_rng()
    with rng, torch.no_grad():
        cls = module.__class__
        try:
            # The same random draws for both (a label embedding drops labels at random in training).
            torch.manual_seed(0)
            module.__class__ = original
            want = module(*args)
            torch.manual_seed(0)
            module.__class__ = made
            got = module(*args)
        except Exception:
            return False
        finally:
            module.__class__ = cls
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    tol = 1e-3 if args[0].dtype == torch.float32 else 3e-2
    return len(want) == len(got) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in zip(want, got))


def _probe_args(module):
    """A small input for ``module``'s forward in diffusers' signature (None: none can be built):
    with a timestep/label embedding, integer timesteps (AdaLayerNorm's nn.Embedding) or diffusion
    timesteps and class labels (AdaLayerNormZero's CombinedTimestepLabelEmbeddings)."""
    p = next(module.parameters(), None)
    if p is None:
        return None
    dev, dt = p.device, p.dtype
    lin = module.linear
    name = type(module).__name__
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=dt)

    def labels(n, *shape):
        return torch.randint(0, n, shape, generator=g).to(dev)

    if name == "AdaGroupNorm":
        return rnd(2, lin.out_features // 2, 3, 3), rnd(2, lin.in_features)
    emb = getattr(module, "emb", None)
    if name == "AdaLayerNorm":
        d = lin.out_features // 2
        batch = (2,) if module.chunk_dim == 1 else ()  # chunk_dim 0 splits dim 0: one embedding
        if emb is None:
            return rnd(2, 5, d), None, rnd(*batch, lin.in_features)
        if not isinstance(emb, nn.Embedding):
            return None
        return rnd(2, 5, d), labels(emb.num_embeddings, *batch), None
    if name == "AdaLayerNormZero":
        if emb is None:
            return rnd(2, 5, lin.in_features), None, None, None, rnd(2, lin.in_features)
        classes = getattr(getattr(emb, "class_embedder", None), "num_classes", None)
        if not isinstance(classes, int):
            return None
        steps = (torch.rand(2, generator=g) * 1000).to(dev)
        return rnd(2, 5, lin.in_features), steps, labels(classes, 2), dt, None
    if name == "AdaLayerNormContinuous":
        return rnd(2, 5, lin.out_features // 2), rnd(2, lin.in_features)
    return None
