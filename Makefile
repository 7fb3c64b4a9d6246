# The two commands of the README: `make demo` (the embedded default) and `make test` (lint, types, tests).
# Both create the virtual environment they need. torch is installed first, and only when the environment has none,
# so a user's own CUDA build is kept (and pip never pulls a multi-GB CUDA build on a CPU machine).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: setup browser demo test lint clean

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	@command -v java >/dev/null || echo "warning: no java on PATH; the COCO metrics (pycocoevalcap) need it: apt-get install default-jre-headless"
	@# METEOR's paraphrase index (~17 s, once per machine), so that no evaluation waits for it; optional (see README).
	-$(BIN)/python -m captune.meteor
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/captune demo --output-dir demo-out

lint: setup
	$(BIN)/ruff check src tests benchmarks notebooks
	$(BIN)/ruff format --check src tests benchmarks notebooks
	$(BIN)/mypy

# Debian's headless Chromium and its driver, for the test that renders the run report as a person would see it.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; \
	fi

test: lint browser
	$(BIN)/pytest -q

clean:
	rm -rf demo-out runs .pytest_cache .mypy_cache .ruff_cache
