# One-command entry points. Everything installs into ./.venv from the project's own files.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DATA    ?= data/synthetic_tiny
STEPS   ?= 150
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline

.PHONY: setup data pretrain test clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

$(DATA)/manifest.json: | $(BIN)/.installed
	$(BIN)/python -m data_prep.synth_dialogues --out $(DATA) --episodes 96 --seed 0

data: $(DATA)/manifest.json

pretrain: setup data
	$(BIN)/python recipes/pretrain.py model=tiny data=synthetic trainer.max_steps=$(STEPS)

test: setup
	$(BIN)/python -m pytest -x -q tests

clean:
	rm -rf $(VENV) outputs $(DATA)
