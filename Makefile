# Two commands do all the set-up on a fresh machine with Python 3.10+:
#   make reproduce   the main job: the whole study, quick's recipe on drnb's synthetic photographs (demo)
#   make test        the test suite (what CI runs)
# Both create or reuse .venv, install drnb into it and register the Jupyter kernel "drnb";
# a second run reinstalls nothing unless pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.drnb-installed
# Another profile and data: make reproduce PROFILE=quick ARGS="--dataset aptos2019 --data-dir data/aptos2019"
PROFILE ?= demo
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup reproduce test test-fast benchmark strip-notebooks

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("drnb needs Python 3.10 or newer, found " + sys.version.split()[0]) if sys.version_info < (3, 10) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --user --name drnb --display-name "Python (drnb)"
	touch $(STAMP)

reproduce: $(STAMP)
	$(BIN)/drnb reproduce --profile $(PROFILE) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the trainings and the papermill chain: 9 minutes on the slower 2-core machine class.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run_benchmarks.py $(ARGS)

strip-notebooks: $(STAMP)
	$(BIN)/nbstripout notebooks/*.ipynb
