# rdnac: `make demo` compiles and runs a real model; `make test` runs the CPU test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PLAN   := plans/smollm2.cpu.msgpack
# The GPU machine's Triton, whose version is set in one place (rdnac/testing/gpu_machine.py)
GPU_TRITON     := $(shell $(PYTHON) rdnac/testing/gpu_machine.py TRITON)
GPU_TRITON_DIR := $(shell $(PYTHON) rdnac/testing/gpu_machine.py ENV_DIR)

.PHONY: install gpu-triton gpu-wheels demo test test-gpu clean

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,serve]'
	touch $@

install: $(VENV)/.installed

# Triton alone (no torch: the main venv's serves), for tests/test_triton_gpu_machine.py to put first on the
# path of a subprocess and build plans under. Triton cross-compiles on CPU: no GPU needed.
$(GPU_TRITON_DIR)/.installed: | $(VENV)/.installed
	rm -rf $(GPU_TRITON_DIR)
	$(PY) -m pip install -q --no-deps --target $(GPU_TRITON_DIR) triton==$(GPU_TRITON)
	touch $@

gpu-triton: $(GPU_TRITON_DIR)/.installed

# Wheels the GPU machine lacks (xxhash, the server's): carried to it in .whl/ (BENCHMARKS.md).
gpu-wheels: install
	$(PY) -m pip download -q --only-binary=:all: --no-deps -d .whl \
	  --python-version $$($(PY) rdnac/testing/gpu_machine.py PYTHON) --platform manylinux2014_x86_64 \
	  $$($(PY) rdnac/testing/gpu_machine.py requirements)

demo: install
	@mkdir -p plans
	$(VENV)/bin/rdnac compile demo:smollm2 --target cpu -o $(PLAN)
	$(VENV)/bin/rdnac run $(PLAN) --chat "What is the capital of France?" --max-tokens 32

test: install gpu-triton
	$(VENV)/bin/pytest -q -ra

test-gpu: install
	$(VENV)/bin/pytest -q -ra -m gpu

clean:
	rm -rf plans/*.msgpack plans/*.safetensors
