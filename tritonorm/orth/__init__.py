"""Orthogonalization (OLM/OWN, ONI) and the shared inverse-square-root machinery of IterNorm/DBN.

``orthogonalize`` is the public entry point (``tritonorm.orthogonalize``); ``reference`` holds the
pure-PyTorch definitions; ``ops`` the Triton launchers and registered ops; ``kernels`` the
``@triton.jit`` code. See docs/orthogonalization.md.
"""

from __future__ import annotations

from . import reference
from .api import orthogonalize

__all__ = ["orthogonalize", "reference"]
