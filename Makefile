# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
# `make study` runs the study's grid, two models x three tasks, cell by cell and resumable (about 8 h on
# 2 cores; CELLS=, ONLY=, DRY_RUN=1: scripts/grid.py); `make demo QUICK=1` a 5-minute profile.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install quickstart demo study test test-slow clean

$(BIN)/workbench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch pinned to the CPU build first, so no dependency pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,lmeval,deepspeed]"
	touch $@

install: $(BIN)/workbench

# The README's quick start: the tiny model trained, scored, gated and reported (about a minute).
# The gate's exit 1 (the tiny model fails the release policy) does not stop the report.
quickstart: $(BIN)/workbench
	$(BIN)/workbench train recipes/tiny.yaml --output-dir runs/quick
	$(BIN)/workbench eval --suite evals/tiny.yaml --run runs/quick --out runs/quick/results.json
	-$(BIN)/workbench gate runs/quick/results.json --policy evals/gates/release.yaml --json runs/quick/gate.json
	$(BIN)/workbench report runs/quick runs/quick/results.json --policy evals/gates/release.yaml --out runs/quick/report

demo: $(BIN)/workbench
	PATH="$(CURDIR)/$(BIN):$$PATH" PROFILE=$(if $(QUICK),quick,demo) bash scripts/study.sh

study: $(BIN)/workbench
	$(BIN)/python scripts/grid.py

test: $(BIN)/workbench
	$(BIN)/pytest -q

test-slow: $(BIN)/workbench
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) runs
