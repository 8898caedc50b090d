"""``tritonorm.explain``: the plan a ``norm`` call would run, and why, without running it.

It builds the same strided view as the launchers (kernels/layout.py) and asks the same
``dispatch.plan_for``, so the plan shown is the plan run. ``x`` may be a meta tensor and
``device`` a GPU profile name ("h100", "h200"), so plans for a GPU can be made on any machine.
Needs neither triton nor a GPU.
"""

from __future__ import annotations

import dataclasses

import torch

from . import activations, backend as backends, cost, dispatch, pixel_plan, planes_plan
from .kernels.layout import (MAX_DIMS, TooManyDims, alloc_out, channel_per_col, channel_per_row, channel_view,
                             batch_segments, sample_rows, sample_segments, segments, stat_view)
from .validation import check_norm_args

OPS = ("forward", "backward", "dwdb")


def _torch_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a known profile ({', '.join(dispatch.PROFILES)}) "
                         f"nor a torch device") from None


def _profile(device, x: torch.Tensor) -> dispatch.DeviceProfile | None:
    """The profile to plan for, or None when the call would run the reference backend."""
    if isinstance(device, dispatch.DeviceProfile):
        return device
    if isinstance(device, str) and device.strip().lower() in dispatch.PROFILES:
        return dispatch.profile_named(device)
    if device is not None:
        return dispatch.profile_for_device(_torch_device(device))
    if x.device.type == "meta":
        return dispatch.profile_for_device("cuda" if torch.cuda.is_available() else "cpu")
    return dispatch.profile_for_device(x.device)


def _view(x: torch.Tensor, spec, make):
    """The view the launcher runs on: x in place, else x copied into y's layout, else (a dense
    permutation too irregular for the kernels) both contiguous; None when even that has too many
    dims (the launcher then runs the torch regime)."""
    return _view_strides(x, spec, make)[0]


def _view_strides(x: torch.Tensor, spec, make):
    """``_view`` and the (x, output) strides it was built with."""
    out = alloc_out(x).stride()
    contiguous = torch.empty(x.shape, device="meta").stride()
    for xs, ys in ((x.stride(), out), (out, out), (contiguous, contiguous)):
        try:
            return make(x.shape, spec, xs, ys), xs, ys
        except TooManyDims:
            continue
    return None, None, None


def _segments(x, spec, weight, bias, param_full, given, batch=False):
    """The launcher's per-(sample, channel) segments of the backward (layout.segments), or None
    (as BackwardPlan decides with every gradient asked for). ``batch``: the (sample group,
    channel) segments of Ghost BatchNorm and batch_group too (layout.batch_segments; the
    backward's, not the per-sample affine's)."""
    if (weight is None and bias is None) or param_full or (not given and channel_per_row(spec)):
        return None
    view, xs, ys = _view_strides(x, spec, stat_view)
    if view is None:
        return None
    seg = segments(view, x.shape, spec, xs, ys)
    if seg is None and batch and not given:
        seg = batch_segments(view, x.shape, spec, xs, ys)
    return seg


def _bn_segments(x, spec):
    """Conditional BatchNorm's (channel, sample) segments (launch._bn_segments): where plain
    BatchNorm reads a per-(sample, channel) weight/bias in place, in training and eval."""
    view, xs, ys = _view_strides(x, spec, stat_view)
    return None if view is None else sample_segments(view, x.shape, spec, xs, ys)


def flags_of(weight, bias, residual, act, center) -> str:
    return dispatch.flags_key(weight is not None, bias is not None, residual is not None, activations.code(act),
                              center)


def _sample_rows(x, spec, weight, bias, profile, flags):
    """(param_nc tuple, programs of the backward's dx pass) when adaLN's per-(sample, column)
    weight/bias are read in place (as launch._row_samples_plan decides), else None."""
    from .core import _row_affine

    rows = _row_affine(x, spec, weight, bias)
    if rows is None:
        return None
    view = _view(x, spec, stat_view)
    if view is None or not sample_rows(view, x.shape):
        return None
    bproblem = dispatch.problem_from_view("backward", view, x.element_size(), spec=spec,
                                          dtype=str(x.dtype).replace("torch.", ""), flags=flags)
    bplan = dispatch.plan_for(bproblem, profile)
    if bplan.kernel == dispatch.NATIVE:
        bplan = dispatch.choose(bproblem, profile)
    N, cfg = x.shape[0], bplan.config
    if bplan.kernel != "fused":  # the first stage's (R, column tiles, N) grid
        tiles = -(-view.M // cfg["block_m"])
        return rows, N * dispatch.sample_tile_programs(N, view.P // N, cfg["block_p"], tiles, cfg["num_warps"],
                                                       profile)
    return rows, N * dispatch.sample_programs(N, view.P // N, cfg["block_p"], profile.sm_count)


def explain(x: torch.Tensor, scope: str = "group", *, num_groups: int | None = None,
            sample_groups: int = 1, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
            center: bool = True, activation: str | None = None, residual: torch.Tensor | None = None,
            running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
            momentum: float = 0.1, training: bool = True, backend: str | None = None,
            device=None, op: str = "forward", add_residual: torch.Tensor | None = None,
            residual_dtype: torch.dtype | None = None) -> dispatch.Plan:
    """The ``Plan`` that ``tritonorm.norm(x, scope, ...)`` with the same arguments would run.

    ``device``: None (x's device), a profile name ("h100", "h200", "interpreter"), a
    ``DeviceProfile`` or a torch device. ``op``: "forward", "backward" (the dx kernels) or
    "dwdb" (the weight/bias gradient reduction: for GroupNorm/InstanceNorm the looped/split
    backward's sums kernel on the (sample, channel) segment view, else the channel-view sweep).
    ``plan.kernel`` is a regime of
    ``dispatch.KERNELS``, or "reference" when the call would not run Triton at all.
    ``add_residual`` (and ``residual_dtype``): the plan of ``tritonorm.add_norm(x, add_residual,
    ...)`` instead; its cost counts the residual read and h written.
    """
    pre_add = None
    if add_residual is not None:
        from .prenorm import check_add_args

        rd = check_add_args(x, add_residual, residual_dtype)
        pre_add = (add_residual.element_size(), torch.empty((), dtype=rd).element_size())
    if op not in OPS:
        raise ValueError(f"op={op!r}: expected one of {', '.join(OPS)}")
    from .core import _broadcast_params, _nc_affine

    param_full = _broadcast_params(x, weight, bias)  # broadcast (adaptive) weight/bias
    spec, act = check_norm_args(x, scope, num_groups, None if param_full else weight, None if param_full else bias,
                                eps, center, activation, residual, running_mean, running_var, momentum, training,
                                sample_groups)
    if running_var is not None and not training:  # as norm: running statistics span every group
        spec = dataclasses.replace(spec, sample_groups=1)
    named = isinstance(device, (str, dispatch.DeviceProfile)) and (
        isinstance(device, dispatch.DeviceProfile) or device.strip().lower() in dispatch.PROFILES)
    if not named and x.device.type != "meta":
        name = backends.resolve(backend, x.device if device is None else _torch_device(device), x.dtype)
        if name == "reference":
            return dispatch.Plan("reference", {}, "the reference backend runs this call "
                                 "(no CUDA device and no TRITON_INTERPRET=1, float64, or backend='reference')")
    elif backends.check_backend_name(backend) == "reference" or x.dtype == torch.float64:
        return dispatch.Plan("reference", {}, "backend='reference' or float64: the reference runs")
    if x.numel() == 0:
        return dispatch.Plan("none", {}, "empty input: nothing runs")
    profile = _profile(device, x)
    given = running_var is not None and not training
    # Per-(sample, channel) weight/bias read in place (as launch.ForwardPlan decides): then costed
    # as a plain call with N*C parameters.
    param_nc = None
    nc = _nc_affine(x, weight, bias) if param_full else None
    nseg = _segments(x, spec, weight, bias, False, given) if nc is not None and not given else None
    in_place = nseg is not None and nseg.order
    # Conditional BatchNorm (plain BatchNorm with them): read in place too, also in eval.
    bn = _bn_segments(x, spec) if nc is not None and not in_place else None
    if in_place or bn is not None:
        param_full = False
        param_nc = (sum(t.numel() for t in (weight, bias) if t is not None), nc[:2].count("c"))
    # adaLN's per-(sample, column) weight/bias read in place (launch._row_samples_plan): a plain
    # row norm's forward; backward, the fused dx pass with J programs a sample, then the finish.
    rows = _sample_rows(x, spec, weight, bias, profile, flags_of(weight, bias, residual, act, center)) \
        if param_full and nc is None and not given else None
    if rows is not None:
        param_full = False
        param_nc = (sum(t.numel() for t in (weight, bias) if t is not None), rows[0][:2].count("d"))
    seg = None
    if op != "forward":
        seg = bn if bn is not None else _segments(x, spec, weight, bias, param_full or rows is not None, given, True)
    view = _view(x, spec, channel_view if op == "dwdb" else stat_view)
    if op == "dwdb" and seg is not None:
        view = seg.view
    if op == "backward" and (weight is not None or bias is not None):
        if _view(x, spec, channel_view) is None:  # the launcher needs it for dweight/dbias too
            view = None
    if view is None:
        return dispatch.Plan(dispatch.NATIVE, {}, "the channel view needs more than "
                             f"{MAX_DIMS} dims a side even contiguous: the torch regime runs backward")
    flags = flags_of(weight, bias, residual, act, center)
    problem = dispatch.problem_from_view(op, view, x.element_size(), spec=spec,
                                         dtype=str(x.dtype).replace("torch.", ""), flags=flags,
                                         fused_m=seg.fused_cols if seg is not None and op == "backward" else 0)
    plan = dispatch.plan_for(problem, profile)
    if op == "backward":
        plan = _wide(plan, problem, profile, x, spec, weight, bias, given, seg, param_full, param_nc,
                     rows is not None, bn, view)
    out_stride = torch.empty_like(x, memory_format=torch.preserve_format, device="meta").stride()
    if op in ("forward", "backward") and plan.kernel != dispatch.NATIVE and running_var is None \
            and running_mean is None and pre_add is None and not param_full \
            and (param_nc is None or (rows is None and bn is None and nc[2][1] in (0, 1) and nc[2][3] in (0, 1))):
        if pixel_plan.applies(tuple(x.shape), x.stride(), out_stride, spec, x.element_size()):
            # channels_last GroupNorm with short groups: the whole-pixel kernels, as the launcher runs them
            plan = pixel_plan.choose(tuple(x.shape), spec, x.element_size(), profile, op)
    if (op in ("forward", "backward") and plan.kernel != dispatch.NATIVE and pre_add is None and not param_full
            and bn is None):
        if planes_plan.applies(tuple(x.shape), x.stride(), out_stride, spec, x.element_size(), profile):
            # NCHW BatchNorm (Ghost BatchNorm too: a program per sample group) with planes of
            # other than 16k elements: flat channel-block tiles
            plan = planes_plan.choose(tuple(x.shape), x.element_size(), profile, op, spec.sample_groups)
    groups = f", S={spec.sample_groups} sample groups" if spec.sample_groups > 1 else ""
    note = (f" [{profile.name}: P={problem.P} statistics x M={problem.M} elements{groups}, "
            f"{problem.layout}]")
    if (op == "forward" and running_var is not None and not training and plan.kernel != dispatch.NATIVE
            and "planes" not in plan.config):
        note += " (eval with running statistics: only the apply kernel runs, with these blocks)"
    sweeps = []
    call_cost = _cost(op, plan, problem, profile, x, spec, weight, bias, residual, act, running_var, training,
                      flags, pre_add, param_full, param_nc, rows[1] if rows is not None else 0, sweeps, bn)
    if op == "dwdb" and not (sweeps and sweeps[0]):
        note += (" (not run by this call: no weight or bias)" if weight is None and bias is None else
                 " (not run by this call: the backward's dx pass gives dweight/dbias)")
    return dispatch.Plan(plan.kernel, dict(plan.config), plan.reason + note, cost=call_cost)


def _wide(plan, problem, profile, x, spec, weight, bias, given, seg, param_full, param_nc, rows_nc, bn, view):
    """The backward plan as the launcher takes it (dispatch.backward_wide, with every gradient
    asked for)."""
    need_wb = weight is not None or bias is not None
    row_channel = need_wb and not given and not param_full and bn is None and channel_per_row(spec)
    from .kernels import launch

    return dispatch.backward_wide(plan, problem, profile, launch.wide_suits(
        need_wb, True, given, seg, param_full, param_nc, rows_nc, row_channel, view, x.shape))


def _cost(op, plan, problem, profile, x, spec, weight, bias, residual, act, running_var, training, flags,
          pre_add=None, param_full=False, param_nc=None, sample_programs=0, sweeps=None, bn=None):
    """The cost model of the whole forward (op="forward") or backward (op="backward"/"dwdb").
    ``bn``: conditional BatchNorm's segments (its dweight/dbias from them, also in eval, where
    the looped/split backward still runs the sums kernel for them)."""
    params = weight if weight is not None else bias
    common = dict(elem_bytes=x.element_size(), channels=x.shape[1], has_w=weight is not None,
                  has_b=bias is not None, has_res=residual is not None,
                  param_bytes=params.element_size() if params is not None else 4, pre_add=pre_add,
                  param_full=sum(t is not None for t in (weight, bias)) if param_full else 0,
                  param_nc=param_nc)
    if param_full:  # the cost model counts a broadcast parameter by its own element count
        common["channels"] = params.numel()
    given = running_var is not None and not training
    if op == "forward":
        mode = "given" if given else "train"
        return cost.forward_cost(plan, problem, profile, mode=mode, running=running_var is not None and training,
                                 running_bytes=running_var.element_size() if running_var is not None else 4,
                                 **common)
    if "planes" in plan.config:  # the flat channel-block kernels (kernels/planes.py)
        return cost.planes_backward_cost(plan, problem, profile, given=given, act=act is not None,
                                         groups=spec.sample_groups, **common)
    if "cb" in plan.config:  # the whole-pixel kernels (kernels/pixels_backward.py)
        return cost.pixels_backward_cost(plan, problem, profile, samples=x.shape[0], act=act is not None, **common)
    fwd_view = _view(x, spec, stat_view)
    seg = bn if bn is not None else _segments(x, spec, weight, bias, param_full or sample_programs > 0, given, True)
    bproblem = dispatch.problem_from_view("backward", fwd_view, x.element_size(), spec=spec,
                                          dtype=problem.dtype, flags=flags,
                                          fused_m=seg.fused_cols if seg is not None else 0)
    bplan = dispatch.plan_for(bproblem, profile)
    if (param_nc is not None or param_full) and bplan.kernel == dispatch.NATIVE:  # as the launcher
        bplan = dispatch.choose(bproblem, profile)
    need_wb = weight is not None or bias is not None
    row_channel = need_wb and not given and not param_full and bn is None and channel_per_row(spec)
    bplan = _wide(bplan, bproblem, profile, x, spec, weight, bias, given, seg, param_full, param_nc,
                  sample_programs > 0, bn, fwd_view)
    col_channel = (need_wb and bplan.kernel == "fused" and not param_full
                   and channel_per_col(fwd_view, x.shape[1]))
    if seg is not None and bn is None and ((bplan.kernel == "fused" and not seg.order)
                                           or (bplan.kernel != "fused" and given)):
        seg = None  # as the launcher: the channel-view sweep runs instead
    if (need_wb and bplan.kernel != "fused" and not given and not param_full and seg is None
            and (sample_programs or (param_nc is None and channel_per_col(fwd_view, x.shape[1])))):
        col_channel = True  # as the launcher: the first stage keeps per-column sums (_bwd_col_sums_kernel)
    segs = None
    if seg is not None and bplan.kernel != dispatch.NATIVE:
        split = 1
        if bplan.kernel != "fused":
            sproblem = dispatch.problem_from_view("dwdb", seg.view, x.element_size(), spec=spec,
                                                  dtype=problem.dtype, flags=flags)
            splan = dispatch.plan_for(sproblem, profile)
            if splan.kernel not in ("looped", "split"):
                splan = dispatch.choose(sproblem, profile)
            split = splan.config.get("split", 1) if splan.kernel == "split" else 1
        segs = (seg.view.P, split)
    dwdb = None
    if need_wb and not (row_channel or col_channel or param_full or segs is not None or sample_programs):
        cview = _view(x, spec, channel_view)
        dwdb = dispatch.plan_for(dispatch.problem_from_view("dwdb", cview, x.element_size(), spec=spec,
                                                            dtype=problem.dtype, flags=flags), profile)
    if sweeps is not None:  # whether a dweight/dbias sweep of its own runs (op "dwdb" plans it)
        sweeps.append(dwdb is not None or (segs is not None and bplan.kernel not in ("fused", dispatch.NATIVE)))
    return cost.backward_cost(bplan, bproblem, dwdb, profile, act=act is not None, row_channel=row_channel,
                              col_channel=col_channel, given=given and bn is None, segments=segs,
                              sample_programs=sample_programs,
                              **common)
