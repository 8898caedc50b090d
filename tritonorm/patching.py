"""``tritonorm.patch(model)``: run a model's normalization layers on tritonorm, in place.

A torch module is patched by switching its class to tritonorm's subclass of the same torch class
(``nn.BatchNorm2d`` -> ``tritonorm.nn.BatchNorm2d``): the module object, its Parameters, buffers,
hooks, training flag, device and dtype all stay exactly as they were, and so do the state_dict
keys. An activation module that directly follows a patched norm inside an ``nn.Sequential`` is
fused into the norm's kernel and its slot holds a ``FusedActivation`` (an identity that remembers
the original), so indices and keys are unchanged. Third-party norm classes are matched by
behaviour on a probe input and replaced by an ``AdaptedNorm`` sharing their Parameters
(adapters.py). Anything that cannot be replaced faithfully is
left alone with a reason; ``report(model)`` returns what happened and a summary is logged.
``unpatch(model)`` restores plain torch modules. docs/patching.md lists every rule.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field

from torch import nn

from . import adapters
from .adapters import AdaptedNorm
from .nn import modules as ours
from .nn.sync_batchnorm import SyncBatchNorm

__all__ = ["patch", "unpatch", "report", "PatchReport", "FusedActivation"]

log = logging.getLogger("tritonorm.patch")

_REPLACE: dict[type, type] = {
    nn.BatchNorm1d: ours.BatchNorm1d,
    nn.BatchNorm2d: ours.BatchNorm2d,
    nn.BatchNorm3d: ours.BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
    nn.GroupNorm: ours.GroupNorm,
    nn.LayerNorm: ours.LayerNorm,
    nn.RMSNorm: ours.RMSNorm,
    nn.InstanceNorm1d: ours.InstanceNorm1d,
    nn.InstanceNorm2d: ours.InstanceNorm2d,
    nn.InstanceNorm3d: ours.InstanceNorm3d,
}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_OURS = set(_REPLACE.values())
_TORCH_OF = {v: k for k, v in _REPLACE.items()}
# Torch normalization bases: a module deriving from one of these with a type we do not map is a
# user's subclass with its own code, which we must not bypass.
_NORM_BASES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def _activation_name(module: nn.Module) -> str | None:
    """The fused-epilogue name of an activation module that tritonorm computes identically."""
    t = type(module)
    if t is nn.ReLU:
        return "relu"
    if t is nn.LeakyReLU and module.negative_slope == 0.01:
        return "leaky_relu"
    if t is nn.SiLU:
        return "silu"
    if t is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    if t is nn.Sigmoid:
        return "sigmoid"
    if t is nn.Tanh:
        return "tanh"
    return None


class FusedActivation(nn.Identity):
    """Holds the slot of an activation fused into the preceding norm; ``unpatch`` puts the
    original back. The original is kept outside ``_modules`` so the state_dict is unchanged, and
    the norm is named by its key in the same ``Sequential`` (not referenced), so a deepcopy,
    pickle or ``torch.save`` of the model carries a slot that still finds its own norm."""

    def __init__(self, original: nn.Module, norm_key: str):
        super().__init__()
        object.__setattr__(self, "original", original)
        self.norm_key = norm_key

    def extra_repr(self) -> str:
        return f"fused into the preceding norm: {self.original!r}"


@dataclass
class PatchReport:
    """What ``patch`` (or ``unpatch``) did: module names as in ``model.named_modules()``."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)   # (name, from, to)
    fused: list[tuple[str, str, str]] = field(default_factory=list)      # (norm, activation module, name)
    left_alone: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, reason)

    def summary(self) -> str:
        lines = [f"tritonorm: replaced {len(self.replaced)} module(s), fused {len(self.fused)} "
                 f"activation(s), left {len(self.left_alone)} alone"]
        lines += [f"  left alone {name or '<root>'} ({typ}): {why}" for name, typ, why in self.left_alone]
        return "\n".join(lines)


_reports: "weakref.WeakKeyDictionary[nn.Module, PatchReport]" = weakref.WeakKeyDictionary()


def report(model: nn.Module) -> PatchReport | None:
    """The report of the last ``patch``/``unpatch`` of ``model`` (None if never patched)."""
    return _reports.get(model)


def _why_not(module: nn.Module) -> str | None:
    if "forward" in module.__dict__:
        return "its forward is overridden on the instance"
    return None


def patch(model: nn.Module, *, fuse_activation: bool = True, sync_batchnorm: bool = False,
          process_group=None) -> nn.Module:
    """Make ``model``'s torch normalization layers run on tritonorm; returns ``model`` itself.

    Replaced: BatchNorm1d/2d/3d, SyncBatchNorm, GroupNorm, LayerNorm, RMSNorm,
    InstanceNorm1d/2d/3d (exact types), and third-party norm classes that compute one of
    tritonorm's norms on a probe input (adapters.py: transformers' Llama/Qwen2/Mistral/Gemma
    RMSNorm, ConvNeXt's LayerNorm); other subclasses are left alone. ``fuse_activation``: fuse a
    ReLU, LeakyReLU(0.01), SiLU, GELU, Sigmoid or Tanh that directly follows a patched norm in an
    ``nn.Sequential``, and GroupNorm+SiLU in diffusers' ResnetBlock2D. ``sync_batchnorm``:
    BatchNorm1d/2d/3d become ``SyncBatchNorm`` (over ``process_group``, default the world).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, flag in (("fuse_activation", fuse_activation), ("sync_batchnorm", sync_batchnorm)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    rep = PatchReport()
    adapted: list[tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        t = type(module)
        if t in _OURS or t is AdaptedNorm:
            continue
        target = _REPLACE.get(t)
        if target is None and t.__module__.startswith("diffusers."):
            target = _adaptive_target(name, module, t, rep)
            if target is not None:
                continue
        if target is None:
            if adapters.is_candidate(module):
                _adapt(name, module, rep, adapted)
            elif isinstance(module, _NORM_BASES):
                rep.left_alone.append((name, t.__name__, "subclass of a torch norm "
                                       "with its own code"))
            continue
        why = _why_not(module)
        if why is not None:
            rep.left_alone.append((name, t.__name__, why))
            continue
        if sync_batchnorm and t in _BATCH_NORMS:
            target = SyncBatchNorm
            module.process_group = process_group
        module.__dict__["_tritonorm_original_class"] = t
        module.__class__ = target
        rep.replaced.append((name, t.__name__, f"tritonorm.nn.{target.__name__}"))
    for name, module, kind in adapted:
        parent, _, key = name.rpartition(".")
        model.get_submodule(parent)._modules[key] = AdaptedNorm(module, kind, adapters._eps_of(module))
    if fuse_activation:
        _fuse(model, rep)
        _fuse_resnet_blocks(model, rep)
    _reports[model] = rep
    log.info(rep.summary())
    return model


def _adapt(name: str, module: nn.Module, rep: PatchReport, adapted: list) -> None:
    """Queue a third-party norm for replacement if it behaves like one of ours (adapters.py)."""
    t = type(module)
    why = _why_not(module)
    if why is None and (module._forward_hooks or module._forward_pre_hooks):
        why = "it has forward hooks"
    if why is None and not name:
        why = "it is the model itself"
    if why is None:
        kind, why = adapters.match(module)
        if kind is not None:
            adapted.append((name, module, kind))
            rep.replaced.append((name, t.__name__, f"tritonorm.adapters.AdaptedNorm({kind})"))
            return
    rep.left_alone.append((name, t.__name__, why))


def _fuse_resnet_blocks(model: nn.Module, rep: PatchReport) -> None:
    """diffusers' ResnetBlock2D calls its SiLU itself: fused through its own forward, when that
    forward is checked equal on a probe (adapters.resnet_forward)."""
    for name, block in model.named_modules():
        if type(block).__name__ != "ResnetBlock2D":
            continue
        why = adapters.fusible_resnet_block(block)
        if why is None and not adapters.resnet_matches(block):
            why = "its forward differs from the fused one on a probe input"
        if why is not None:
            rep.left_alone.append((name, type(block).__name__, f"GroupNorm+SiLU not fused: {why}"))
            continue
        adapters.install_resnet_forward(block)
        pre = f"{name}." if name else ""
        for norm_name in ("norm1", "norm2"):
            rep.fused.append((pre + norm_name, pre + "nonlinearity", "silu"))


def _adaptive_target(name: str, module: nn.Module, t: type, rep: PatchReport):
    """diffusers' AdaGroupNorm / AdaLayerNorm / AdaLayerNormZero / AdaLayerNormContinuous: switched
    to tritonorm.nn.adaptive's subclass when a probe input gives the same outputs (then returns it),
    else left alone with the reason; None for any other class."""
    from .nn import adaptive

    target = adaptive.subclass_for(t)
    if target is None:
        return None
    why = _why_not(module)
    if why is None and not adaptive.probe(module, t):
        why = "a probe input gave different outputs (or none could be built)"
    if why is not None:
        rep.left_alone.append((name, t.__name__, why))
        return None
    module.__dict__["_tritonorm_original_class"] = t
    module.__class__ = target
    rep.replaced.append((name, t.__name__, f"tritonorm.nn.adaptive.{target.__name__}"))
    return target


def _uses(model: nn.Module) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


def _fuse(model: nn.Module, rep: PatchReport) -> None:
    uses = _uses(model)
    names = {id(m): n for n, m in model.named_modules()}
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        keys = list(seq._modules.keys())
        for k_norm, k_act in zip(keys, keys[1:]):
            norm, act = seq._modules[k_norm], seq._modules[k_act]
            if norm is None or act is None or type(norm) not in _OURS or norm.activation is not None:
                continue
            act_name = _activation_name(act)
            if act_name is None:
                if isinstance(act, (nn.LeakyReLU, nn.GELU)):
                    rep.left_alone.append((names.get(id(act), ""), type(act).__name__,
                                           "not fused: tritonorm's kernel has no such variant"))
                continue
            where = names.get(id(norm), "")
            if uses.get(id(norm), 0) > 1:
                rep.left_alone.append((names.get(id(act), ""), type(act).__name__,
                                       f"not fused: {where} is used in more than one place"))
                continue
            if norm._forward_hooks or norm._forward_pre_hooks or act._forward_hooks or \
                    act._forward_pre_hooks or getattr(norm, "_backward_hooks", None) or \
                    getattr(norm, "_backward_pre_hooks", None):
                rep.left_alone.append((names.get(id(act), ""), type(act).__name__,
                                       "not fused: hooks would see a different tensor"))
                continue
            norm.activation = act_name
            seq._modules[k_act] = FusedActivation(act, k_norm)
            rep.fused.append((where, names.get(id(act), ""), act_name))


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: fused activations go back into their slots and tritonorm modules become
    their torch classes again (same objects and tensors). A tritonorm module built with its own
    ``activation`` has no torch equivalent and is left alone (reported)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rep = PatchReport()
    for parent, seq in list(model.named_modules()):
        forward = seq.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is adapters.resnet_forward:
            del seq.__dict__["forward"]
        for key, child in list(seq._modules.items()):
            if isinstance(child, AdaptedNorm):
                seq._modules[key] = child.original
                rep.replaced.append((f"{parent}.{key}" if parent else key, "AdaptedNorm",
                                     type(child.original).__name__))
                continue
            if isinstance(child, FusedActivation):
                norm = seq._modules.get(child.norm_key)
                if norm is not None and "activation" in norm.__dict__:
                    del norm.__dict__["activation"]
                seq._modules[key] = child.original
    for name, module in model.named_modules():
        t = type(module)
        if t.__module__ == "tritonorm.nn.adaptive" and "_tritonorm_original_class" in module.__dict__:
            module.__class__ = module.__dict__.pop("_tritonorm_original_class")  # diffusers' adaptive norms
            rep.replaced.append((name, t.__name__, f"{module.__class__.__module__}.{t.__name__}"))
            continue
        if t not in _OURS:
            continue
        if module.activation is not None:
            rep.left_alone.append((name, t.__name__, f"activation={module.activation!r} "
                                   "has no torch module equivalent"))
            continue
        original = module.__dict__.pop("_tritonorm_original_class", None) or _TORCH_OF[t]
        if t is SyncBatchNorm and original in _BATCH_NORMS:
            module.__dict__.pop("process_group", None)
        module.__dict__.pop("activation", None)
        module.__class__ = original
        rep.replaced.append((name, t.__name__, f"torch.nn.{original.__name__}"))
    _reports[model] = rep
    log.info(rep.summary())
    return model
