"""SyncBatchNorm: BatchNorm whose statistics span every rank of a ``torch.distributed`` group.

Forward, per training step:
  1. local per-channel moments (count, mean, M2) in fp32 from one pass of tritonorm's batch-scope
     kernel (float64 input: float64, on the reference path);
  2. one all-reduce of a (world, 1 + 2C) float64 table, each rank filling its own row;
  3. Chan's merge of the rows: ``n = sum n_i``, ``mean = sum n_i mean_i / n``,
     ``M2 = sum M2_i + sum n_i (mean_i - mean)^2`` (no ``E[x^2] - E[x]^2``);
  4. the fused epilogue (normalize, affine, activation) on tritonorm's kernels.
Backward: the statistic gradients of each rank (the two per-channel sums of PyTorch's SyncBN
backward) are all-reduced once, then ``dx = dx_direct + (dmean + 2 dvar (x - mean)) / n``.
No host synchronisation; uneven per-rank batch sizes (zero included) are fine. Running statistics
are those of one BatchNorm over the global batch (unbiased variance, PyTorch's momentum rule).

Without an initialized process group (or with a group of one rank), and in eval mode, it is
exactly ``tritonorm.nn.BatchNorm*``, as PyTorch's SyncBatchNorm falls back to BatchNorm. Unlike
PyTorch's, CPU tensors are synchronized too (gloo), so the module can be tested without GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import activations, functional
from ..core import moments
from . import modules as _ours
from .modules import _ResetWithoutBias, _call_norm, _extra, _momentum_factor, init_base
from .switchable import apply_stats

__all__ = ["SyncBatchNorm", "sync_batch_norm"]

torch.fx.wrap("_call_norm")  # one opaque call under torch.fx, as in modules.py


def _local_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of the local batch (zeros for an empty batch)."""
    c = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        zero = torch.zeros(c, dtype=acc, device=x.device)
        return zero, zero.clone()
    mean, var = moments(x.detach(), "batch")  # statistics only: nothing else written
    return mean.reshape(c).to(acc), var.reshape(c).to(acc)


class _GlobalMoments(torch.autograd.Function):
    """(mean, biased var, count) over the union of the ranks' batches; differentiable in x."""

    @staticmethod
    def forward(ctx, x, group):
        c = x.shape[1]
        count = x.numel() // c if c else 0
        mean, var = _local_moments(x)
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        table = torch.zeros(world, 1 + 2 * c, dtype=torch.float64, device=x.device)
        table[rank, 0] = count
        table[rank, 1:1 + c] = mean.double()
        table[rank, 1 + c:] = var.double() * count  # M2
        dist.all_reduce(table, group=group)
        counts = table[:, :1]
        means, m2s = table[:, 1:1 + c], table[:, 1 + c:]
        n = counts.sum()
        gmean = (counts * means).sum(0) / n
        gm2 = m2s.sum(0) + (counts * (means - gmean).square()).sum(0)
        gvar = gm2 / n
        ctx.save_for_backward(x, gmean, n)
        ctx.group = group
        ctx.mark_non_differentiable(n)
        return gmean.to(mean.dtype), gvar.to(mean.dtype), n

    @staticmethod
    def backward(ctx, dmean, dvar, _dn):
        x, gmean, n = ctx.saved_tensors
        c = x.shape[1]
        sums = torch.stack([torch.zeros(c, dtype=torch.float64, device=x.device) if d is None else d.double()
                            for d in (dmean, dvar)])
        dist.all_reduce(sums, group=ctx.group)
        shape = [1, c] + [1] * (x.dim() - 2)
        acc = dmean.dtype if dmean is not None else dvar.dtype
        m = gmean.to(acc).reshape(shape)
        dx = (sums[0].to(acc).reshape(shape)
              + 2.0 * sums[1].to(acc).reshape(shape) * (x.to(acc) - m)) / n.to(acc)
        return dx.to(x.dtype), None


def sync_batch_norm(input: torch.Tensor, weight, bias, running_mean, running_var, momentum: float,
                    eps: float, group, *, activation: str | None = None) -> torch.Tensor:
    """Training-mode batch normalization with statistics over every rank of ``group``.

    Every rank of the group must call it (it runs collectives in forward and backward).
    ``running_mean``/``running_var`` (or None) are updated with the global statistics.
    """
    act = activations.check(activation)
    gmean, gvar, n = _GlobalMoments.apply(input, group)
    if running_var is not None:
        with torch.no_grad():
            unbiased = gvar.detach() * (n / (n - 1))
            running_mean.mul_(1 - momentum).add_(gmean.detach().to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return apply_stats(input, gmean, gvar, weight, bias, eps, act, "channel")


class SyncBatchNorm(_ResetWithoutBias, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on tritonorm's kernels, plus ``activation=``; synchronizes CPU
    (gloo) tensors as well as CUDA (NCCL) ones. See the module docstring for the algorithm."""

    activation = None

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True, activation=None):
        act = activations.check(activation)
        init_base(nn.SyncBatchNorm, self, num_features, eps, momentum, affine, track_running_stats,
                  process_group, device, dtype, bias=bias)
        self.activation = act

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _call_norm(self, input)

    def _norm_forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = _momentum_factor(self)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep else None
        running_var = self.running_var if keep else None
        group = None
        if bn_training and self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            if dist.get_world_size(group) <= 1:
                group = None
        if group is None:
            return functional.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                         bn_training, factor, self.eps, activation=self.activation)
        return sync_batch_norm(input, self.weight, self.bias, running_mean, running_var, factor,
                               self.eps, group, activation=self.activation)

    def extra_repr(self) -> str:
        return _extra(self, super().extra_repr())

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, but in place and sharing the same
        tensors: every module of exact type ``nn.BatchNorm1d/2d/3d`` (torch's or tritonorm's)
        becomes this class; other norms are untouched. ``tritonorm.unpatch`` turns them back.
        ``tritonorm.patch(model, sync_batchnorm=True)`` does the same and patches the rest."""
        for m in module.modules():
            original = _BATCH_NORM_OF.get(type(m))
            if original is None or "forward" in m.__dict__:
                continue
            m.__dict__.setdefault("_tritonorm_original_class", original)
            m.process_group = process_group
            m.__class__ = cls
        return module


# Exact BatchNorm classes this module converts, mapped to the torch class unpatch restores.
_BATCH_NORM_OF = {nn.BatchNorm1d: nn.BatchNorm1d, nn.BatchNorm2d: nn.BatchNorm2d,
                  nn.BatchNorm3d: nn.BatchNorm3d, _ours.BatchNorm1d: nn.BatchNorm1d,
                  _ours.BatchNorm2d: nn.BatchNorm2d, _ours.BatchNorm3d: nn.BatchNorm3d}
