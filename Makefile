# One-command entry points. Everything installs into ./.venv from the project's own files.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
LOCK    := requirements/lock.txt
DATA    ?= data/synthetic_tiny
STEPS   ?= 150
TINY    ?= outputs/tiny
PORT    ?= 8765
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline

.PHONY: setup setup-gpu lock doctor data pretrain serve test clean

# The environment is the lock: every package at the version and hash in requirements/lock.txt, then tml itself
# (editable, no dependencies of its own to resolve). A changed lock rebuilds the venv from scratch, so nothing
# from an older lock survives. The doctor at the end fails the setup if the result differs from the lock.
$(BIN)/.installed: $(LOCK) pyproject.toml
	$(PY) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m tml.tools.doctor
	touch $@

setup: $(BIN)/.installed

# On a CUDA node: the lock plus the MegaBlocks expert backend (requirements/gpu.txt says why --no-deps).
setup-gpu: setup
	$(BIN)/pip install --require-hashes --no-deps --no-build-isolation -r requirements/gpu.txt
	$(BIN)/python -m tml.tools.doctor

# Regenerate the lock from pyproject.toml (after adding or moving a dependency); commit the result. Existing pins
# are kept where they still satisfy pyproject.toml; LOCK_ARGS=--upgrade moves everything to the newest allowed.
lock: setup
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --universal --python-version 3.10 \
		--custom-compile-command "make lock" $(LOCK_ARGS) -o $(LOCK)

doctor: setup
	$(BIN)/python -m tml.tools.doctor

$(DATA)/manifest.json: | $(BIN)/.installed
	$(BIN)/python -m data_prep.synth_dialogues --out $(DATA) --episodes 96 --seed 0

data: $(DATA)/manifest.json

pretrain: setup data
	$(BIN)/python recipes/pretrain.py model=tiny data=synthetic trainer.max_steps=$(STEPS)

# Talk to a checkpoint in the browser: serves CHECKPOINT=RUN_DIR, or else trains the tiny model once into $(TINY).
$(TINY)/checkpoints/latest: | $(BIN)/.installed $(DATA)/manifest.json
	$(BIN)/python recipes/pretrain.py model=tiny data=synthetic data.path=$(DATA) trainer.max_steps=$(STEPS) \
		hydra.run.dir=$(TINY)

serve: setup $(if $(CHECKPOINT),,$(TINY)/checkpoints/latest)
	$(BIN)/python recipes/serve.py checkpoint=$(or $(CHECKPOINT),$(TINY)) port=$(PORT)

test: setup
	$(BIN)/python -m pytest -x -q tests

clean:
	rm -rf $(VENV) outputs $(DATA)
