#!/usr/bin/env bash
# Data-parallel pretraining on this machine: launch/torchrun_local.sh NPROC [Hydra overrides...]
# e.g. launch/torchrun_local.sh 2 hydra.run.dir=outputs/dp2 parallel=zero2 trainer.max_steps=100
# On a machine without CUDA the ranks use DeepSpeed's CPU accelerator and gloo; with CUDA, NCCL.
set -euo pipefail
cd "$(dirname "$0")/.."
nproc="${1:?usage: launch/torchrun_local.sh NPROC [overrides...]}"
shift
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  # One intra-op thread per rank unless asked otherwise, so ranks do not fight over cores.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
# Every rank must write to one run dir: pick it here unless given.
case " $* " in *" hydra.run.dir="*) run_dir_arg=() ;; *) run_dir_arg=("hydra.run.dir=outputs/pretrain/$(date +%Y-%m-%d/%H-%M-%S)") ;; esac
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" recipes/pretrain.py "${run_dir_arg[@]}" "$@"
