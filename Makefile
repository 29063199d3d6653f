# The README's commands. `make demo` runs a real distillation end to end; `make test` runs the suite
# (`make test-fast`: without the end-to-end tests).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel is pinned for CI and laptops; GPU hosts install their CUDA build of torch first.
# Not a floor: the supported torch versions are stated once, in pyproject.toml.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast lint services clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py

services:
	bash .ci/services.sh

test: install services
	$(PY) -m pytest

test-fast: install services
	$(PY) -m pytest -m "not e2e"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy app worker

clean:
	rm -rf $(VENV) .distill demo-output
