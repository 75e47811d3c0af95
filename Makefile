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

.PHONY: setup setup-gpu lock doctor data pretrain serve interaction interaction-data test clean

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

# A model that takes turns (README, "Interaction: a model that takes turns"): a training set rich in barge-ins,
# listener sounds and wait requests (seed 0, 2,880 episodes, 8.9 h: 3-6 min), a held-out set from another seed with
# enough of each event to measure (--require), 30-60 min of training on 2 CPU cores when nothing else runs (by the
# machine's matmul speed) (configs/experiment/interaction_cpu.yaml, 6,000 steps, a checkpoint every 500), then the duplex
# evaluation of the last checkpoint (3 sampling seeds, bootstrap CIs, 5-11 min) beside the silence-rule baseline, and
# the metric-vs-step curves of the kept checkpoints.
# Evaluations run at one OpenMP thread: the README's table was measured so (another thread count can round a sampled
# trajectory differently), and on a busy 2-core machine two threads spin in OpenMP barriers.
ITRAIN    ?= data/interaction_train
IHELDOUT  ?= data/interaction_heldout
IRUN      ?= outputs/interaction/main
# the decoder's floor temperatures, to start (sampling.floor_temperature) and to go on or stop while speaking
# (sampling.floor_temperature_speaking), and the P(speak) at which going on and stopping are even odds while speaking
# (sampling.floor_threshold_speaking), chosen on a development set from seed 2 (README)
IFLOOR_T  ?= 0.7
IFLOOR_TS ?= 0.25
IFLOOR_TH ?= 0.9
IDECODER = --floor-temperature $(IFLOOR_T) --sampling floor_temperature_speaking=$(IFLOOR_TS) \
	--sampling floor_threshold_speaking=$(IFLOOR_TH)
# long_talk holds most of the lines long enough for a listener sound 1.5 s before their end (data_prep.synth_timeline)
IMIX_TRAIN := --scenario-weights dialogue=0.1,interrupt=0.3,wait=0.2,long_talk=0.3,timer=0.025,count_pace=0.025,wall=0.025,squares=0.025 \
	--background-prob 0.1 --listener-sound-prob 1.0
IMIX_HELDOUT := --scenario-weights dialogue=0.05,interrupt=0.3,wait=0.3,long_talk=0.35 --background-prob 0.0 \
	--listener-sound-prob 0.9 --require barge_in=30,listener_sound=30,wait_window=30,reply_gap=40

ITRAIN_ARGS   := --episodes 2880 --seed 0 $(IMIX_TRAIN)
IHELDOUT_ARGS := --episodes 160 --seed 1 $(IMIX_HELDOUT)

# Each set keeps the arguments that wrote it in .args, rewritten only when they change: a set an older recipe wrote
# (1,440 episodes, another mix) is written again instead of being trained on because its manifest exists.
$(ITRAIN)/.args $(ITRAIN)/manifest.json: SET_ARGS = $(ITRAIN_ARGS)
$(IHELDOUT)/.args $(IHELDOUT)/manifest.json: SET_ARGS = $(IHELDOUT_ARGS)

$(ITRAIN)/.args $(IHELDOUT)/.args: %/.args: FORCE
	@mkdir -p $(@D); echo '$(SET_ARGS)' | cmp -s - $@ || echo '$(SET_ARGS)' > $@

$(ITRAIN)/manifest.json $(IHELDOUT)/manifest.json: %/manifest.json: %/.args | $(BIN)/.installed
	$(BIN)/python -m data_prep.synth_dialogues --out $* $(SET_ARGS)

FORCE:

interaction-data: $(ITRAIN)/manifest.json $(IHELDOUT)/manifest.json

interaction: setup interaction-data
	$(BIN)/python recipes/pretrain.py +experiment=interaction_cpu data.path=$(ITRAIN) data.val_path=$(IHELDOUT) \
		hydra.run.dir=$(IRUN)
	OMP_NUM_THREADS=1 $(BIN)/python -m tml.tools.interaction_curves --run $(IRUN) --data $(IHELDOUT) --episodes 160 --steps 6000 \
		--seeds 0,1,2 --vad silero $(IDECODER) --out $(IRUN)/eval/final.png
	$(BIN)/python -m tml.tools.interaction_curves table $(IRUN)/eval/final.json
	OMP_NUM_THREADS=1 $(BIN)/python -m tml.tools.interaction_curves --run $(IRUN) --data $(IHELDOUT) --episodes 24 --no-baseline \
		$(IDECODER) --steps 1000,2000,3000,4000,5000,6000 --out $(IRUN)/eval/curves.png

test: setup
	$(BIN)/python -m pytest -x -q tests

clean:
	rm -rf $(VENV) outputs $(DATA)
