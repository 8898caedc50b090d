# `make test` and `make bench` set up their own virtual environment (pinned versions),
# then run. On a machine without a GPU the kernels run in Triton's interpreter.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Two workers: the CI machine has two cores.
WORKERS ?= 2

.PHONY: venv test test-gpu bench clean check-sm90 gpu-report

venv: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# CPU: kernels run in the interpreter (TRITON_INTERPRET=1) on CPU tensors.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n $(WORKERS) -q

# GPU: the same suite, compiled, with the machine's own torch and triton (no venv: GPU machines
# may have no package registry). pytest is needed there; hypothesis and transformers/diffusers
# tests skip when those are missing.
test-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest -q

# Compiled quality at sm_90a without a GPU (docs/compiled.md): every variant the dispatcher picks
# for the suites, compiled with Triton's bundled ptxas; fails on spills, scalar accesses on the
# unit-stride side, or compile errors. Lists the findings; --json PATH writes every variant.
check-sm90: $(STAMP)
	$(PY) -m tritonorm.aot --strict --findings --recompiles -j $(WORKERS)

# The one prepared GPU run (docs/benchmarks.md, "The GPU run"): tests, benchmarks, prediction
# checks, the wall-time probes, a bounded tune and the host cost in 8 minutes, at most 8 files in $(OUT). Like
# test-gpu it uses the machine's own python, torch and triton. GPU_REPORT_FLAGS=--dry-run
# rehearses it on CPU.
OUT ?= $$OUT
gpu-report:
	PYTHONPATH=. $(PYTHON) -m tritonorm.gpu_report --out "$(OUT)" $(GPU_REPORT_FLAGS)

# The runner is in the package (tritonorm/bench); results go to benchmarks/results in the checkout.
bench: $(STAMP)
	$(PY) -m tritonorm bench --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
