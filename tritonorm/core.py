"""``tritonorm.norm``: mean/variance normalization over any scope, fused with affine, residual
and activation.

The eager hot path: a call's signature (shapes, strides, dtypes, devices, the scope and flags) is
looked up in a dict; the first call with a signature validates every argument and builds a
``_Call`` (backend, parsed scope, launch plan); every later call only checks what can change
between calls with the same signature (momentum), then goes autograd.Function -> launch plan ->
kernel. Under ``torch.compile`` the same arguments go to the registered ops (``tritonorm.ops``).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from . import activations, backend as backends, dispatch, ops, reference
from .scope import Spec
from .validation import broadcasts_to, check_norm_args, check_number, check_tensor

_CALLS: dict = {}
# A cached call holds its launch plan: when the tuning cache or a shipped table changes, the
# calls go with the plans (dispatch.clear_memo), so the next call plans anew.
dispatch.on_clear(_CALLS.clear)


def norm(x: torch.Tensor, scope: str = "group", *, num_groups: int | None = None,
         sample_groups: int = 1, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
         center: bool = True, activation: str | None = None, residual: torch.Tensor | None = None,
         running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
         momentum: float = 0.1, training: bool = True, backend: str | None = None) -> torch.Tensor:
    """Normalize ``x`` (N, C, *spatial) over ``scope``: ``act(weight * xhat + bias + residual)``.

    See docs/api.md for every argument. ``xhat = (x - mean) / sqrt(var + eps)`` with the mean
    and biased variance taken over the scope (``center=False``: no mean, RMS normalization).
    """
    return _run(x, scope, num_groups, sample_groups, weight, bias, eps, center, activation, residual,
                running_mean, running_var, momentum, training, backend, False)


def norm_with_stats(x, scope="group", *, num_groups=None, sample_groups=1, weight=None, bias=None, eps=1e-5,
                    center=True, activation=None, residual=None, running_mean=None,
                    running_var=None, momentum=0.1, training=True, backend=None):
    """``norm`` that also returns the batch statistics (mean, biased var; fp32 or float64,
    shaped like the kept axes, detached). When running statistics are used (eval) both are None.

    For what is built on top (instance_norm's running statistics, which are the batch mean of the
    per-instance statistics).
    """
    return _run(x, scope, num_groups, sample_groups, weight, bias, eps, center, activation, residual,
                running_mean, running_var, momentum, training, backend, True)


# The environment's backend choice is part of every key; read without os.environ's per-call
# encoding where the platform allows.
_ENV = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("TRITONORM_BACKEND") if _ENV is not None else None


def _env_backend():
    return _ENV.get(_ENV_KEY) if _ENV is not None else os.environ.get("TRITONORM_BACKEND")


def signature(x, scope, num_groups, sample_groups, eps, center, activation, training, backend, *tensors):
    """The key of a call's cached checks and plan: the arguments, the environment's backend, x's
    shape, strides, dtype and device, the same of every other tensor, and a forced regime."""
    return (scope, num_groups, sample_groups, eps, center, activation, training, backend, _env_backend(),
            x.shape, x.stride(), x.dtype, x.device,
            *[None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors],
            dispatch.forced_state())


def exact_flags(center, training, num_groups, sample_groups) -> bool:
    """bool == int in a dict key: flags of the wrong type must take the checking path."""
    return (center.__class__ is bool and training.__class__ is bool and num_groups.__class__ is not bool
            and sample_groups.__class__ is not bool)


def check_momentum(momentum) -> None:
    """``check_number("momentum", momentum, lo=0.0, hi=1.0)``, with the common case (a float in
    range) decided without the numbers.Real test."""
    if not (momentum.__class__ is float and 0.0 <= momentum <= 1.0):
        check_number("momentum", momentum, lo=0.0, hi=1.0)


def remember(cache: dict, key, call, limit: int = 4096) -> None:
    if key is not None:
        if len(cache) > limit:
            cache.clear()
        cache[key] = call


def _run(x, scope, num_groups, sample_groups, weight, bias, eps, center, activation, residual, running_mean,
         running_var, momentum, training, backend, with_stats):
    if torch.compiler.is_compiling():
        out = _traced(x, scope, num_groups, sample_groups, weight, bias, eps, center, activation, residual,
                      running_mean, running_var, momentum, training, backend)
        return out if with_stats else out[0]
    try:
        key = signature(x, scope, num_groups, sample_groups, eps, center, activation, training, backend,
                        weight, bias, residual, running_mean, running_var)
        call = _CALLS.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable: the full checks say what is wrong
        key = call = None
    if call is None or not exact_flags(center, training, num_groups, sample_groups):
        call = _Call(x, scope, num_groups, sample_groups, weight, bias, eps, center, activation, residual,
                     running_mean, running_var, momentum, training, backend)
        remember(_CALLS, key, call)
    elif call.uses_momentum:
        check_momentum(momentum)
    return call(x, weight, bias, residual, running_mean, running_var, eps, momentum, with_stats)


class _Call:
    """Everything about a signature that does not change from call to call."""

    def __init__(self, x, scope, num_groups, sample_groups, weight, bias, eps, center, activation, residual,
                 running_mean, running_var, momentum, training, backend):
        # Broadcast (adaptive) affine: a weight or bias that is not (C,) but broadcastable to x.
        # ``expand``: the kernels read it expanded to x's shape (else, per (sample, channel), in
        # place: see _nc_affine).
        self.param_full = self.expand = _broadcast_params(x, weight, bias)
        self.args = (scope, num_groups, sample_groups, backend)
        pw, pb = (None, None) if self.param_full else (weight, bias)
        spec, act = check_norm_args(x, scope, num_groups, pw, pb, eps, center, activation, residual,
                                    running_mean, running_var, momentum, training, sample_groups)
        if running_var is not None and not training:
            spec = dataclasses.replace(spec, sample_groups=1)  # running statistics span every group
        self.spec, self.act_name, self.act = spec, act, activations.code(act)
        self.center, self.training, self.eps = center, training, eps
        self.backend = backends.resolve(backend, x.device, x.dtype)
        self.use_running = running_var is not None and not training
        self.update = training and running_var is not None
        self.uses_momentum = self.update
        self.has_res = residual is not None
        self.empty = x.numel() == 0
        self.plan = None
        # Per (autograd.Function input mask (ctx.needs_input_grad), lean allowed): whether the
        # forward keeps lean statistics and the room its backward's partials take in the
        # statistics buffer (launch.part_row); and per (mask, lean, forced regime) the backward plan.
        self.work_by_need: dict = {}
        self.bplans: dict = {}
        self.copy_running = self.torch_update = False
        self.count = spec.count(x.shape)
        self.stat_shape = spec.stat_shape(x.shape)
        if self.backend == "triton" and not self.empty:
            from .kernels import launch

            mode = "given" if self.use_running else "train"
            level = launch.NO_RUNNING
            # The kernels index running buffers with unit stride: views of other strides (an
            # expanded buffer in eval, interleaved views of one buffer) are read through a
            # contiguous copy and updated with torch ops.
            dense = all(t is None or t.is_contiguous() for t in (running_mean, running_var))
            self.copy_running = self.use_running and not dense
            # Running statistics are blended in-kernel when each statistic is one running entry.
            self.torch_update = self.update and (spec.sample_groups != 1 or not dense)
            if self.update and not self.torch_update:
                level = launch.RUNNING_BOTH if running_mean is not None else launch.RUNNING_VAR
            self.plan = launch.forward_plan(x, spec, weight is not None, bias is not None, residual is not None,
                                            self.act, center, mode, level,
                                            (None if residual is None else residual.stride(),),
                                            param_full=self.param_full,
                                            param_nc=_param_nc(x, spec, weight, bias) if self.param_full else None)
            if self.param_full and not self.plan.fusable_full:
                self.plan = None
            self.expand = self.param_full and self.plan is not None and self.plan.nc is None

    def __call__(self, x, weight, bias, residual, running_mean, running_var, eps, momentum, with_stats=True):
        plan = self.plan
        if plan is None or self.empty:
            return self._untriton(x, weight, bias, residual, running_mean, running_var, eps, momentum, with_stats)
        if self.copy_running:
            running_mean = None if running_mean is None else running_mean.contiguous()
            running_var = running_var.contiguous()
        if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)
                                        or (residual is not None and residual.requires_grad)):
            # io[5] in: whether the statistics may be lean (read by the backward only)
            io = [self, running_mean, running_var, eps, momentum, not (with_stats or self.torch_update)]
            y = _apply_norm(x, weight, bias, residual, io)
            stats = io[5]
        elif self.param_full:
            y, stats = plan(x, *expanded(self.expand, plan, weight, bias, x), residual, running_mean, running_var, eps, momentum)
        else:
            y, stats = plan(x, weight, bias, residual, running_mean, running_var, eps, momentum)
        if self.torch_update:
            _update_running(self.spec, x.shape, stats, running_mean, running_var, momentum, self.center)
        if not with_stats:
            return y
        if self.use_running:
            return y, None, None
        return y, stats[4].view(self.stat_shape), stats[3].view(self.stat_shape)

    def _untriton(self, x, weight, bias, residual, running_mean, running_var, eps, momentum, with_stats):
        """Calls the kernels do not run: empty x, broadcast affine outside the kernels, the
        reference backend."""
        if self.empty:
            empty = torch.zeros(self.stat_shape, dtype=torch.float32, device=x.device)
            return (x.clone(), empty, empty) if with_stats else x.clone()
        if self.param_full:
            out = _broadcast_composite(self, x, weight, bias, residual, running_mean, running_var, eps, momentum)
        else:
            out = _reference(x, self.spec, weight, bias, eps, self.center, self.act_name, residual, running_mean,
                             running_var, momentum, self.training, self.use_running)
        return out if with_stats else out[0]


class _NormFunction(torch.autograd.Function):
    """The eager autograd node: saves x (and the residual only when an activation needs it) and
    the fp32 statistics; never the output or the pre-activation.

    Differentiable inputs x, weight, bias, residual; everything else travels in ``io``
    ([call, running_mean, running_var, eps, momentum, stats out]): the fewer inputs and outputs
    an autograd.Function has, the less ``apply`` and the engine spend on each call. The
    statistics come back in ``io[5]`` (not differentiable, so not an output); io[5] comes in
    True when the caller does not read them: then, where the kernels allow, they are lean
    (rstd and the shifted mean only: what eager saves; launch.ForwardPlan.lean_for)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, io):
        call, running_mean, running_var, eps, momentum, lean = io
        key = (ctx.needs_input_grad, lean)
        work = call.work_by_need.get(key)
        if work is None:
            work = call.work_by_need[key] = _work(call, ctx.needs_input_grad, lean, weight, bias)
        lean, room = work
        # Broadcast weight/bias are expanded for the kernels here (when they are not read in place)
        # and saved unexpanded.
        w, b = expanded(call.expand, call.plan, weight, bias, x)
        y, stats = call.plan(x, w, b, residual, running_mean, running_var, eps, momentum, lean, room)
        io[5] = stats
        ctx.set_materialize_grads(False)
        ctx.call = call
        ctx.lean = lean
        ctx.save_for_backward(x, weight, bias, residual if call.act != 0 else None, stats)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None, None
        x, weight, bias, residual, stats = ctx.saved_tensors
        call = ctx.call
        if torch.is_grad_enabled():
            needs = _needs(call, ctx.needs_input_grad, weight, bias)
            # create_graph=True (gradient penalties): a differentiable recomputation.
            from . import double_backward

            given = (stats[4].view(call.stat_shape), stats[3].view(call.stat_shape)) if call.use_running else None
            grads = tuple(double_backward.grads(dy, x, weight, bias, residual, call.spec, call.eps, call.center,
                                                call.act, given, list(needs), call.has_res))
        else:
            key = (ctx.needs_input_grad, ctx.lean, dispatch.forced_state())
            plan = call.bplans.get(key)
            if plan is None:
                plan = call.bplans[key] = call.plan.backward(_needs(call, ctx.needs_input_grad, weight, bias),
                                                             lean=ctx.lean)
            grads = param_backward(call.expand, call.plan, plan, dy, x, weight, bias, residual, stats)
        return (*grads, None)


def direct_apply(cls):
    """``cls.apply`` for an autograd.Function without ``setup_context``, calling the C apply
    directly when no functorch transform is active. There ``Function.apply``'s Python wrapper
    only unwraps dead functorch wrappers (done here too) before that same call, and costs ~6 us
    a call (`tritonorm bench --host`); under a transform the wrapper runs as usual."""
    slow = cls.apply
    try:
        raw = torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)
        active = torch._C._are_functorch_transforms_active
        unwrap = torch._C._functorch.unwrap_if_dead
    except (AttributeError, KeyError, TypeError):  # another torch: its own wrapper
        return slow
    if "setup_context" in vars(cls):
        return slow
    tensor = torch.Tensor

    def apply(*args):
        if active():
            return slow(*args)
        return raw(*[unwrap(a) if isinstance(a, tensor) else a for a in args])
    return apply


_apply_norm = direct_apply(_NormFunction)


def _work(call, need, lean_allowed: bool, weight, bias) -> tuple[bool, int]:
    """(lean, room) of a forward whose backward asks for ``need``: lean statistics where the
    caller does not read them and the kernels allow (launch.ForwardPlan.lean_for), and the rows
    that backward's partials take in the statistics buffer (launch.part_row)."""
    needs = _needs(call, need, weight, bias)
    lean = bool(lean_allowed) and call.plan.lean_for(needs)
    return lean, call.plan.backward(needs, lean=lean).room_rows


def _needs(call, need, weight, bias):
    """The gradients a backward computes (dx, dweight, dbias, dresidual)."""
    return (need[0], weight is not None and need[1], bias is not None and need[2], call.has_res and need[3])


def expanded(expand: bool, plan, weight, bias, x):
    """The weight and bias ``plan``'s kernels read: as given (per channel, or per (sample,
    channel) read in place), or where ``expand`` (other broadcast shapes) expanded to x's shape in
    y's layout. The eager calls (core, prenorm) and the registered ops (broadcast_ops) share it."""
    if not expand:
        return weight, bias
    c = plan.c
    return c.full_param(weight, x), c.full_param(bias, x)


def param_backward(expand: bool, plan, bplan, dy, x, weight, bias, *rest):
    """``bplan(dy, x, weight, bias, *rest)`` with weight/bias as ``plan``'s forward read them
    (``expanded``): expanded ones give per-element gradients, summed back to their shapes."""
    if not expand:
        return bplan(dy, x, weight, bias, *rest)
    dx, dw, db, dres = bplan(dy, x, *expanded(True, plan, weight, bias, x), *rest)
    return dx, _reduced(dw, weight), _reduced(db, bias), dres


def _reduced(g, param):
    """A per-element parameter gradient summed over the parameter's broadcast axes."""
    if g is None:
        return None
    return g.sum_to_size(reference.affine_view(param, g).shape).view(param.shape)


def _broadcast_params(x, weight, bias) -> bool:
    """Whether weight or bias is a broadcast (adaptive) parameter rather than per channel: x's rank,
    broadcastable to x (e.g. (N, C, 1, 1), (1, C, H, W), (N, C) for 2-D x). Checks that it is a
    floating tensor on x's device broadcastable to x (ValueError/TypeError naming it); other
    shapes are left to the per-channel checks."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return False
    full = False
    plain = []  # the others: checked here when one is broadcast (the caller's checks then skip both)
    for name, t in (("weight", weight), ("bias", bias)):
        # Only x's rank: a lower-rank weight (say (W,) for NCHW) is a mistake, not a broadcast.
        if not isinstance(t, torch.Tensor) or tuple(t.shape) == (x.shape[1],) or t.dim() != x.dim():
            plain.append((name, t))
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        _check_broadcasts(name, t, x)
        full = True
    if full:  # beside a broadcast one, (C,) per channel, or of lower rank broadcast by torch's rules
        for name, t in plain:
            check_tensor(name, t, x)
            if t is not None and tuple(t.shape) != (x.shape[1],):
                _check_broadcasts(name, t, x)
    return full


def _check_broadcasts(name, t, x) -> None:
    if not broadcasts_to(t, x.shape):
        raise ValueError(f"{name} must have shape ({x.shape[1]},) or be broadcastable to x's shape "
                         f"{tuple(x.shape)}, got {tuple(t.shape)}")


def _nc_kind(t, x) -> str | None:
    """"nc": a per-(sample, channel) parameter (N, C, 1, ...); "c": a per-channel one, (C,) or
    (1, C, 1, ...) (when N > 1); "": another broadcast shape; None: absent."""
    if t is None:
        return None
    N, C = x.shape[0], x.shape[1]
    if tuple(t.shape) == (C,):
        return "c"
    if t.dim() != x.dim() or any(s != 1 for s in t.shape[2:]) or t.shape[1] != C:
        return ""
    return "nc" if t.shape[0] == N else ("c" if t.shape[0] == 1 else "")


def _nc_affine(x, weight, bias):
    """Broadcast weight/bias that the GroupNorm/InstanceNorm kernels read in place, per (sample,
    channel): (weight kind, bias kind, (weight's n and c strides, bias's)) when each present one is
    (N, C, 1, ...) or per channel and at least one is per sample (kinds as ``_nc_kind``; a per-channel
    one has n stride 0); else None. The launch plan decides whether the scope and layout allow it."""
    if x.dim() < 3:  # (N, C) for a 2-D x: the parameter is x's shape, read as such
        return None
    kinds = (_nc_kind(weight, x), _nc_kind(bias, x))
    if "" in kinds or "nc" not in kinds:
        return None
    strides = []
    for t, kind in zip((weight, bias), kinds):
        if t is None:
            strides += [0, 0]
        elif t.dim() == 1:
            strides += [0, t.stride(0) if t.shape[0] > 1 else 0]
        else:
            strides += [t.stride(0) if kind == "nc" and t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0]
    return (*kinds, tuple(strides))


def _row_kind(t, x) -> str | None:
    """adaLN's kinds for a norm over x's last axis: "nd" a per-(sample, column) parameter
    (N, 1, ..., 1, D) (N > 1), "d" a per-column one (1, ..., 1, D); "": another shape; None: absent."""
    if t is None:
        return None
    D = x.shape[-1]
    if t.dim() != x.dim() or t.shape[-1] != D or any(s != 1 for s in t.shape[1:-1]):
        return ""
    return "nd" if t.shape[0] == x.shape[0] and x.shape[0] > 1 else ("d" if t.shape[0] == 1 else "")


def _row_affine(x, spec, weight, bias):
    """Broadcast weight/bias that the row kernels read in place for a norm over x's last axis
    alone (adaLN: x (N, T, D), scope "L", or what the row functionals pass): (weight kind, bias
    kind, (weight's n and d strides, bias's)) when each present one is of a ``_row_kind``; else
    None. The launch plan decides whether the layout and regime allow it (launch.row_samples)."""
    if x.dim() < 3 or spec.letters != spec.layout[-1] or spec.sample_groups != 1:
        return None
    kinds = (_row_kind(weight, x), _row_kind(bias, x))
    if "" in kinds:
        return None
    strides = []
    for t, kind in zip((weight, bias), kinds):
        if t is None:
            strides += [0, 0]
        else:
            strides += [t.stride(0) if kind == "nd" else 0, t.stride(-1) if t.shape[-1] > 1 else 0]
    return (*kinds, tuple(strides))


def _param_nc(x, spec, weight, bias):
    """The broadcast weight/bias the kernels may read in place: per (sample, channel)
    (_nc_affine) or per (sample, column) (_row_affine); None: expanded."""
    return _nc_affine(x, weight, bias) or _row_affine(x, spec, weight, bias)


def _broadcast_composite(call, x, weight, bias, residual, running_mean, running_var, eps, momentum):
    """Broadcast affine where the kernels do not take it (reference backend, float64, the torch
    regime): the plain norm, then the affine, residual and activation as torch ops."""
    scope, num_groups, sample_groups, backend = call.args
    out = _run(x, scope, num_groups, sample_groups, None, None, eps, call.center, None, None, running_mean,
               running_var, momentum, call.training, backend, True)
    return (compose(out[0], x, weight, bias, residual, call.act_name), *out[1:])


def compose(z, x, weight, bias, residual, act):
    """``act(z * weight + bias + residual)`` as torch ops, z the plain norm of x: the broadcast
    affine where the kernels do not take it (eager and the registered ops' composite)."""
    if weight is not None:
        z = z * reference.affine_view(weight, x)
    if bias is not None:
        z = z + reference.affine_view(bias, x)
    if residual is not None:
        z = z + residual
    return activations.apply(act, z)


def _update_running(spec: Spec, shape, stats, running_mean, running_var, momentum, center):
    """PyTorch's rule for the statistics the kernels do not blend themselves (sample groups, the
    compile path): see reference.update_running."""
    reference.update_running(spec, shape, stats[4] if center else None, stats[3], running_mean, running_var,
                             momentum)


def _traced(x, scope, num_groups, sample_groups, weight, bias, eps, center, activation, residual, running_mean,
            running_var, momentum, training, backend):
    """The torch.compile path: the registered ops, running statistics blended with torch ops.

    Broadcast (adaptive) weight/bias are checked here as eager checks them and go to the op as
    they are: its body plans with them as eager does (tritonorm.broadcast_ops), so the planner
    never runs under Dynamo."""
    full = _broadcast_params(x, weight, bias)
    pw, pb = (None, None) if full else (weight, bias)
    spec, act = check_norm_args(x, scope, num_groups, pw, pb, eps, center, activation, residual,
                                running_mean, running_var, momentum, training, sample_groups)
    if running_var is not None and not training:
        spec = dataclasses.replace(spec, sample_groups=1)
    name = backends.resolve(backend, x.device, x.dtype)
    use_running = running_var is not None and not training
    if x.numel() == 0:
        empty = torch.zeros(spec.stat_shape(x.shape), dtype=torch.float32, device=x.device)
        return x.clone(), empty, empty
    if name == "reference":
        if full:  # as eager's _broadcast_composite: the plain norm, then torch ops
            out = _reference(x, spec, None, None, eps, center, None, None, running_mean, running_var, momentum,
                             training, use_running)
            return (compose(out[0], x, weight, bias, residual, act), *out[1:])
        return _reference(x, spec, weight, bias, eps, center, act, residual, running_mean, running_var,
                          momentum, training, use_running)
    y, stats = torch.ops.tritonorm.norm_fwd(
        x, weight, bias, residual, running_mean if use_running else None,
        running_var if use_running else None, ops.encode_spec(spec), float(eps), center, activations.code(act))
    if use_running:
        return y, None, None
    if training and running_var is not None:
        _update_running(spec, x.shape, stats, running_mean, running_var, momentum, center)
    shape = spec.stat_shape(x.shape)
    return y, stats[4].view(shape), stats[3].view(shape)


def _reference(x, spec, weight, bias, eps, center, act, residual, running_mean, running_var,
               momentum, training, use_running):
    if use_running:
        y = reference.norm(x, spec, weight, bias, eps, center, act, residual, running_mean,
                           running_var, momentum, training=False)
        return y, None, None
    mean, var = reference.moments(x.detach(), spec, center)
    y = reference.norm(x, spec, weight, bias, eps, center, act, residual, None, None, momentum,
                       training)
    if training and running_var is not None:
        reference.update_running(spec, x.shape, mean if center else None, var, running_mean, running_var,
                                 momentum)
    return y, mean, var


class _MomentsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, spec, center):
        _, stats = plan(x, None, None, None, None, None, 1.0)
        shape = spec.stat_shape(x.shape)
        mean, var = stats[4].view(shape), stats[3].view(shape)
        ctx.save_for_backward(x, mean)
        ctx.spec, ctx.center = spec, center
        ctx.set_materialize_grads(False)
        return mean, var

    @staticmethod
    def backward(ctx, dmean, dvar):
        x, mean = ctx.saved_tensors
        return ops.moments_grad(x, mean, ctx.spec, ctx.center, dmean, dvar), None, None, None


def moments(x: torch.Tensor, scope: str = "group", *, num_groups: int | None = None,
            sample_groups: int = 1, center: bool = True,
            backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` per statistic of ``scope``, differentiable.

    Shaped like the kept axes (``Spec.stat_shape``: ``(C,)`` for batch, ``(N, C)`` for instance,
    ``(N, G)`` for group, ``(S, C)`` for batch with ``sample_groups=S``); fp32 (float64 on the
    reference path). With ``center=False`` the mean
    is zero and the variance is the mean square. The Triton path reads x once (or twice for
    statistics too large for one program) and writes nothing else; the building block of
    Switchable Normalization and SyncBatchNorm.
    """
    spec, _ = check_norm_args(x, scope, num_groups, None, None, 1.0, center, None, None, None,
                              None, 0.1, False, sample_groups)
    name = backends.resolve(backend, x.device, x.dtype)
    if name == "reference" or x.numel() == 0:
        return reference.moments(x, spec, center)
    if torch.compiler.is_compiling():
        mean, var = torch.ops.tritonorm.moments(x, ops.encode_spec(spec), center)
        shape = spec.stat_shape(x.shape)
        return mean.view(shape), var.view(shape)
    from .kernels import launch

    plan = launch.forward_plan(x, spec, False, False, False, 0, center, "stats", launch.NO_RUNNING)
    if torch.is_grad_enabled() and x.requires_grad:
        return _MomentsFunction.apply(x, plan, spec, center)
    _, stats = plan(x, None, None, None, None, None, 1.0)
    shape = spec.stat_shape(x.shape)
    return stats[4].view(shape), stats[3].view(shape)
