"""Ghost Batch Normalization (virtual batches): ``GhostBatchNorm1d/2d/3d``.

BatchNorm whose training statistics are taken per *virtual batch*: the batch is cut into
consecutive groups of ``virtual_batch_size`` samples and each group is normalized with its own
per-channel statistics (Hoffer et al., 2017; TabNet). Where the usual implementation loops over
``x.split(virtual_batch_size)`` and runs BatchNorm once per chunk, these modules make the groups
an axis of the scope (``tritonorm.norm(..., sample_groups=S)``): one launch for the whole batch,
forward and backward.

* A batch that is not a multiple of ``virtual_batch_size`` ends with a smaller group, as
  ``x.split(virtual_batch_size)`` gives it. That group runs as a second launch.
* Running statistics: one update per call, from the mean over the groups of each group's mean and
  unbiased variance (the rule torch's instance_norm uses for its running statistics); the
  loop-over-chunks implementations instead update once per chunk. Eval normalizes the whole batch
  with the running statistics, as BatchNorm does.
* Parameters and buffers are BatchNorm's (each class subclasses its ``torch.nn.BatchNorm``), so
  a trained BatchNorm's ``state_dict`` loads into it and back.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import activations
from ..core import norm, norm_with_stats
from .modules import _extra, _momentum_factor

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostMixin:
    activation = None

    def _group_sizes(self, n: int) -> tuple[int, int]:
        """(full groups, size of the smaller last group or 0) for a batch of n samples."""
        vbs = self.virtual_batch_size
        if n <= vbs:
            return 1, 0
        return n // vbs, n % vbs

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"input must have {self.num_features} channels (N, C, *spatial), "
                             f"got shape {tuple(input.shape)}")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        full, last = self._group_sizes(input.shape[0])
        if bn_training and input.numel():
            positions = math.prod(input.shape[2:])
            smallest = min(self.virtual_batch_size, input.shape[0]) if not last else last
            if smallest * positions < 2:  # checked before the batch is counted: nothing changes
                raise ValueError(
                    f"virtual_batch_size={self.virtual_batch_size}: a group of {smallest} sample(s) "
                    f"of input shape {tuple(input.shape)} gives one value per channel; expected more "
                    "than 1 value per channel in training")
        factor = _momentum_factor(self)
        keep = not self.training or self.track_running_stats
        rm = self.running_mean if keep else None
        rv = self.running_var if keep else None
        kw = dict(weight=self.weight, bias=self.bias, eps=self.eps, activation=self.activation)
        if not bn_training:  # eval: the running statistics, whatever the groups
            return norm(input, "batch", running_mean=rm, running_var=rv, momentum=factor,
                        training=False, **kw)
        if not last:
            return norm(input, "batch", sample_groups=full, running_mean=rm, running_var=rv,
                        momentum=factor, training=True, **kw)
        cut = full * self.virtual_batch_size
        head, mean_h, var_h = norm_with_stats(input[:cut], "batch", sample_groups=full, **kw)
        tail, mean_t, var_t = norm_with_stats(input[cut:], "batch", **kw)
        if rv is not None:
            positions = math.prod(input.shape[2:])
            groups = [(mean_h, var_h, self.virtual_batch_size * positions),
                      (mean_t[None], var_t[None], last * positions)]
            _update_unequal(groups, rm, rv, factor)
        return torch.cat([head, tail])

    def extra_repr(self) -> str:
        return _extra(self, f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}")


def _update_unequal(groups, running_mean, running_var, momentum: float) -> None:
    """The running update for groups of unequal sizes, as ``tritonorm.norm`` makes it for equal
    ones: the mean over every group of its mean and its unbiased variance. ``groups``: (mean,
    biased var, values per statistic) with the statistics shaped (groups, C)."""
    with torch.no_grad():
        means = torch.cat([m for m, _, _ in groups]).mean(dim=0)
        unbiased = torch.cat([v * (count / (count - 1)) for _, v, count in groups]).mean(dim=0)
        running_mean.mul_(1 - momentum).add_(means.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def _ghost_class(base: type, name: str) -> type:
    def __init__(self, num_features, virtual_batch_size, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, activation=None):
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
            raise TypeError(f"virtual_batch_size must be an int, got {type(virtual_batch_size).__name__}")
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
        act = activations.check(activation)
        base.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = virtual_batch_size
        self.activation = act

    doc = (f"``torch.nn.{base.__name__}`` with statistics per virtual batch of "
           "``virtual_batch_size`` consecutive samples (Ghost Batch Normalization), on one launch "
           "for the whole batch; plus ``activation=``. See the module docstring and docs/modules.md.")
    return type(name, (_GhostMixin, base), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


GhostBatchNorm1d = _ghost_class(nn.BatchNorm1d, "GhostBatchNorm1d")
GhostBatchNorm2d = _ghost_class(nn.BatchNorm2d, "GhostBatchNorm2d")
GhostBatchNorm3d = _ghost_class(nn.BatchNorm3d, "GhostBatchNorm3d")
