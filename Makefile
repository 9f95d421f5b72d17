# rdnac: `make demo` compiles and runs a real model; `make test` runs the CPU test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PLAN   := plans/smollm2.cpu.msgpack

.PHONY: install demo test test-gpu clean

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,serve]'
	touch $@

install: $(VENV)/.installed

demo: install
	@mkdir -p plans
	$(VENV)/bin/rdnac compile demo:smollm2 --target cpu -o $(PLAN)
	$(VENV)/bin/rdnac run $(PLAN) --chat "What is the capital of France?" --max-tokens 32

test: install
	$(VENV)/bin/pytest -q -ra

test-gpu: install
	$(VENV)/bin/pytest -q -ra -m gpu

clean:
	rm -rf plans/*.msgpack plans/*.safetensors
