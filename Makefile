# Entry points, each usable on a fresh machine (each creates .venv if missing and installs):
#   make demo       - run the whole notebook series on the demo data
#   make test       - the full lane (CI): ruff, every pytest test, nbval over the notebooks
#   make test-fast  - the edit loop: ruff and the pytest tests not marked slow (no nbval)
#   make lab        - JupyterLab on notebooks/ with this environment as the kernel
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LAB_STAMP := $(VENV)/.installed-lab

.PHONY: demo test test-fast lab env bench clean-runs refresh-committed lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this pair is on the machine's disk (an unpinned torch downloads GBs)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e .
	touch $(STAMP)

# The pinned 'lab' extra of pyproject.toml (JupyterLab): make lab, and make test's tests/test_lab.py
$(LAB_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[lab]"
	touch $(LAB_STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) -m helpers.run --profile demo

test: $(STAMP) $(LAB_STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	TQDM_DISABLE=1 $(PY) -m pytest tests -q
	# nbval executes the notebooks into a fresh runs folder: a demo run already in runs/ would be
	# reused ("reusing its prediction ...") and its outputs would differ from the committed ones
	# PAIP_REPRO_STRICT_FIGURES=1: a figure cell that fails fails its nbval cell (helpers.notebook.figures)
	runs=$$(mktemp -d) && trap 'rm -rf "$$runs"' EXIT && PAIP_REPRO_RUNS="$$runs" TQDM_DISABLE=1 \
		PAIP_REPRO_STRICT_FIGURES=1 $(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider notebooks -q

# Slow tests (marked in tests/; see pyproject.toml's markers) run only in make test.
test-fast: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	TQDM_DISABLE=1 $(PY) -m pytest tests -q -m "not slow"

# JupyterLab on notebooks/, the notebooks' python3 kernel being this environment (tools/lab.py).
# Options through LAB_ARGS, e.g. make lab LAB_ARGS="--no-browser --port 8890"
lab: $(LAB_STAMP)
	$(PY) tools/lab.py $(LAB_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# Maintainers: re-execute the committed notebooks on the demo data (figures inline) and copy
# the demo run's figures into figures/.
refresh-committed: $(STAMP)
	$(PY) tools/refresh_committed.py

bench: $(STAMP)
	$(PY) bench/extraction_benchmark.py

clean-runs:
	rm -rf runs/demo
