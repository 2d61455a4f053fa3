# VisEdit toolkit: every target installs what it needs first (make setup is idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.setup-stamp
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

BACKBONE ?= llava
SEED ?= 0
N ?= 24
MODEL ?=
DATA ?=
IMAGES ?=
OUT ?=
BACKBONES ?=
TRAIN ?=
EVAL ?=
ATTRIBUTION ?=
CHECKPOINT ?=
STEPS ?=
RESUME ?=
SKIP_BAD ?=
WORLD := runs/world
WORLD_EVAL := $(WORLD)/vqa_eval.json

model_arg = $(if $(MODEL),--model $(MODEL),)
data_arg = --data $(if $(DATA),$(DATA),$(WORLD_EVAL)) $(if $(IMAGES),--images $(IMAGES),)
out_arg = $(if $(OUT),--out $(OUT),)

.PHONY: setup test heatmaps validate bench world toy-models edit clean

setup: $(STAMP)

# torch first, pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(PY) -m pip install -q $(FIND_LINKS) -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

# The world's eval set the attribution targets default to (seed 1: never a training seed).
$(WORLD_EVAL): | setup
	$(PY) -m attrib.world --seed 1 --out $(WORLD) --n-train 3000 --n-eval 300 --overwrite

heatmaps: setup $(if $(DATA),,$(WORLD_EVAL))
	$(PY) -m attrib heatmaps --backbone $(BACKBONE) $(model_arg) $(data_arg) --n $(N) --seed $(SEED) $(out_arg)

validate: setup $(if $(DATA),,$(WORLD_EVAL))
	$(PY) -m attrib validate --backbone $(BACKBONE) $(model_arg) $(data_arg) --n $(N) --seed $(SEED) \
		--out $(if $(OUT),$(OUT),runs/validate/$(BACKBONE))

# DATA here is vqa|caption (for heatmaps it is a file); the world rule runs when TRAIN/EVAL are unset.
edit: setup $(if $(or $(TRAIN),$(EVAL)),,$(WORLD_EVAL))
	$(PY) -m editing edit --backbone $(BACKBONE) $(model_arg) --data $(if $(DATA),$(DATA),vqa) \
		$(if $(TRAIN),--train $(TRAIN),) $(if $(EVAL),--eval $(EVAL),) $(if $(IMAGES),--images $(IMAGES),) \
		$(if $(ATTRIBUTION),--attribution $(ATTRIBUTION),) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),) \
		$(if $(STEPS),--steps $(STEPS),) --out $(if $(OUT),$(OUT),runs/$(BACKBONE)) \
		$(if $(filter 1 yes true,$(RESUME)),--resume,) $(if $(filter 1 yes true,$(SKIP_BAD)),--skip-bad,) \
		$(if $(filter 1 yes true,$(SCENE_GATE)),--scene-gate,) $(if $(filter 0 no false,$(SCENE_GATE)),--no-scene-gate,) \
		$(if $(SCENE_SIMILARITY),--scene-similarity $(SCENE_SIMILARITY),) \
		$(if $(filter 0 no false,$(TARGET_ROLE)),--no-target-role,)

bench: setup
	$(PY) -m benchmarks --threads 1 --out $(if $(OUT),$(OUT),runs/bench)

world: setup
	$(PY) -m attrib.world --seed $(SEED) --out $(if $(OUT),$(OUT),runs/world-$(SEED)) \
		$(if $(N_TRAIN),--n-train $(N_TRAIN),) $(if $(N_EVAL),--n-eval $(N_EVAL),)

# Retrains the shipped defaults (resumable: checkpoints in runs/toy-models) and re-measures them; with
# BACKBONES unset, the three defaults (attrib.defaults.recipe.DEFAULT_CHAIN), each from scratch or from another
# default's parts; any recipe of attrib.defaults.recipe.ORDER can be named.
toy-models: setup
	$(PY) -m attrib.defaults $(if $(BACKBONES),--backbones $(BACKBONES),)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
