"""Drop-in modules (``tritonorm.nn``).

Normalization modules keep their torch counterparts' constructor arguments, parameter and buffer
names (a state_dict loads both ways) and add ``activation=``; see docs/modules.md.
"""

from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d, InstanceNorm2d,
                      InstanceNorm3d, LayerNorm, Norm, RMSNorm)
from .orth import CenteredWeightNorm, OrthConv1d, OrthConv2d, OrthConv3d, OrthLinear, centered_weight_norm
from .switchable import SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from .sync_batchnorm import SyncBatchNorm
from .whitening import DBN, IterNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "LayerNorm", "RMSNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "Norm", "SyncBatchNorm",
    "SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SparseSwitchNorm2d",
    "OrthLinear", "OrthConv1d", "OrthConv2d", "OrthConv3d", "CenteredWeightNorm",
    "centered_weight_norm", "IterNorm", "DBN", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
]
