"""README.md's python blocks run as-is: each ```python block is extracted and executed in a
fresh process, in the environment a CPU-only user has: no TRITON_INTERPRET, so the blocks pick
the CPU themselves and the reference backend runs them (fast). A process of its own, because a
block run in the test process without TRITON_INTERPRET left Triton's interpreter unable to run
the kernels of later tests in that worker. What is checked is the documentation; the kernels
have their own tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    env = {k: v for k, v in os.environ.items() if k != "TRITONORM_BACKEND"}
    if not torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    root = str(README.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"README.md python block {index + 1} failed:\n{proc.stderr[-3000:]}"
