# VisEdit toolkit: every target installs what it needs first (make setup is idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

# Nothing is ever fetched from a model hub: real checkpoints are local folders.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

BACKBONE ?= llava
SEED ?= 0
OUT ?=

.PHONY: setup test heatmaps world toy-models clean

setup: $(STAMP)

# torch first, pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

heatmaps: setup
	@echo "make heatmaps: the attribution engine is not built yet (see the attribution issue)." >&2
	@exit 2

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
