"""Drop-in modules (``tritonorm.nn``)."""

from .orth import CenteredWeightNorm, OrthConv1d, OrthConv2d, OrthConv3d, OrthLinear, centered_weight_norm
from .whitening import DBN, IterNorm

__all__ = [
    "OrthLinear", "OrthConv1d", "OrthConv2d", "OrthConv3d", "CenteredWeightNorm",
    "centered_weight_norm", "IterNorm", "DBN",
]
