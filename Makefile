# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to builds that pair with a torchvision (open_clip imports torchvision);
# override TORCH_SPEC for another platform, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint bench gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/mergesearch demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(BIN)/ruff check merge_backend evaluators search tests benchmarks toyworld

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/merge_cli.py
	$(BIN)/python benchmarks/merge_engine.py
	$(BIN)/python benchmarks/trial_breakdown.py
	$(BIN)/python benchmarks/lora_extract.py

# Everything that needs a GPU, in one call that ends inside 8 minutes (benchmarks/gpu_check.py):
# the gpu-marked tests, the engine benchmark on CUDA, a realistic full-size trial. Its output
# goes into benchmarks/RESULTS.md as it is. On a host whose python already has torch with CUDA
# (the lent GPU machines): make gpu-check GPU_PYTHON=python3. On a CPU, to check the plumbing:
# make gpu-check GPU_CHECK_ARGS=--dry-run
GPU_PYTHON ?= $(BIN)/python
GPU_CHECK_ARGS ?=
gpu-check: $(if $(filter $(BIN)/python,$(GPU_PYTHON)),$(VENV)/.installed)
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf demo_run .pytest_cache
