# The README's commands. `make demo` runs a real distillation end to end; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel is pinned for CI and laptops; GPU hosts install their CUDA build of torch first.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint services clean

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

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy app worker

clean:
	rm -rf $(VENV) .distill demo-output
