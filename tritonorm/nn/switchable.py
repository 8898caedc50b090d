"""Switchable Normalization (Luo et al., ICLR 2019) and Sparse Switchable Normalization
(Shao et al., CVPR 2019), as their public reference implementations compute them
(ALGORITHMS.md sections 5 and 6; the conventions that differ from PyTorch are in docs/modules.md).

Where the work runs:

* The per-(n, c) instance moments come from one statistics-only pass of tritonorm's kernels
  (``tritonorm.moments``; fp32 accumulation, Chan merges, no ``E[x^2] - E[x]^2``, no output
  written).
* Layer and batch moments are derived from them on the small (N, C) tensors with the equal-count
  identities ``var_ln = mean_c(var_in) + mean_c((mean_in - mean_ln)^2)`` (and the same over n),
  algebraically identical to the reference's ``mean(var_in + mean_in^2) - mean_ln^2`` without its
  cancellation. The softmax (or sparsestmax) mixing is ordinary autograd on those small tensors.
* The normalization by the mixed statistics, affine and optional activation is one pass of
  tritonorm's given-statistics kernel (``apply_stats``); its backward runs tritonorm's backward
  kernel for dx, dweight, dbias and two PyTorch reductions for the statistics' gradients.

``moments`` and ``apply_stats`` are the differentiable pieces the modules are built from;
SyncBatchNorm uses them too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import activations
from ..core import moments as _core_moments, norm

__all__ = ["SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SparseSwitchNorm2d", "sparsemax",
           "sparsestmax", "radius_schedule", "moments", "apply_stats"]

def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _keep_shape(x: torch.Tensor, sum_dims) -> list[int]:
    return [1 if d in sum_dims else s for d, s in enumerate(x.shape)]


def moments(x: torch.Tensor, per: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable mean and biased variance of ``x`` (N, C, *spatial).

    ``per="instance"``: shape (N, C), over the spatial axes. ``per="channel"``: shape (C,), over N
    and the spatial axes. Accumulated in fp32 (float64 input: float64); one statistics-only pass
    of the kernels (``tritonorm.moments``).
    """
    return _core_moments(x, {"instance": "instance", "channel": "batch"}[per])


class _ApplyStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, activation, per):
        ctx.save_for_backward(x, mean, var, weight, bias)
        ctx.cfg = (eps, activation, per)
        with torch.no_grad():
            return _apply_norm(x, mean, var, weight, bias, eps, activation, per)

    @staticmethod
    def backward(ctx, dy):
        x, mean, var, weight, bias = ctx.saved_tensors
        eps, activation, per = ctx.cfg
        need_x, need_m, need_v, need_w, need_b = ctx.needs_input_grad[:5]
        if torch.compiler.is_compiling():
            # Traced graphs take the PyTorch formula (the compiler fuses it); eager runs
            # tritonorm's backward kernel below.
            dx_direct, dw, db = _direct_grads_torch(dy, x, mean, var, weight, bias, eps, activation, per)
            dw = dw if need_w else None
            db = db if need_b else None
        else:
            dx_direct, dw, db = _direct_grads_kernel(dy, x, mean, var, weight, bias, eps, activation,
                                                     per, need_w, need_b)
        dmean = dvar = None
        if need_m or need_v:
            sum_dims = tuple(range(2, x.dim())) if per == "instance" else (0, *range(2, x.dim()))
            shape = _keep_shape(x, sum_dims)
            g = dx_direct.to(mean.dtype)
            # sum(dim=()) would reduce every axis: a 2-D input has one element per statistic.
            total = (lambda t: t.sum(dim=sum_dims)) if sum_dims else (lambda t: t)
            if need_m:
                dmean = -total(g).reshape(mean.shape)
            if need_v:
                centered = x.to(mean.dtype) - mean.reshape(shape)
                dvar = -0.5 / (var + eps) * total(g * centered).reshape(var.shape)
        return (dx_direct if need_x else None, dmean, dvar, dw, db, None, None, None)


def _stat_view(stat: torch.Tensor, x: torch.Tensor, per: str) -> torch.Tensor:
    if per == "channel":
        return stat.reshape([1, -1] + [1] * (x.dim() - 2))
    return stat.reshape(list(stat.shape) + [1] * (x.dim() - 2))


def _direct_grads_torch(dy, x, mean, var, weight, bias, eps, activation, per):
    """dx at fixed statistics, dweight, dbias: the formula in PyTorch ops."""
    acc = mean.dtype
    c = x.shape[1]
    cshape = [1, c] + [1] * (x.dim() - 2)
    rstd = torch.rsqrt(_stat_view(var, x, per) + eps)
    xhat = (x.to(acc) - _stat_view(mean, x, per)) * rstd
    g = dy.to(acc)
    if activation is not None:
        pre = xhat
        if weight is not None:
            pre = pre * weight.to(acc).reshape(cshape)
        if bias is not None:
            pre = pre + bias.to(acc).reshape(cshape)
        g = g * activations.grad(activation, pre)
    red = [d for d in range(x.dim()) if d != 1]
    dw = (g * xhat).sum(red).to(weight.dtype) if weight is not None else None
    db = g.sum(red).to(bias.dtype) if bias is not None else None
    if weight is not None:
        g = g * weight.to(acc).reshape(cshape)
    return (g * rstd).to(x.dtype), dw, db


def _direct_grads_kernel(dy, x, mean, var, weight, bias, eps, activation, per, need_w, need_b):
    """The same through tritonorm's backward kernel: re-run the given-statistics forward under
    autograd (statistics detached) and take its gradients."""
    xd = x.detach().requires_grad_(True)
    inputs = [xd]
    wd = bd = None
    if weight is not None:
        wd = weight.detach().requires_grad_(bool(need_w))
        if need_w:
            inputs.append(wd)
    if bias is not None:
        bd = bias.detach().requires_grad_(bool(need_b))
        if need_b:
            inputs.append(bd)
    with torch.enable_grad():
        y = _apply_norm(xd, mean.detach(), var.detach(), wd, bd, eps, activation, per)
        grads = list(torch.autograd.grad(y, inputs, dy))
    dx_direct = grads.pop(0)
    dw = grads.pop(0) if weight is not None and need_w else None
    db = grads.pop(0) if bias is not None and need_b else None
    return dx_direct, dw, db


def _apply_norm(x, mean, var, weight, bias, eps, activation, per):
    if per == "channel":
        return norm(x, "batch", weight=weight, bias=bias, eps=eps, activation=activation,
                    running_mean=mean, running_var=var, training=False)
    # Per (n, c): view x as one sample of N*C channels so that the batch scope's given-statistics
    # path applies one (mean, var) pair per (n, c).
    n, c = x.shape[0], x.shape[1]
    xv = x.reshape(1, n * c, *x.shape[2:])
    if xv.dim() == 2:
        xv = xv.unsqueeze(-1)
    w = weight.repeat(n) if weight is not None else None
    b = bias.repeat(n) if bias is not None else None
    y = norm(xv, "batch", weight=w, bias=b, eps=eps, activation=activation,
             running_mean=mean.reshape(-1), running_var=var.reshape(-1), training=False)
    return y.reshape(x.shape)


def apply_stats(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight, bias, eps: float,
                activation: str | None, per: str) -> torch.Tensor:
    """``act(weight * (x - mean) / sqrt(var + eps) + bias)``, differentiable in every input.

    ``per="instance"``: mean/var of shape (N, C); ``per="channel"``: shape (C,). weight/bias (C,).
    """
    return _ApplyStats.apply(x, mean, var, weight, bias, eps, activation, per)


# ---------------------------------------------------------------------------------------------
# Mixing weights


def sparsemax(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of the vector ``v`` onto the probability simplex (Martins & Astudillo).

    Sort descending, ``rho`` = the last k with ``z_k - (sum_{j<=k} z_j - 1) / k > 0``,
    ``tau = (sum_{j<=rho} z_j - 1) / rho``, ``p = max(v - tau, 0)``. Differentiable almost everywhere.
    Tensor ops only (``rho`` is gathered, not read back), so it never waits for the device.
    """
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"sparsemax takes a non-empty 1-D tensor, got shape {tuple(v.shape)}")
    z, _ = torch.sort(v, descending=True)
    k = torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype)
    cssv = torch.cumsum(z, 0) - 1
    support = z - cssv / k > 0
    last = torch.where(support, k, torch.zeros_like(k)).argmax().reshape(1)  # the last k in support
    tau = cssv.gather(0, last) / k.gather(0, last)
    return torch.clamp(v - tau, min=0)


def _as_radius(rad, like: torch.Tensor) -> torch.Tensor:
    """``rad`` (a number or a one-element tensor, e.g. SSN's ``radius`` buffer) as a detached 0-dim
    tensor of ``like``'s dtype and device, made without a host round trip."""
    if isinstance(rad, torch.Tensor):
        if rad.numel() != 1:
            raise ValueError(f"rad must be a number or a one-element tensor, got shape {tuple(rad.shape)}")
        return rad.detach().reshape(()).to(device=like.device, dtype=like.dtype)
    if isinstance(rad, bool) or not isinstance(rad, (int, float)):
        raise TypeError(f"rad must be a number or a tensor, got {type(rad).__name__}")
    return torch.full((), float(rad), dtype=like.dtype, device=like.device)


def sparsestmax(v: torch.Tensor, rad) -> torch.Tensor:
    """Sparsestmax (Shao et al.): sparsemax, then pushed out of the ball of radius ``rad`` around
    the centre of its active face, recursing onto a smaller face when the push leaves the simplex.

    The reference's recursion, level by level::

        w = sparsemax(v); stop if w is one-hot
        u = 1[w > 0] / count(w > 0)               # centre of the active face
        r = rad (level 0), sqrt(max(r_prev² − ‖u − u_prev‖², 0)) after
        stop if ‖w − u‖ >= r:  return w
        p = r·(w − u)/‖w − u‖ + u;  if min(p) < 0: recurse on p,  else return clamp(p, 0, 1)

    Each recursion drops at least one entry from the support (p sums to 1, so sparsemax's
    threshold is >= 0 and cuts p's negative entries), so there are at most ``len(v)`` levels: they
    are unrolled here, every level computed and the answer picked with ``torch.where``, so the
    function reads nothing back to the host and traces with ``torch.compile(fullgraph=True)``.
    Levels after the answer see a finite stand-in (the last ``w``) and get a zero gradient.
    ``rad`` is a number or a one-element tensor (no gradient flows to it, as in the reference).

    One deliberate difference from the reference: where the sparsemax output sits on the face
    centre (tied weights, as at initialisation, with ``rad > 0``) the reference divides zero, or
    rounding noise, by a zero norm and returns NaN or an arbitrary direction; here a distance
    under 1e-6 returns the centre itself.
    """
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"sparsestmax takes a non-empty 1-D tensor, got shape {tuple(v.shape)}")
    r = _as_radius(rad, v)
    out = done = u_prev = None
    cur = v
    for _ in range(v.numel()):
        w = sparsemax(cur)
        wd = w.detach()
        one_hot = (wd.max() - wd.min()) == 1
        active = (wd > 0).to(w.dtype)
        u = active / active.sum()
        if u_prev is not None:
            r = (r * r - (u - u_prev).square().sum()).clamp_min(0).sqrt()
        distance = torch.linalg.vector_norm(w - u)
        dist = distance.detach()
        stop = one_hot | (dist >= r) | (dist < 1e-6)
        # Where this level stops, p is not used: divide by 1 so that it (and its gradient) stays finite.
        p = r * (w - u) / torch.where(stop, torch.ones_like(distance), distance) + u
        recurse = ~stop & (p.detach().min() < 0)
        result = torch.where(stop, w, p.clamp(0, 1))
        if out is None:
            out, done = result, ~recurse
        else:
            out = torch.where(done, out, result)
            done = done | ~recurse
        cur = torch.where(done, w, p)  # recurse on p; once answered, a finite stand-in
        u_prev = u
    return out


def radius_schedule(epoch: int, iteration: int, epochs: int, iters_per_epoch: int) -> float:
    """Sparse SN's radius: ``(epoch * iters_per_epoch + iteration) / (epochs * iters_per_epoch)``,
    rising linearly from 0 to 1 over training. Pass it to ``SparseSwitchNorm2d.set_rad``."""
    if epochs < 1 or iters_per_epoch < 1:
        raise ValueError("epochs and iters_per_epoch must be >= 1")
    return (epoch * iters_per_epoch + iteration) / (epochs * iters_per_epoch)


def _one_hot_at_max(v: torch.Tensor) -> torch.Tensor:
    """The one-hot vector at ``v``'s (first) largest entry, as the reference writes a frozen weight."""
    return (torch.arange(v.numel(), device=v.device) == v.argmax()).to(v.dtype)


# ---------------------------------------------------------------------------------------------
# Modules


def _check_common(num_features, eps, momentum) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")


class _SwitchNormNd(nn.Module):
    """Shared by SwitchNorm2d/3d and SparseSwitchNorm2d: the reference's parameters and buffers
    (names and shapes, so its checkpoints load), statistics and running-statistic rule."""

    _ndim = 4

    def __init__(self, num_features, eps=1e-5, momentum=0.9, using_moving_average=True,
                 using_bn=True, last_gamma=False, *, activation=None, device=None, dtype=None):
        super().__init__()
        _check_common(num_features, eps, momentum)
        for name, flag in (("using_moving_average", using_moving_average), ("using_bn", using_bn),
                           ("last_gamma", last_gamma)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.activation = activations.check(activation)
        self.num_features, self.eps, self.momentum = num_features, float(eps), float(momentum)
        self.using_moving_average, self.using_bn, self.last_gamma = using_moving_average, using_bn, last_gamma
        kw = {"device": device, "dtype": dtype}
        affine_shape = (1, num_features) + (1,) * (self._ndim - 2)
        self.weight = nn.Parameter(torch.ones(affine_shape, **kw))
        self.bias = nn.Parameter(torch.zeros(affine_shape, **kw))
        k = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(k, **kw))
        self.var_weight = nn.Parameter(torch.ones(k, **kw))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(1, num_features, 1, **kw))
            self.register_buffer("running_var", torch.zeros(1, num_features, 1, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.using_bn:
                self.running_mean.zero_()
                self.running_var.zero_()
            self.weight.fill_(0.0 if self.last_gamma else 1.0)
            self.bias.zero_()

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self._ndim:
            raise ValueError(f"expected {self._ndim}D input (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(f"input has {x.shape[1]} channels, expected num_features={self.num_features}")
        if math.prod(x.shape[2:]) < 2:
            raise ValueError("Switchable Normalization takes the unbiased variance over the spatial "
                             f"positions and needs at least 2 of them; got shape {tuple(x.shape)}")

    def _mixing(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)

    def _update_running(self, mean_bn: torch.Tensor, var_bn: torch.Tensor) -> None:
        m = self.momentum
        mean_bn = mean_bn.detach().reshape(self.running_mean.shape).to(self.running_mean.dtype)
        var_bn = var_bn.detach().reshape(self.running_var.shape).to(self.running_var.dtype)
        with torch.no_grad():
            if self.using_moving_average:
                # The reference's convention: the momentum weighs the OLD value.
                self.running_mean.mul_(m).add_((1 - m) * mean_bn)
                self.running_var.mul_(m).add_((1 - m) * var_bn)
            else:
                # Accumulation: sums of E[x] and E[x^2] for a later averaging pass.
                self.running_mean.add_(mean_bn)
                self.running_var.add_(mean_bn ** 2 + var_bn)

    def _statistics(self, x: torch.Tensor):
        """Mixed mean and variance per (n, c), shaped (N, C)."""
        c = x.shape[1]
        s = math.prod(x.shape[2:])
        mean_in, var_b = moments(x, "instance")
        var_in = var_b * (s / (s - 1))  # the reference's unbiased instance variance
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = var_in.mean(1, keepdim=True) + (mean_in - mean_ln).square().mean(1, keepdim=True)
        wm, wv = self._mixing()
        wm, wv = wm.to(mean_in.dtype), wv.to(mean_in.dtype)
        mean = wm[0] * mean_in + wm[1] * mean_ln
        var = wv[0] * var_in + wv[1] * var_ln
        if self.using_bn:
            if self.training:
                mean_bn = mean_in.mean(0, keepdim=True)
                var_bn = var_in.mean(0, keepdim=True) + (mean_in - mean_bn).square().mean(0, keepdim=True)
                self._update_running(mean_bn, var_bn)
            else:
                mean_bn = self.running_mean.reshape(1, c).to(mean_in.dtype)
                var_bn = self.running_var.reshape(1, c).to(mean_in.dtype)
            mean = mean + wm[2] * mean_bn
            var = var + wv[2] * var_bn
        return mean, var

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        mean, var = self._statistics(input)
        c = self.num_features
        return apply_stats(input, mean, var, self.weight.reshape(c), self.bias.reshape(c), self.eps,
                           self.activation, "instance")

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
             f"using_moving_average={self.using_moving_average}, using_bn={self.using_bn}, "
             f"last_gamma={self.last_gamma}")
        return s if self.activation is None else f"{s}, activation={self.activation!r}"


class SwitchNorm2d(_SwitchNormNd):
    """Switchable Normalization for (N, C, H, W): a softmax mix of instance, layer and batch
    statistics (``mean_weight``/``var_weight`` for [instance, layer, batch]).

    Same arguments, defaults (``momentum=0.9``), parameter/buffer names and shapes as the reference
    ``SwitchNorm2d``, plus keyword-only ``activation``, ``device``, ``dtype``. ``momentum``
    weighs the old running value (``r <- m r + (1 - m) batch``), the opposite of PyTorch.
    """

    _ndim = 4


class SwitchNorm3d(_SwitchNormNd):
    """Switchable Normalization for (N, C, D, H, W); reference defaults (``momentum=0.997``)."""

    _ndim = 5

    def __init__(self, num_features, eps=1e-5, momentum=0.997, using_moving_average=True,
                 using_bn=True, last_gamma=False, *, activation=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, using_moving_average, using_bn, last_gamma,
                         activation=activation, device=device, dtype=dtype)


class SwitchNorm1d(nn.Module):
    """Switchable Normalization for (N, C): a softmax mix of layer (over C) and batch (over N)
    statistics, both with the unbiased variance, as the reference ``SwitchNorm1d``
    (``momentum=0.997``; parameters (1, C), ``mean_weight``/``var_weight`` for [layer, batch]).

    The statistics of a 2-D input are as large as the input, so they are computed with PyTorch
    ops; the normalization pass runs on tritonorm's kernels.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.997, using_moving_average=True, *,
                 activation=None, device=None, dtype=None):
        super().__init__()
        _check_common(num_features, eps, momentum)
        if not isinstance(using_moving_average, bool):
            raise TypeError(f"using_moving_average must be a bool, got {type(using_moving_average).__name__}")
        self.activation = activations.check(activation)
        self.num_features, self.eps, self.momentum = num_features, float(eps), float(momentum)
        self.using_moving_average = using_moving_average
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(1, num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(1, num_features, **kw))
        self.mean_weight = nn.Parameter(torch.ones(2, **kw))
        self.var_weight = nn.Parameter(torch.ones(2, **kw))
        self.register_buffer("running_mean", torch.zeros(1, num_features, **kw))
        self.register_buffer("running_var", torch.zeros(1, num_features, **kw))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.zero_()
            self.weight.fill_(1.0)
            self.bias.zero_()

    _update_running = _SwitchNormNd._update_running

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() != 2:
            raise ValueError(f"expected 2D input (got {input.dim()}D input)")
        n, c = input.shape
        if c != self.num_features:
            raise ValueError(f"input has {c} channels, expected num_features={self.num_features}")
        if c < 2 or (self.training and n < 2):
            raise ValueError("SwitchNorm1d takes unbiased variances over C (and over N in training) "
                             f"and needs at least 2 values for each; got shape {tuple(input.shape)}")
        xa = input.to(_acc_dtype(input))
        var_ln, mean_ln = torch.var_mean(xa, dim=1, keepdim=True)
        if self.training:
            var_bn, mean_bn = torch.var_mean(xa, dim=0, keepdim=True)
            self._update_running(mean_bn, var_bn)
        else:
            mean_bn = self.running_mean.to(xa.dtype)
            var_bn = self.running_var.to(xa.dtype)
        wm = torch.softmax(self.mean_weight, 0).to(xa.dtype)
        wv = torch.softmax(self.var_weight, 0).to(xa.dtype)
        mean = wm[0] * mean_ln + wm[1] * mean_bn
        var = wv[0] * var_ln + wv[1] * var_bn
        return apply_stats(input, mean, var, self.weight.reshape(c), self.bias.reshape(c), self.eps,
                           self.activation, "instance")

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
             f"using_moving_average={self.using_moving_average}")
        return s if self.activation is None else f"{s}, activation={self.activation!r}"


class SparseSwitchNorm2d(_SwitchNormNd):
    """Sparse Switchable Normalization (SSN) for (N, C, H, W): the SN statistics (instance, layer,
    batch) mixed by ``sparsestmax(mean_weight, rad)`` and ``sparsestmax(var_weight, rad)``.

    As the reference ``SSN2d``: ``momentum=0.997``; buffers ``mean_fixed``/``var_fixed`` (int64)
    and ``radius``; once a weight vector becomes one-hot it is written into its parameter, the
    flag is set, and from then on the parameter is used detached (no gradient reaches it). Set the
    radius each iteration with ``set_rad(radius_schedule(...))``. Differences from the reference:
    the radius is read from the ``radius`` buffer (so a loaded checkpoint keeps it), tied weights at
    ``rad > 0`` give the face centre instead of NaN, and a frozen parameter's gradient is zero
    rather than None (see ``_sparse``). A training step reads nothing back to the host and traces
    with ``torch.compile(fullgraph=True)``.
    """

    _ndim = 4

    def __init__(self, num_features, eps=1e-5, momentum=0.997, using_moving_average=True,
                 last_gamma=False, *, activation=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, using_moving_average, True, last_gamma,
                         activation=activation, device=device, dtype=dtype)
        self.register_buffer("mean_fixed", torch.zeros(1, dtype=torch.long, device=device))
        self.register_buffer("var_fixed", torch.zeros(1, dtype=torch.long, device=device))
        self.register_buffer("radius", torch.zeros(1, device=device))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "mean_fixed"):
            self.mean_fixed.zero_()
            self.var_fixed.zero_()

    def set_rad(self, rad: float) -> None:
        if isinstance(rad, bool) or not isinstance(rad, (int, float)) or not 0 <= rad <= 1:
            raise ValueError(f"rad must be a number in [0, 1], got {rad!r}")
        self.radius.fill_(float(rad))

    def get_rad(self) -> float:
        """The radius as a Python float (a host read: for logging, not for the training step)."""
        return float(self.radius)

    def _sparse(self, param: nn.Parameter, fixed: torch.Tensor) -> torch.Tensor:
        """The mixing weights from ``param``, freezing them once they turn one-hot.

        All on the device, in a fixed sequence of tensor ops (no host read, no Python branch on a
        value): the flag ``fixed`` selects with ``torch.where``. A frozen vector's weights are
        ``param`` itself, detached, as in the reference. The reference also sets its gradient to
        None so that the optimizer skips it; deciding that needs the flag on the host, so here a
        frozen parameter receives a zero gradient instead, and because weight decay or momentum
        can still step a parameter with a zero gradient, each forward first puts a frozen
        parameter back to the one-hot at its largest entry (a no-op unless an optimizer moved it).
        """
        with torch.no_grad():
            frozen = fixed.reshape(()) != 0
            param.copy_(torch.where(frozen, _one_hot_at_max(param), param))
        # A copy, so that the in-place writes to ``param`` below never touch a tensor autograd saved.
        p = sparsestmax(param.clone(), self.radius)
        with torch.no_grad():
            turns = (p.max() - p.min()) >= 1
            param.copy_(torch.where(turns & ~frozen, _one_hot_at_max(p), param))
            fixed.copy_((frozen | turns).to(fixed.dtype).reshape(fixed.shape))
        return torch.where(frozen | turns, param.detach(), p)

    def _mixing(self) -> tuple[torch.Tensor, torch.Tensor]:
        wm = self._sparse(self.mean_weight, self.mean_fixed)
        wv = self._sparse(self.var_weight, self.var_fixed)
        self._last_weights = (wm.detach(), wv.detach())
        return wm, wv

    def get_mean(self) -> torch.Tensor | None:
        """The mean mixing weights of the last forward (None before the first)."""
        last = getattr(self, "_last_weights", None)
        return None if last is None else last[0]

    def get_var(self) -> torch.Tensor | None:
        """The variance mixing weights of the last forward (None before the first)."""
        last = getattr(self, "_last_weights", None)
        return None if last is None else last[1]
