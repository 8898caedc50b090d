"""README.md's python blocks run as-is: each ```python block is extracted and executed in a
fresh namespace, in the environment a CPU-only user has: no TRITON_INTERPRET, so the blocks pick
the CPU themselves and the reference backend runs them (fast). What is checked is the
documentation; the kernels have their own tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, monkeypatch, capsys):
    monkeypatch.delenv("TRITONORM_BACKEND", raising=False)
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": f"readme_block_{index + 1}"})
