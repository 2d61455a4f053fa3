# visedit toolkit: a thin layer over the `visedit` command line. Every target installs what it needs first
# (make setup is idempotent). `make help` lists the targets and variables.
PYTHON ?= python3#           the Python that creates .venv
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
VISEDIT := $(BIN)/visedit
STAMP := $(VENV)/.setup-stamp
# The one torch pin: the CPU build, installed before anything that depends on torch (an unpinned torch
# pulled in by a dependency would be a multi-GB CUDA build).
TORCH := torch==2.13.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

# Nothing is ever fetched from a model hub: real checkpoints are local folders.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore::FutureWarning
# glibc hands freed tensor buffers back to the kernel and faults them in again on the next step (~25,000
# page faults and ~0.06 s of system time per LLaVA training step); a fixed mmap threshold and a large
# trim threshold keep them in the heap (~200 faults per step; 2-15 % faster steps, measured interleaved).
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 1073741824
export MALLOC_TOP_PAD_ := 268435456

# ---- variables (name ?= default: what it is) ----
BACKBONE ?= llava#         llava | blip2 | minigpt4
MODEL ?=#                  local Hugging Face folder (empty: the shipped default of BACKBONE)
DEVICE ?=#                 auto | cpu | cuda | cuda:N | balanced (empty: auto, the GPU when there is one)
DTYPE ?=#                  auto | float32 | bfloat16 | float16 (empty: auto, bf16 on a GPU, float32 on the CPU)
DATA ?=#                   MMEdit JSON file for heatmaps / validate / scenes (empty: the world's eval set)
IMAGES ?=#                 image root (empty: each data file's folder)
N ?= 24#                   records for heatmaps / validate / scenes (the first N)
SEED ?= 0#                 noise seed (heatmaps, validate), adapter seed (edit), world seed (world)
OUT ?=#                    output folder (empty: under runs/; OUT=figures/<backbone> refreshes the committed figures)
TASK ?= vqa#               edit: vqa (E-VQA) | caption (E-IC)
TRAIN ?=#                  edit: MMEdit training file (empty: the world's)
EVAL ?=#                   edit: MMEdit evaluation file (empty: the world's)
ATTRIBUTION ?=#            edit: attribution.json to place from (empty: run the attribution first)
CHECKPOINT ?=#             edit: trained adapter weights to evaluate without training
STEPS ?=#                  edit: training steps (empty: 1750 for llava, 2000 otherwise)
RESUME ?=#                 edit: 1 = continue the run checkpointed in OUT/checkpoint
SKIP_BAD ?=#               edit: 1 = skip bad records (counted) instead of stopping at the first
SCENE_GATE ?= 1#           edit: 0 = no scene gate (with TARGET_ROLE=0: the paper's adapter)
SCENE_SIMILARITY ?= salient# edit: what the scene gate compares: salient | chamfer
TARGET_ROLE ?= 1#          edit: 0 = VEAD without the target role
METHODS ?= all#            compare: comma-separated methods (none, visedit, visedit_gated, ft_l, ft_v, tp, ike, mend, serac, grace, lookup)
TEST_SEED ?= 2#            compare: world seed of the test split (never 1, the development world)
EDITS ?=#                  compare: lifelong, comma-separated numbers of edits live at once (e.g. 1,10,100,1000)
JOBS ?=#                   compare: methods run side by side (empty: 2 on a shipped default, 1 with MODEL)
SET ?=#                    compare: space-separated METHOD.KEY=VALUE replacing config values (e.g. ft_l.steps=20)
N_TRAIN ?=#                world: records in each train split (empty: 3000 VQA / 1000 captions)
N_EVAL ?=#                 world: records in each eval split (empty: 1000 VQA / 300 captions)
BACKBONES ?= llava,minigpt4,blip2# toy-models: the defaults to train, in this order

WORLD := runs/world
WORLD_EVAL := $(WORLD)/vqa_eval.json
on = $(filter 1 yes true,$(1))
opt = $(if $(2),$(1) $(2),)

.PHONY: help setup test lint heatmaps validate edit compare scenes bench bench-gpu smoke-full world toy-models notebooks clean

help: ## list the targets and variables
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 22
	@echo "Variables (default):"
	@grep -E '^[A-Z_]+ \?=' $(MAKEFILE_LIST) | sed -E 's/^([A-Z_]+) \?= ?([^#]*)# *(.*)/\1=\2\t\3/' \
		| awk -F'\t' '{printf "  %-32s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv: the pinned torch first, then the package (pip install -e .[dev])

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(FIND_LINKS) $(TORCH)
	$(PY) -m pip install -q $(FIND_LINKS) -e '.[dev]'
	touch $@

test: setup ## the test suite, offline
	$(PY) -m pytest -q

lint: setup ## ruff: lint and import order
	$(BIN)/ruff check .

# The world's eval set the commands default to (seed 1: never a training seed of the defaults); written
# again when the world generator changes.
$(WORLD_EVAL): $(wildcard attrib/world/*.py) | setup
	$(VISEDIT) world --seed 1 --out $(WORLD) --n-train 3000 --n-eval 300 --overwrite

data_args = --data $(if $(DATA),$(DATA),$(WORLD_EVAL)) $(call opt,--images,$(IMAGES))
model_args = --backbone $(BACKBONE) $(call opt,--model,$(MODEL)) $(call opt,--device,$(DEVICE)) $(call opt,--dtype,$(DTYPE))

heatmaps: setup $(if $(DATA),,$(WORLD_EVAL)) ## attribution of BACKBONE on DATA: bars, heatmaps, artifact, placement
	$(VISEDIT) heatmaps $(model_args) $(data_args) --n $(N) --seed $(SEED) $(call opt,--out,$(OUT))

validate: setup $(if $(DATA),,$(WORLD_EVAL)) ## region maps and baselines scored against the world's truth boxes
	$(VISEDIT) validate $(model_args) $(data_args) --n $(N) --seed $(SEED) $(call opt,--out,$(OUT))

edit: setup $(if $(or $(TRAIN),$(EVAL)),,$(WORLD_EVAL)) ## train and evaluate VisEdit (VEAD + IM) on BACKBONE
	$(VISEDIT) edit $(model_args) --task $(TASK) $(call opt,--train,$(TRAIN)) $(call opt,--eval,$(EVAL)) \
		$(call opt,--images,$(IMAGES)) $(call opt,--attribution,$(ATTRIBUTION)) \
		$(call opt,--checkpoint,$(CHECKPOINT)) $(call opt,--steps,$(STEPS)) $(call opt,--out,$(OUT)) \
		--seed $(SEED) $(if $(call on,$(RESUME)),--resume,) $(if $(call on,$(SKIP_BAD)),--skip-bad,) \
		$(if $(call on,$(SCENE_GATE)),--scene-gate,--no-scene-gate) --scene-similarity $(SCENE_SIMILARITY) \
		$(if $(call on,$(TARGET_ROLE)),--target-role,--no-target-role)

compare: setup $(if $(or $(TRAIN),$(EVAL)),,$(WORLD_EVAL)) ## every editing method on BACKBONE: train, dev, test (TEST_SEED)
	$(VISEDIT) compare $(model_args) --task $(TASK) --methods $(METHODS) --test-seed $(TEST_SEED) \
		$(call opt,--train,$(TRAIN)) $(call opt,--eval,$(EVAL)) $(call opt,--images,$(IMAGES)) \
		--seed $(SEED) $(call opt,--out,$(OUT)) $(call opt,--edits,$(EDITS)) --jobs $(or $(JOBS),$(if $(MODEL),1,2)) $(foreach pair,$(SET),--set $(pair))

scenes: setup $(if $(DATA),,$(WORLD_EVAL)) ## how well scene similarity tells an edit's images apart, untrained
	$(VISEDIT) scenes $(model_args) $(data_args) --n $(N) $(call opt,--out,$(OUT))

bench: setup ## speed ratios measured in one run, against their goals
	$(VISEDIT) bench --threads 1 $(call opt,--out,$(OUT))

# Not part of `make test`: the full sizes need a GPU (~14 GB of bf16 weights per 7B backbone). BACKBONE left at
# its default (origin "file") means all three; BACKBONE=llava or a comma-separated list narrows it.
bench-gpu: setup ## costs at the real sizes on one GPU, against their goals (BACKBONE default: all three)
	$(VISEDIT) bench-gpu --backbone $(if $(filter file,$(origin BACKBONE)),all,$(BACKBONE)) $(call opt,--out,$(OUT))

# Not part of `make test`: LLaVA-1.5-7B and MiniGPT-4 need ~16 GB of RAM and a ~14 GB folder on disk.
smoke-full: setup ## BACKBONE at its real size on random bf16 weights, through every step (OUT default runs/full-BACKBONE)
	$(VISEDIT) smoke-full --backbone $(BACKBONE) $(call opt,--out,$(OUT))

world: setup ## the synthetic world with seed SEED in OUT (default runs/world-SEED)
	$(VISEDIT) world --seed $(SEED) --out $(if $(OUT),$(OUT),runs/world-$(SEED)) \
		$(call opt,--n-train,$(N_TRAIN)) $(call opt,--n-eval,$(N_EVAL))

toy-models: setup ## retrain the default models (resumable); OUT=attrib/defaults/models replaces the shipped ones
	$(VISEDIT) train-defaults --backbones $(BACKBONES) $(call opt,--out,$(OUT))

# Each notebook runs in its own kernel from notebooks/ (as Jupyter opens it), so paths are made absolute; the
# executed copy, outputs and all, goes to runs/notebooks/BACKBONE/ (OUT) and the committed ones stay without.
define RUN_NOTEBOOK
import sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient
source, out = Path(sys.argv[1]), Path(sys.argv[2])
notebook = nbformat.read(source, as_version=4)
start = time.perf_counter()
try:
    NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(source.parent)}}).execute()
finally:
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out / source.name)
print(f"{source}: {time.perf_counter() - start:.0f} s -> {out / source.name}")
endef
export RUN_NOTEBOOK

notebooks: setup ## run notebooks/ top to bottom on BACKBONE (and MODEL, DATA, CHECKPOINT...) → runs/notebooks/
	@for notebook in notebooks/[0-9]*.ipynb; do \
		VISEDIT_BACKBONE=$(BACKBONE) VISEDIT_MODEL=$(abspath $(MODEL)) VISEDIT_DATA=$(abspath $(DATA)) \
		VISEDIT_IMAGES=$(abspath $(IMAGES)) VISEDIT_TRAIN=$(abspath $(TRAIN)) VISEDIT_STEPS=$(STEPS) \
		VISEDIT_ATTRIBUTION=$(abspath $(ATTRIBUTION)) VISEDIT_ADAPTER=$(abspath $(CHECKPOINT)) \
		$(PY) -c "$$RUN_NOTEBOOK" $$notebook $(if $(OUT),$(OUT),runs/notebooks/$(BACKBONE)) || exit 1; \
	done

clean: ## remove the virtual environment and caches (not runs/)
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
