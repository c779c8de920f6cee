# `make run`: set up .venv on a fresh machine and run the workbook's main job: every
# notebook with papermill (demo preset, 2 ranks), figures into figures/.
# `make test`: set up .venv and run the tests (what CI runs, via .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --editable '.[test]'
	touch $(STAMP)

run: setup
	$(PY) -m moe_kernels figures

demo: setup
	$(PY) -m moe_kernels layer --preset demo --ranks 2 --batch 64 --seq 2 --check

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check moe_kernels tests benchmarks

clean:
	rm -rf build .cache .pytest_cache .hypothesis
