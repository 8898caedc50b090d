"""What a norm's forward keeps for its backward: the input and two fp32 words per statistic.

The forward kernels write a [5, P] fp32 buffer per call (pivot K, shifted mean, rstd, variance,
mean; kernels/common.py ``store_stats``). The backward kernels read only its first three rows,
and the pivot is a value of the input itself: the first element of each statistic's row (the
element whose reduced indices are all 0), read as fp32, or 0 where that is not finite, without
centring, with running statistics (eval) and in the torch regime. So autograd keeps only

    shifted mean and rstd   (a fresh [2, P] buffer; rstd alone, [1, P], without centring)

as a separate allocation (a view of the 5-row buffer would keep all of it alive), and ``unpack``
rebuilds the buffer the backward reads from them and the saved input: the pivot is read back
from x, the mean is K + shifted mean rounded as the kernel rounds it (both are one fp32 add), and
the variance row, which no first-order backward reads, is NaN. With running statistics (eval) the
whole buffer is kept: the double backward needs the given variance, and P is the channel count.

The same number of bytes as eager PyTorch's fused kernels on a GPU (x, fp32 mean and rstd).
"""

from __future__ import annotations

import torch

from .scope import Spec


def _leaf(plan):
    """The plan whose kernels ran (a plan over a restrided copy hands its launch to ``inner``)."""
    while getattr(plan, "inner", None) is not None:
        plan = plan.inner
    return plan


def pivoted(plan) -> bool:
    """Whether the forward's statistics are shifted by a per-row pivot read from x."""
    leaf = _leaf(plan)
    return leaf.mode == "train" and leaf.c.center and not leaf.native


def pack(plan, stats: torch.Tensor) -> torch.Tensor:
    """The part of the forward's [5, P] statistics that autograd keeps (a new allocation)."""
    if plan.mode != "train":
        return stats
    return stats[1:3].clone() if plan.c.center else stats[2:3].clone()


def pivots(x: torch.Tensor, spec: Spec, out: torch.Tensor) -> torch.Tensor:
    """Each statistic's pivot as the forward kernels take it (kernels/common.py ``pivot_input``):
    the row's first element as fp32, 0 where it is not finite; written into ``out`` (P fp32, the
    statistics' order)."""
    n, c = x.shape[0], x.shape[1]
    s, g = spec.sample_groups, spec.num_groups
    v = x.unflatten(1, (g, c // g))
    if s > 1:
        v = v.unflatten(0, (s, n // s))
    first = v[tuple(0 if red else slice(None) for _, _, red in spec.logical_axes(x.shape))]
    out.view(first.shape).copy_(first)
    return out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()  # statistics are constants to autograd, also in a create_graph backward
def unpack(plan, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The [5, P] statistics the backward plans read, rebuilt from what ``pack`` kept and x (the
    tensor the kernels normalized: add_norm's h)."""
    if plan.mode != "train":
        return kept
    p = kept.shape[1]
    stats = torch.empty((5, p), dtype=torch.float32, device=kept.device)
    if plan.c.center:
        stats[1:3] = kept
    else:
        stats[1].zero_()
        stats[2] = kept[0]
    if pivoted(plan):
        pivots(x, plan.c.spec, stats[0])
    else:
        stats[0].zero_()
    stats[3].fill_(float("nan"))  # not kept: no first-order backward reads the variance
    torch.add(stats[0], stats[1], out=stats[4])
    return stats
