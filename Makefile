# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
# `make study` runs the study's full grid (docs/study.md); `make demo QUICK=1` a 5-minute profile.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo study test test-slow clean

$(BIN)/workbench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch pinned to the CPU build first, so no dependency pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,lmeval,deepspeed]"
	touch $@

demo: $(BIN)/workbench
	PATH="$(CURDIR)/$(BIN):$$PATH" PROFILE=$(if $(QUICK),quick,demo) bash scripts/study.sh

study: $(BIN)/workbench
	PATH="$(CURDIR)/$(BIN):$$PATH" PROFILE=full bash scripts/study.sh

test: $(BIN)/workbench
	$(BIN)/pytest -q

test-slow: $(BIN)/workbench
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) runs
