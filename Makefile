# Two entry points (README): `make quickstart` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup quickstart gallery test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# constraints.txt pins the resolved set: pip backtracks for minutes over ray/boto3 without it.
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

quickstart: setup
	$(BIN)/archipelago quickstart --config configs/digits-quickstart.yaml

# docs/gallery.md and its pictures, from tiny models trained on the CPU (a few minutes)
gallery: setup
	$(PY) scripts/gallery.py

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e and not slow"

lint: setup
	$(BIN)/ruff check archipelago tests benchmarks scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
