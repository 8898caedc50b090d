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


def _sigmoid_and_complement(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid(z), 1 - sigmoid(z)) without the cancellation of 1 - s once s rounds to 1."""
    s = torch.sigmoid(z)
    return s, torch.where(z < 0, 1 - s, torch.exp(-z) * s)


def grad(activation: str | None, z: torch.Tensor) -> torch.Tensor | None:
    """d act(z) / dz in closed form, the PyTorch twin of the kernels' ``activation_grad``
    (for paths that run below autograd: custom-op bodies and hand-written backwards).
    None for the identity.

    At NaN and +-inf it gives what torch's autograd gives: relu'(NaN) = 1 (torch's relu
    backward zeroes the gradient where z <= 0 only), leaky_relu'(NaN) = 0.01, and NaN where the
    derivative meets inf * 0 (silu, gelu, gelu_tanh at +-inf).
    """
    if activation is None:
        return None
    if activation == "relu":
        return torch.where(z <= 0, 0.0, 1.0).to(z.dtype)
    if activation == "leaky_relu":
        return torch.where(z > 0, 1.0, 0.01).to(z.dtype)
    if activation in ("silu", "sigmoid"):
        s, c = _sigmoid_and_complement(z)
        return s * (1 + z * c) if activation == "silu" else s * c
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if activation == "gelu_tanh":
        # 0.5 (1 + tanh(u)) = sigmoid(2u), u = k (z + 0.044715 z^3): s (1 + 2 z (1 - s) u')
        s, c = _sigmoid_and_complement(1.5957691216057308 * (z + 0.044715 * z ** 3))
        return s * (1 + z * c * (1.5957691216057308 + 0.21406444881780076 * z * z))
    if activation == "tanh":
        return 1 - torch.tanh(z) ** 2
    raise ValueError(f"activation={activation!r} is not supported")
