"""Activation names accepted by the fused epilogue, and their PyTorch definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> (kernel code, PyTorch function). The codes are what the Triton kernels switch on.
_TABLE = {
    None: (0, lambda t: t),
    "relu": (1, F.relu),
    "leaky_relu": (2, lambda t: F.leaky_relu(t, 0.01)),
    "silu": (3, F.silu),
    "gelu": (4, F.gelu),
    "gelu_tanh": (5, lambda t: F.gelu(t, approximate="tanh")),
    "sigmoid": (6, torch.sigmoid),
    "tanh": (7, torch.tanh),
}

NAMES = tuple(k for k in _TABLE if k is not None)


def check(activation) -> str | None:
    if activation is None:
        return None
    if not isinstance(activation, str):
        raise TypeError(f"activation must be None or a string, got {type(activation).__name__}")
    name = activation.lower()
    if name == "none":
        return None
    if name not in _TABLE:
        raise ValueError(f"activation={activation!r} is not supported; expected None or one of {', '.join(NAMES)}")
    return name


def code(activation: str | None) -> int:
    return _TABLE[activation][0]


def apply(activation: str | None, t: torch.Tensor) -> torch.Tensor:
    return _TABLE[activation][1](t)


def grad(activation: str | None, z: torch.Tensor) -> torch.Tensor | None:
    """d act(z) / dz in closed form, the PyTorch twin of the kernels' ``activation_grad``
    (for paths that run below autograd: custom-op bodies and hand-written backwards).
    None for the identity."""
    if activation is None:
        return None
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "leaky_relu":
        return torch.where(z > 0, 1.0, 0.01).to(z.dtype)
    if activation in ("silu", "sigmoid"):
        s = torch.sigmoid(z)
        return s + z * s * (1 - s) if activation == "silu" else s * (1 - s)
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if activation == "gelu_tanh":
        k = 0.7978845608028654
        t = torch.tanh(k * (z + 0.044715 * z ** 3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
    if activation == "tanh":
        return 1 - torch.tanh(z) ** 2
    raise ValueError(f"activation={activation!r} is not supported")
