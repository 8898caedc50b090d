"""The benchmark shapes: the model suites of tritonorm.tuning.suites, with dtypes and modes.

One registry for tuning and benchmarking, so what is tuned is what is timed.
"""

from __future__ import annotations

import torch

from tritonorm.tuning.suites import SUITES, Case, by_name, cases, make_inputs, meta_input, run  # noqa: F401

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "bwd", "fwd+bwd")


def select(suite: str = "all", name_filter: str | None = None) -> list[Case]:
    return by_name(cases(suite), name_filter)


def scaled_unique(case_list: list[Case]) -> list[tuple[Case, list[Case]]]:
    """Scaled-down cases for the interpreter, each with the full cases it stands for."""
    groups: dict = {}
    for case in case_list:
        small = case.scaled()
        sig = (small.kind, small.shape, small.scope, small.num_groups, small.channels_last,
               small.activation, small.center)
        groups.setdefault(sig, (small, []))[1].append(case)
    return list(groups.values())
