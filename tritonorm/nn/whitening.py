"""Whitening layers: IterNorm (Newton-Schulz) and DBN (ZCA by eigendecomposition), ALGORITHMS §3-4.

Channels form contiguous groups of ``num_channels`` (or ⌈C/num_groups⌉) channels; the last group
may be smaller. Per group, over all other axes (m = N·prod(spatial) samples):
``Σ = Xc·Xcᵀ/m + eps·I``; IterNorm whitens with ``B_T(Σ/tr Σ)/√tr Σ``, DBN with ``Σ^{-1/2}``.
Running mean and whitening matrix are kept for eval: ``r ← (1 − momentum)·r + momentum·batch``.

Nothing is read back to the host: a group whose Newton iteration diverged is standardized instead
(``ops.fallback_isqrt``), and such groups and groups with non-finite statistics are counted in the
``orth_events`` buffer, read with ``tritonorm.orth.event_counts``/``check`` (docs/orthogonalization.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import backend as _backend
from ..orth import api, ops, reference


class _Whitening(nn.Module):
    def __init__(self, num_features: int, num_groups: int, num_channels: int | None, T: int, eps: float,
                 momentum: float, affine: bool, method: str, backend: str) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("num_groups", num_groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_channels is not None and (isinstance(num_channels, bool) or not isinstance(num_channels, int)
                                         or num_channels < 1):
            raise ValueError(f"num_channels must be a positive int or None, got {num_channels!r}")
        api.check_common(iters=T, eps=eps, iters_name="T")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        _backend.check_backend_name(backend)
        size = min(num_channels or math.ceil(num_features / num_groups), num_features)
        groups = math.ceil(num_features / size)
        self.num_features, self.group_size, self.num_groups = num_features, size, groups
        self.T, self.eps, self.momentum, self.affine = T, eps, momentum, affine
        self.method, self.backend = method, backend
        # Padded to (groups, size, size) when the last group is smaller; only its top-left block is used.
        self.register_buffer("running_mean", torch.zeros(groups, size, 1))
        self.register_buffer("running_wm", torch.eye(size).repeat(groups, 1, 1))
        # [fallbacks, nonfinite] groups, counted on the device; not persistent (checkpoints unchanged).
        self.register_buffer("orth_events", api.new_events(), persistent=False)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _whitening_matrix(self, xc: torch.Tensor, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, n, m) centred samples → ``(wm, fell_back)``: (G, n, n) and the (G,) bool flags of the
        groups whose Newton iterate diverged and were standardized instead (all False for DBN)."""
        sigma = reference.gram(xc, self.eps, scale=1.0 / xc.shape[-1])
        if self.method == "eigen":
            wm, ok = api.eigen_isqrt(sigma, self.eps)
            wm = torch.where(ok[:, None, None], wm, torch.nan)  # counted as non-finite by the caller
            return wm, torch.zeros_like(ok)
        tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
        b, bad = ops.newton_isqrt(sigma / tr, self.T, use_triton)
        return b * tr.rsqrt(), bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C) or (N, C, *spatial) → the same shape and dtype."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"x must be (N, {self.num_features}, *spatial), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got dtype {x.dtype}")
        samples = x.numel() // self.num_features
        if self.training and samples < 2:
            raise ValueError(f"x has {samples} value per channel; training needs more than 1 (shape {tuple(x.shape)})")
        use_triton = _backend.resolve(self.backend, x.device, x.dtype) == "triton"
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        parts, fell_back, nonfinite = [], [], []
        for start, count, size, xg in reference.channel_groups(x.to(acc), self.group_size):
            g = slice(start // self.group_size, start // self.group_size + count)
            if self.training:
                mu = xg.mean(dim=-1, keepdim=True)
                xc = xg - mu
                wm, bad = self._whitening_matrix(xc, use_triton)
                # Any inf/NaN in a group's samples reaches its mean, and overflow its matrix.
                ok = ~(ops.nonfinite_groups(mu.detach()) | ops.nonfinite_groups(wm.detach()))
                self._update(g, size, mu.detach(), wm.detach(), ok)
                fell_back.append(bad.sum())
                nonfinite.append((~ok).sum())
            else:
                mu = self.running_mean[g, :size].to(acc)
                wm = self.running_wm[g, :size, :size].to(acc)
                xc = xg - mu
            parts.append(torch.matmul(wm, xc))
        if fell_back:
            with torch.no_grad():
                self.orth_events.add_(torch.stack([sum(fell_back), sum(nonfinite)]))
        out = reference.ungroup(parts, x.shape)
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = out * self.weight.reshape(shape).to(acc) + self.bias.reshape(shape).to(acc)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update(self, g: slice, size: int, mu: torch.Tensor, wm: torch.Tensor, ok: torch.Tensor) -> None:
        """Running averages, skipping (per group, on the device) groups with non-finite statistics,
        so that one bad batch does not poison the eval statistics for good."""
        m = self.momentum
        rm = self.running_mean[g, :size]
        rw = self.running_wm[g, :size, :size]
        keep = ok.reshape(-1, 1, 1)
        rm.copy_(torch.where(keep, rm * (1.0 - m) + mu.to(rm.dtype) * m, rm))
        rw.copy_(torch.where(keep, rw * (1.0 - m) + wm.to(rw.dtype) * m, rw))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, group_size={self.group_size}, num_groups={self.num_groups}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}")


class IterNorm(_Whitening):
    """Iterative normalization: whitening by ``T`` Newton-Schulz steps on ``Σ/tr Σ`` (scaled by
    ``1/√tr Σ``), per contiguous channel group. Input (N, C) or (N, C, *spatial); affine per channel
    (weight 1, bias 0 at init) when ``affine``. Groups of at most 64 channels run the fused Triton
    iteration (forward and backward); larger groups use batched matmuls.
    """

    def __init__(self, num_features: int, num_groups: int = 1, num_channels: int | None = None, T: int = 5,
                 eps: float = 1e-5, momentum: float = 0.1, affine: bool = True, *, backend: str = "auto") -> None:
        super().__init__(num_features, num_groups, num_channels, T, eps, momentum, affine, "newton", backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", T={self.T}"


class DBN(_Whitening):
    """Decorrelated batch normalization: ZCA whitening ``Σ^{-1/2}·Xc`` by eigendecomposition
    (``torch.linalg.eigh``, backward finite for repeated eigenvalues), per contiguous channel group.
    Input (N, C) or (N, C, *spatial); no affine by default, as in the reference.
    """

    def __init__(self, num_features: int, num_groups: int = 1, num_channels: int | None = None,
                 eps: float = 1e-5, momentum: float = 0.1, affine: bool = False, *, backend: str = "auto") -> None:
        super().__init__(num_features, num_groups, num_channels, 1, eps, momentum, affine, "eigen", backend)
