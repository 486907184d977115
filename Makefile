# Fresh machine set-up and the two main commands. Each target installs what it needs into .venv.
#   make demo   - run llama-tiny on a local 2-process CPU mesh (tp=2): passes, collectives, check vs eager
#   make test   - the test suite
# TORCH pins the PyTorch build; on the CPU machines this project targets, torch==2.13.0 is the
# local CPU wheel (an unpinned torch would pull gigabytes of CUDA packages).
PY ?= python3
VENV := .venv
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: setup demo test lint
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/meshc run llama-tiny --mesh tp=2

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
