"""Choosing a kernel regime and launch configuration for a problem.

``choose`` is a pure function of the problem (direction, statistics P, elements per statistic M,
element size, which side is unit-stride) and a device profile, so plans for a GPU can be made and
tested on any machine. The thresholds here are first heuristics from the kernels' register
budgets; docs/dispatch.md records which of them have been measured.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field, replace

REGIMES = ("fused", "looped", "split")


@dataclass(frozen=True)
class DeviceProfile:
    """What the dispatcher needs to know about a device."""

    name: str
    sm_count: int
    # Largest statistic held in registers by one program (elements, per element size in bytes).
    fused_max: dict = field(default_factory=lambda: {4: 8192, 2: 16384})
    # Elements one program should touch per tile.
    tile: int = 4096
    max_warps: int = 16
    interpreter: bool = False


PROFILES = {
    "h100": DeviceProfile("h100", sm_count=132),
    "h200": DeviceProfile("h200", sm_count=132),
    # Triton's interpreter runs programs one after another in Python: few, large programs are
    # fastest there, and the limits only bound memory.
    "interpreter": DeviceProfile("interpreter", sm_count=4, fused_max={4: 4096, 2: 4096},
                                 tile=4096, interpreter=True),
}


@dataclass(frozen=True)
class Problem:
    op: str            # "forward" or "backward"
    P: int             # number of statistics
    M: int             # elements per statistic
    elem_bytes: int    # bytes per element of x
    rows_unit_stride: bool = False  # x's unit stride is on the statistics side (e.g. channels_last BN)


@dataclass(frozen=True)
class Plan:
    """A kernel choice: ``kernel`` names the regime, ``config`` the launch parameters."""

    kernel: str
    config: dict
    reason: str

    def with_config(self, **kw) -> "Plan":
        return replace(self, config={**self.config, **kw})


def _pow2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


def _warps(elements: int, profile: DeviceProfile) -> int:
    return max(1, min(profile.max_warps, _pow2(elements // 256)))


def choose(problem: Problem, profile: DeviceProfile) -> Plan:
    P, M = problem.P, problem.M
    fused_max = profile.fused_max.get(problem.elem_bytes, profile.fused_max[4])
    block_m_full = _pow2(M)
    if block_m_full <= fused_max:
        # Enough rows per program to fill a tile, but keep >= 2 programs per SM when P allows.
        block_p = max(1, min(_pow2(P), profile.tile // block_m_full))
        while block_p > 1 and -(-P // block_p) < 2 * profile.sm_count and not profile.interpreter:
            block_p //= 2
        cfg = {"block_p": block_p, "block_m": block_m_full, "num_warps": _warps(block_p * block_m_full, profile)}
        return Plan("fused", cfg, f"statistic of {M} elements fits one program (<= {fused_max})")
    if problem.rows_unit_stride:
        block_p = min(_pow2(P), 32)
        block_m = max(16, profile.tile // block_p)
    else:
        block_p = 1
        block_m = min(profile.tile, _pow2(M))
    row_programs = -(-P // block_p)
    tiles = -(-M // block_m)
    want = 4 * profile.sm_count
    split = min(tiles, max(1, -(-want // row_programs)))
    cfg = {"block_p": block_p, "block_m": block_m, "num_warps": _warps(block_p * block_m, profile)}
    if split <= 1:
        return Plan("looped", {**cfg, "split": 1},
                    f"{row_programs} programs of one statistic each fill the device")
    return Plan("split", {**cfg, "split": split},
                f"only {row_programs} statistics: {split} programs share each to fill {profile.sm_count} SMs")


_forced = threading.local()


@contextlib.contextmanager
def forced(kernel: str, **config):
    """Force a regime (and optionally launch parameters) inside the block. For tests and tuning."""
    if kernel not in REGIMES:
        raise ValueError(f"kernel={kernel!r} is not a regime; expected one of {', '.join(REGIMES)}")
    prev = getattr(_forced, "value", None)
    _forced.value = (kernel, config)
    try:
        yield
    finally:
        _forced.value = prev


def plan_for(problem: Problem, profile: DeviceProfile) -> Plan:
    """The plan a call runs: a forced plan if one is active, else the heuristic."""
    force = getattr(_forced, "value", None)
    base = choose(problem, profile)
    if force is None:
        return base
    kernel, cfg = force
    if kernel == "fused":
        need = _pow2(problem.M)
        block_p = cfg.get("block_p", max(1, min(_pow2(problem.P), profile.tile // need)))
        return Plan("fused", {"block_p": block_p, "block_m": need, "num_warps": 4}, "forced")
    block_p = cfg.get("block_p", 1)
    block_m = cfg.get("block_m", min(64, _pow2(problem.M)))
    tiles = -(-problem.M // block_m)
    split = 1 if kernel == "looped" else max(2, min(tiles, cfg.get("split", 3)))
    return Plan(kernel, {"block_p": block_p, "block_m": block_m, "split": split, "num_warps": 4}, "forced")
