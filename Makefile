# `make demo` and `make test` each build .venv on first use from the repo's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --constraint constraints.txt

.PHONY: demo test lint typecheck unit clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch  # the pinned local CPU wheel first, so nothing resolves a CUDA build
	$(PIP) -e ".[dev,serving]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m merger.demo

test: lint unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
