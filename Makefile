# patchrig: `make sim` sets everything up and runs the simulated rig; `make test` runs the tests.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: sim test lint bench setup clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

sim: $(STAMP)
	$(BIN)/patchrig sim

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy rig config manipulators simulators calibration localisation tools

bench: $(STAMP)
	$(BIN)/patchrig bench manipulators
	$(BIN)/patchrig bench microscope
	$(BIN)/patchrig bench localiser

clean:
	rm -rf $(VENV) build *.egg-info
