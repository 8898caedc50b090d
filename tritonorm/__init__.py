"""tritonorm: Triton kernels for normalization layers.

``import tritonorm`` works where triton cannot be imported: then only the reference path runs.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import reference, scope
from .backend import triton_available
from .core import moments, norm

__all__ = ["__version__", "norm", "moments", "reference", "scope", "triton_available"]

from . import functional  # noqa: E402
from .core import norm_with_stats  # noqa: E402
from .dispatch import Plan  # noqa: E402
from .explain import explain  # noqa: E402
from .orth import orthogonalize  # noqa: E402
from . import nn  # noqa: E402
from .patching import patch, report, unpatch  # noqa: E402
from .prenorm import add_norm  # noqa: E402

__all__ += ["functional", "norm_with_stats", "explain", "Plan", "orthogonalize", "nn", "patch",
            "unpatch", "report", "add_norm"]
