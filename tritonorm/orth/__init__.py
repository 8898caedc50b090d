"""Orthogonalization (OLM/OWN, ONI) and the shared inverse-square-root machinery of IterNorm/DBN.

``orthogonalize`` is the public entry point (``tritonorm.orthogonalize``); ``reference`` holds the
pure-PyTorch definitions; ``ops`` the Triton launchers and registered ops; ``kernels`` the
``@triton.jit`` code. ``check``/``event_counts``/``reset_events`` read the device-side counters
of diverged and non-finite groups (``orth_events`` buffers). See docs/orthogonalization.md.
"""

from __future__ import annotations

from . import reference
from .api import check, event_counts, new_events, orthogonalize, reset_events

__all__ = ["orthogonalize", "reference", "check", "event_counts", "new_events", "reset_events"]
