"""Shapes from real models: the cases that ``tritonorm tune`` tunes and ``tritonorm bench`` times.

Each case is one normalization layer call as the model makes it. ``scaled()`` gives a small
version of the same structure (scope, groups, layout, flags) that Triton's interpreter runs in
well under a second, for the CPU correctness-and-dispatch report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

SUITES = ("resnet50", "sd-unet", "llm", "nnunet")
# Kinds whose x is (rows, D), normalized per row; add_* kinds are tritonorm.add_norm calls (a
# residual of x's shape comes with the inputs, as ``add_residual``).
ROW_KINDS = ("layer_norm", "rms_norm", "add_rms_norm", "add_layer_norm")


@dataclass(frozen=True)
class Case:
    suite: str
    name: str                 # short label, e.g. "bn 64x112^2 b32"
    kind: str                 # batch_norm | group_norm | layer_norm | rms_norm | instance_norm
    shape: tuple              # x's shape, (N, C, *spatial) or (rows, D) for layer/rms norm
    scope: str                # tritonorm scope
    num_groups: int | None = None
    channels_last: bool = False
    activation: str | None = None
    center: bool = True
    affine: bool = True       # weight (and bias when center)
    sample_groups: int = 1    # groups of samples with their own statistics (Ghost BN)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def scaled(self) -> "Case":
        """A small case with the same scope, groups, layout and flags (interpreter-sized)."""
        if self.kind in ROW_KINDS:
            rows, d = self.shape
            return replace(self, shape=(min(rows, 8), min(d, 256)))
        n, c, *sp = self.shape
        g = self.num_groups or 1
        c_small = max(g, min(c, 2 * g if g > 1 else 8))
        sp_small = tuple(min(s, 6 if len(sp) == 3 else 12) for s in sp)
        s_small = min(self.sample_groups, 2)  # still more than one group when there were several
        return replace(self, shape=(2 * s_small if s_small > 1 else min(n, 2), c_small, *sp_small),
                       sample_groups=s_small)


def _resnet50() -> list[Case]:
    stages = ((64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7))
    out = []
    for batch in (32, 256):
        for c, hw in stages:
            out.append(Case("resnet50", f"bn {c}x{hw}^2 b{batch}", "batch_norm", (batch, c, hw, hw),
                            "batch", activation="relu"))
    # channels_last, as mixed-precision ResNet training runs, at the largest and smallest maps
    for c, hw in (stages[0], stages[-1]):
        out.append(Case("resnet50", f"bn {c}x{hw}^2 b256 cl", "batch_norm", (256, c, hw, hw), "batch",
                        channels_last=True, activation="relu"))
    return out


def _sd_unet() -> list[Case]:
    out = []
    for c, hw in ((320, 64), (640, 32), (1280, 16), (1280, 8)):
        for batch in (1, 2, 8):
            for cl in (False, True):
                tag = " cl" if cl else ""
                out.append(Case("sd-unet", f"gn32+silu {c}x{hw}^2 b{batch}{tag}", "group_norm",
                                (batch, c, hw, hw), "group", num_groups=32, channels_last=cl,
                                activation="silu"))
    return out


def _llm() -> list[Case]:
    out = []
    for kind, center in (("layer_norm", True), ("rms_norm", False)):
        short = "ln" if center else "rms"
        for d in (1024, 2048, 4096, 8192, 16384):
            out.append(Case("llm", f"{short} 4096x{d}", kind, (4096, d), "C", center=center))
        for rows in (1, 32, 256):
            out.append(Case("llm", f"{short} {rows}x4096", kind, (rows, 4096), "C", center=center))
    return out


def _nnunet() -> list[Case]:
    # nnU-Net 3d_fullres encoder at patch 128^3, batch 2: InstanceNorm3d(affine) + LeakyReLU.
    out = []
    for c, s in ((32, 128), (64, 64), (128, 32), (256, 16), (320, 8)):
        out.append(Case("nnunet", f"in3d {c}x{s}^3 b2", "instance_norm", (2, c, s, s, s), "instance",
                        activation="leaky_relu"))
    return out


_BUILDERS = {"resnet50": _resnet50, "sd-unet": _sd_unet, "llm": _llm, "nnunet": _nnunet}


def cases(suite: str = "all") -> list[Case]:
    """The cases of one suite, or of all of them."""
    if suite == "all":
        return [c for name in SUITES for c in _BUILDERS[name]()]
    if suite not in _BUILDERS:
        raise ValueError(f"suite={suite!r}: expected one of {', '.join(SUITES)} or 'all'")
    return _BUILDERS[suite]()


def by_name(items: list, name_filter: str | None, name=lambda item: item.name) -> list:
    """``items`` whose name contains one of the comma-separated texts of ``name_filter``, the
    first text's matches first (then each in ``items``' order), each once; all of them without a
    filter. ``tritonorm bench --filter`` and ``tritonorm tune --filter``."""
    if not name_filter:
        return list(items)
    texts = [t.strip() for t in name_filter.split(",") if t.strip()]
    picked = {id(item): item for text in texts for item in items if text in name(item)}
    return list(picked.values())


def make_inputs(case: Case, dtype, device, requires_grad: bool = False, host_rng: bool = False):
    """(x, kwargs for tritonorm.norm) for a case; weight and bias in x's dtype.

    ``host_rng``: draw on the CPU and copy to ``device`` (the tuner: a CUDA-graph capture that a
    candidate invalidates leaves the CUDA generator in capture mode, and every later draw on the
    device raises "Offset increment outside graph capture")."""
    import torch

    def randn(shape, dtype=torch.float32, device=device):
        if host_rng:
            return torch.randn(shape).to(device=device, dtype=dtype)
        return torch.randn(shape, dtype=dtype, device=device)

    x = randn(case.shape, dtype=dtype, device=device)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    c = case.shape[1]
    kw = dict(num_groups=case.num_groups, center=case.center, activation=case.activation)
    if case.sample_groups > 1:
        kw["sample_groups"] = case.sample_groups
    if case.affine:
        kw["weight"] = (1 + 0.1 * randn(c, device=device)).to(dtype)
        if case.center:
            kw["bias"] = (0.1 * randn(c, device=device)).to(dtype)
    if case.kind.startswith("add_"):
        kw["add_residual"] = randn(case.shape, dtype=dtype, device=device)
    if case.kind in ADAPTIVE_KINDS:  # per-sample modulation: weight 1 + scale, bias shift
        shape = ada_param_shape(case)
        kw["weight"] = (1 + 0.1 * randn(shape, device=device)).to(dtype)
        kw["bias"] = (0.1 * randn(shape, device=device)).to(dtype)
    if requires_grad:
        x.requires_grad_(True)
        for k in ("weight", "bias", "add_residual"):
            if k in kw:
                kw[k].requires_grad_(True)
    return x, kw


def run(case: Case, x, kw, **extra):
    """y of the case's tritonorm call: ``norm``, or ``add_norm`` for the add_* kinds."""
    import tritonorm

    if "add_residual" in kw:
        rest = {k: v for k, v in kw.items() if k != "add_residual"}
        return tritonorm.add_norm(x, kw["add_residual"], case.scope, **rest, **extra)[0]
    return tritonorm.norm(x, case.scope, **kw, **extra)


def meta_input(case: Case, dtype):
    """A meta tensor with the case's shape and layout (for explain on any machine)."""
    import torch

    x = torch.empty(case.shape, dtype=dtype, device="meta")
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _ghost_bn() -> list[Case]:
    """Ghost Batch Normalization: ResNet-50's BatchNorm stages at batch 256 with virtual batches
    of 32 (sample_groups=8), as large-batch training runs it; one launch where the usual
    implementation loops over 8 chunks."""
    stages = ((64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7))
    return [Case("ghost-bn", f"gbn {c}x{hw}^2 b256/32", "ghost_batch_norm", (256, c, hw, hw), "batch",
                 activation="relu", sample_groups=8) for c, hw in stages]


SUITES = SUITES + ("ghost-bn",)
_BUILDERS["ghost-bn"] = _ghost_bn


def _prenorm() -> list[Case]:
    """The pre-norm residual step of LLM blocks, h = x + residual then RMSNorm (tritonorm.add_norm;
    vLLM's fused_add_rms_norm), at Llama-7B/70B widths from decode (1 token) to long prefill."""
    return [Case("prenorm", f"add+rms {rows}x{d}", "add_rms_norm", (rows, d), "C", center=False)
            for d in (4096, 8192) for rows in (1, 1024, 4096, 16384)]


SUITES = SUITES + ("prenorm",)
_BUILDERS["prenorm"] = _prenorm


# Adaptive (per-sample) affine: norm(x) * (1 + scale[n]) + shift[n], one norm with a broadcast
# weight and bias (docs/api.md). ada_layer_norm: x (N, T, D) normalized over D ("L"), scale and
# shift (N, 1, D) (DiT's adaLN); ada_group_norm: x (N, C, H, W), GroupNorm(32), scale and shift
# (N, C, 1, 1) (diffusers' AdaGroupNorm, and with SiLU the scale_shift norm of ResnetBlock2D).
ADAPTIVE_KINDS = ("ada_layer_norm", "ada_group_norm", "cond_batch_norm")


def ada_param_shape(case: Case) -> tuple:
    n = case.shape[0]
    if case.kind == "ada_layer_norm":
        return (n, 1, case.shape[2])
    return (n, case.shape[1]) + (1,) * (len(case.shape) - 2)


def _adaptive() -> list[Case]:
    out = [Case("adaptive", f"adaLN {t}x1152 b{n}", "ada_layer_norm", (n, t, 1152), "L")
           for n, t in ((8, 256), (8, 1024), (4, 4096))]
    for c, hw in ((320, 64), (640, 32), (1280, 16)):
        out.append(Case("adaptive", f"ada-gn32 {c}x{hw}^2 b2", "ada_group_norm", (2, c, hw, hw), "group",
                        num_groups=32))
        out.append(Case("adaptive", f"scale_shift gn32+silu {c}x{hw}^2 b2", "ada_group_norm", (2, c, hw, hw),
                        "group", num_groups=32, activation="silu"))
    # Conditional BatchNorm (BigGAN-style class-conditional gain and bias, per (sample, channel)).
    for c, hw, act in ((256, 32, None), (512, 16, "relu")):
        out.append(Case("adaptive", f"cond-bn{'+' + act if act else ''} {c}x{hw}^2 b8", "cond_batch_norm",
                        (8, c, hw, hw), "batch", activation=act))
    return out


SUITES = SUITES + ("adaptive",)
_BUILDERS["adaptive"] = _adaptive
