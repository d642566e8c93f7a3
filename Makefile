# Two entry points, each usable on a fresh machine:
#   make demo   - create .venv if missing, install, run the whole notebook series on the demo data
#   make test   - create .venv if missing, install, run pytest (helpers) and nbval (notebooks)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test env bench clean-runs refresh-committed lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this pair is on the machine's disk (an unpinned torch downloads GBs)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e .
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) -m helpers.run --profile demo

test: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	TQDM_DISABLE=1 $(PY) -m pytest tests -q
	# nbval executes the notebooks into a fresh runs folder: a demo run already in runs/ would be
	# reused ("reusing its prediction ...") and its outputs would differ from the committed ones
	# PAIP_REPRO_STRICT_FIGURES=1: a figure cell that fails fails its nbval cell (helpers.figures)
	runs=$$(mktemp -d) && trap 'rm -rf "$$runs"' EXIT && PAIP_REPRO_RUNS="$$runs" TQDM_DISABLE=1 \
		PAIP_REPRO_STRICT_FIGURES=1 $(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider notebooks -q

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
