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
