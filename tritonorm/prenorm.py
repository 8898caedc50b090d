"""``tritonorm.add_norm``: the pre-norm residual step of a transformer block in one kernel each way.

    h = round_to(residual_dtype, x + residual)      (the sum taken in fp32)
    y = norm(h, scope, ...)                          (y in x's dtype)

The norm reads h *as stored* (rounded to ``residual_dtype``), as vLLM's fused_add_rms_norm does, so
the h handed to the next layer is exactly the tensor that was normalized, and the backward needs
h alone: the forward saves h and the fp32 statistics, never x or the residual. Backward: one
kernel computes the norm's gradient at h and adds the gradient flowing into h from later layers;
that sum is the gradient of both x and the residual (rounding is treated as the identity).

Where the kernels cannot run the sum in place (the torch regime of a tuned table, inputs that
need a restrided copy, the reference backend, torch.compile) the same definition runs as torch
ops followed by ``norm``.
"""

from __future__ import annotations

import dataclasses

import torch

from . import activations, backend as backends, core
from .validation import _dtype_name, check_norm_args, check_number

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CALLS: dict = {}
core.dispatch.on_clear(_CALLS.clear)  # as core._CALLS: cached calls hold launch plans


def add_norm(x: torch.Tensor, residual: torch.Tensor, scope: str = "group", *, num_groups: int | None = None,
             sample_groups: int = 1, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             eps: float = 1e-5, center: bool = True, activation: str | None = None,
             running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
             momentum: float = 0.1, training: bool = True, backend: str | None = None,
             residual_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h)``: ``h = x + residual`` (fp32 sum stored in ``residual_dtype``, default x's dtype),
    ``y = norm(h, scope, ...)`` in x's dtype. Every keyword is ``norm``'s (see docs/api.md), less
    ``residual``. ``residual`` has x's shape and device and x's dtype or ``residual_dtype``.
    """
    rd = check_add_args(x, residual, residual_dtype)
    if torch.compiler.is_compiling():
        return _composite(x, residual, rd, scope, num_groups, sample_groups, weight, bias, eps, center, activation,
                          running_mean, running_var, momentum, training, backend)
    try:
        key = (rd, core.signature(x, scope, num_groups, sample_groups, eps, center, activation, training, backend,
                                  residual, weight, bias, running_mean, running_var))
        call = _CALLS.get(key)
    except (AttributeError, TypeError):
        key = call = None
    if call is None or not core.exact_flags(center, training, num_groups, sample_groups):
        call = _AddCall(x, residual, rd, scope, num_groups, sample_groups, weight, bias, eps, center, activation,
                        running_mean, running_var, momentum, training, backend)
        core.remember(_CALLS, key, call, limit=1024)
    elif call.update:
        check_number("momentum", momentum, lo=0.0, hi=1.0)
    if call.plan is None:
        return _composite(x, residual, rd, scope, num_groups, sample_groups, weight, bias, eps, center, activation,
                          running_mean, running_var, momentum, training, backend)
    return call(x, residual, weight, bias, running_mean, running_var, eps, momentum)


def check_add_args(x, residual, residual_dtype) -> torch.dtype:
    """The residual checks of add_norm (norm's own checks cover the rest); returns h's dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if residual_dtype is not None and residual_dtype not in _FLOATS:
        raise TypeError(f"residual_dtype must be None or a floating-point torch.dtype (float16, bfloat16, "
                        f"float32, float64), got {residual_dtype!r}")
    rd = x.dtype if residual_dtype is None else residual_dtype
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    if residual.dtype not in (x.dtype, rd):
        allowed = _dtype_name(x.dtype) + ("" if rd == x.dtype else f" or residual_dtype {_dtype_name(rd)}")
        raise TypeError(f"residual must have x's dtype {allowed}, got {_dtype_name(residual.dtype)}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    return rd


def _composite(x, residual, rd, scope, num_groups, sample_groups, weight, bias, eps, center, activation,
               running_mean, running_var, momentum, training, backend):
    """The same definition as torch ops + ``norm`` (fallback; differentiable by autograd)."""
    acc = torch.float64 if torch.float64 in (x.dtype, residual.dtype, rd) else torch.float32
    h = (x.to(acc) + residual.to(acc)).to(rd)
    y = core.norm(h, scope, num_groups=num_groups, sample_groups=sample_groups, weight=weight, bias=bias,
                  eps=eps, center=center, activation=activation, running_mean=running_mean,
                  running_var=running_var, momentum=momentum, training=training, backend=backend)
    return y.to(x.dtype), h


def _dense(x: torch.Tensor) -> bool:
    return x.stride() == torch.empty_like(x, memory_format=torch.preserve_format, device="meta").stride()


class _AddCall:
    """A signature's validated arguments and its pre_add launch plan (None: the composite runs)."""

    def __init__(self, x, residual, rd, scope, num_groups, sample_groups, weight, bias, eps, center, activation,
                 running_mean, running_var, momentum, training, backend):
        # Broadcast (adaptive) weight or bias, as core._Call: read in place by the kernels where the
        # plan allows (per (sample, channel), per (sample, column)), else expanded to x's shape
        # (``expand``, core.expanded) and the per-element gradients summed (core.param_backward).
        self.param_full = self.expand = core._broadcast_params(x, weight, bias)
        pw, pb = (None, None) if self.param_full else (weight, bias)
        spec, act = check_norm_args(x, scope, num_groups, pw, pb, eps, center, activation, None,
                                    running_mean, running_var, momentum, training, sample_groups)
        if running_var is not None and not training:
            spec = dataclasses.replace(spec, sample_groups=1)
        self.spec, self.act_name, self.act = spec, act, activations.code(act)
        self.center, self.training, self.eps, self.rd = center, training, eps, rd
        self.use_running = running_var is not None and not training
        self.update = training and running_var is not None
        self.torch_update = False
        self.plan = None
        name = backends.resolve(backend, x.device, x.dtype)
        if name != "triton" or x.numel() == 0 or rd == torch.float64 or not _dense(x):
            return
        from .kernels import launch

        mode = "given" if self.use_running else "train"
        level = launch.NO_RUNNING
        self.torch_update = self.update and spec.sample_groups != 1
        if self.update and not self.torch_update:
            level = launch.RUNNING_BOTH if running_mean is not None else launch.RUNNING_VAR
        param_nc = core._param_nc(x, spec, weight, bias) if self.param_full else None
        plan = launch.forward_plan(x, spec, weight is not None, bias is not None, False, self.act, center, mode,
                                   level, ("pre_add", residual.stride(), rd), pre_add=True,
                                   param_full=self.param_full, param_nc=param_nc)
        if plan.fusable_add:  # (implies fusable_full: broadcast parameters run in the kernels too)
            self.plan = plan
        self.expand = self.param_full and self.plan is not None and self.plan.nc is None

    def __call__(self, x, residual, weight, bias, running_mean, running_var, eps, momentum):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias)):
            y, h, stats = _apply_add_norm(x, residual, weight, bias, running_mean, running_var, eps,
                                                 momentum, self)
        else:
            y, stats, h = self.plan.add(x, residual, *core.expanded(self.expand, self.plan, weight, bias, x), running_mean,
                                        running_var, eps, momentum, self.rd)
        if self.torch_update:
            core._update_running(self.spec, x.shape, stats, running_mean, running_var, momentum, self.center)
        return y, h


class _AddNormFunction(torch.autograd.Function):
    """Saves h, weight, bias (unexpanded) and the fp32 statistics; never x, the residual or y."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, eps, momentum, call):
        # Lean statistics (rstd and the shifted mean: what eager keeps) when nothing but the
        # backward reads them (launch.ForwardPlan.lean_for).
        lean = False
        if not call.torch_update:
            need = ctx.needs_input_grad
            lean = call.plan.lean_for((need[0] or need[1], weight is not None and need[2],
                                       bias is not None and need[3], False))
        # Broadcast weight/bias the kernels do not read in place are expanded here, saved as given.
        w, b = core.expanded(call.expand, call.plan, weight, bias, x)
        y, stats, h = call.plan.add(x, residual, w, b, running_mean, running_var, eps, momentum, call.rd, lean)
        ctx.set_materialize_grads(False)
        ctx.call = call
        ctx.lean = lean
        ctx.x_dtype, ctx.res_dtype = x.dtype, residual.dtype
        ctx.save_for_backward(h, weight, bias, stats)
        ctx.mark_non_differentiable(stats)
        return y, h, stats

    @staticmethod
    def backward(ctx, dy, dh, _dstats):
        h, weight, bias, stats = ctx.saved_tensors
        call = ctx.call
        need = ctx.needs_input_grad
        nothing = (None,) * 5
        need_x = need[0] or need[1]
        need_w = weight is not None and need[2]
        need_b = bias is not None and need[3]
        if dy is None:
            if dh is None:
                return (None,) * 9
            return (dh.to(ctx.x_dtype) if need[0] else None, dh.to(ctx.res_dtype) if need[1] else None,
                    None, None, *nothing)
        if torch.is_grad_enabled():
            return (*_differentiable(ctx, dy, dh, h, weight, bias, stats, (need_x, need_w, need_b)), *nothing)
        twice = ctx.res_dtype != ctx.x_dtype and need[1]
        plan = call.plan.backward((need_x, need_w, need_b, False), add_dh=dh is not None and need_x,
                                  dx_twice=twice, lean=ctx.lean)
        dx, dw, db, dres = core.param_backward(call.expand, call.plan, plan, dy, h, weight, bias, None, stats, dh,
                                               ctx.res_dtype)
        if not need_x:  # only weight/bias: the plan still ran the dx pass only if it needed it
            dx = dres = None
        return (dx if need[0] else None, dres if need[1] else None, dw if need_w else None,
                db if need_b else None, *nothing)


def _differentiable(ctx, dy, dh, h, weight, bias, stats, needs):
    """create_graph=True: the gradients from differentiable fp32 torch ops at the saved h.

    h is the saved *output*: unpacked here it carries this node as its grad_fn, so the returned
    gradients stay functions of x and the residual (through h = x + residual, whose backward is
    this node's with dy None) as well as of weight, bias, dy and dh."""
    call = ctx.call
    hh = h if needs[0] and h.requires_grad else h.detach().requires_grad_()
    ins = [hh] + [t for t, n in zip((weight, bias), needs[1:]) if n]
    with torch.enable_grad():
        running = (stats[4], stats[3]) if call.use_running else (None, None)
        y = core.reference.norm(hh, call.spec, weight, bias, call.eps, call.center, call.act_name, None,
                                *running, 0.0, training=not call.use_running, compute_dtype=torch.float32)
        grads = list(torch.autograd.grad(y, ins, dy, create_graph=True, allow_unused=True))
    dhx = grads.pop(0)
    if dh is not None:
        dhx = dhx + dh
    dw = grads.pop(0) if needs[1] else None
    db = grads.pop(0) if needs[2] else None
    need = ctx.needs_input_grad
    return (dhx.to(ctx.x_dtype) if need[0] else None, dhx.to(ctx.res_dtype) if need[1] else None, dw, db)


_apply_add_norm = core.direct_apply(_AddNormFunction)
