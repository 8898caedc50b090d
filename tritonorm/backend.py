"""Backend selection: which implementation runs a call.

``auto``      Triton for CUDA tensors; for CPU tensors too when ``TRITON_INTERPRET=1``
              (Triton's interpreter, how the kernels are tested without a GPU); else reference.
``triton``    the Triton kernels; an error when they cannot run on this tensor.
``reference`` pure PyTorch (``tritonorm.reference``): readable, float64-capable.

The default comes from the ``TRITONORM_BACKEND`` environment variable (``auto`` if unset).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "reference")


_IMPORT_ERROR: list = []  # filled once: [None] or [reason]; a plain list, not lru_cache, so
                         # torch.compile traces calls without warnings


def triton_import_error() -> str | None:
    """Why ``import triton`` fails here, or None when it works."""
    if not _IMPORT_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising anything else
            _IMPORT_ERROR.append(f"{type(exc).__name__}: {exc}")
        else:
            _IMPORT_ERROR.append(None)
    return _IMPORT_ERROR[0]


def triton_available() -> bool:
    return triton_import_error() is None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_backend() -> str:
    name = os.environ.get("TRITONORM_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"TRITONORM_BACKEND={name!r} is not a backend; expected one of {', '.join(BACKENDS)}"
        )
    return name


def check_backend_name(backend: str | None) -> str:
    if backend is None:
        return default_backend()
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    name = backend.lower()
    if name not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


def triton_can_run(device: torch.device) -> bool:
    """True when Triton kernels can run on tensors of this device in this process."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype | None = None,
            triton_dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)) -> str:
    """Return ``"triton"`` or ``"reference"`` for a call, or raise if ``backend="triton"`` cannot run.

    ``auto`` falls back to the reference for dtypes the kernels do not take (float64).
    """
    name = check_backend_name(backend)
    if name == "reference":
        return "reference"
    runnable = triton_can_run(device)
    dtype_ok = dtype is None or dtype in triton_dtypes
    if name == "triton":
        if not runnable:
            why = triton_import_error() or (
                f"tensors on {device.type} need a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"
            )
            raise ValueError(f"backend='triton' cannot run here: {why}")
        if not dtype_ok:
            names = ", ".join(str(d).replace("torch.", "") for d in triton_dtypes)
            raise TypeError(f"backend='triton' takes x of dtype {names}; got {str(dtype).replace('torch.', '')}")
        return "triton"
    return "triton" if runnable and dtype_ok else "reference"
