#!/usr/bin/env bash
# One Slurm task per node: torchrun with c10d rendezvous on the job's first node, GPUS_PER_NODE trainer processes.
# Run by launch/slurm_multinode.sbatch through srun; runnable by hand for a one-node test:
#   SLURM_NNODES=1 SLURM_JOB_ID=local MASTER_ADDR=127.0.0.1 GPUS_PER_NODE=2 launch/slurm_node.sh [overrides...]
# SIGUSR1/SIGTERM sent to this script go straight to the trainer processes (they finish the step, save, exit 75).
# torchrun is kept out of it: on a SIGTERM it would SIGKILL its workers 30 s later, mid-save for a big model; and
# it ignores SIGUSR1, because Slurm signals every process of the step and an unhandled SIGUSR1 would kill it (the
# trainers reset SIGUSR1 to its default at start, then handle it). The trainers count a signal that reaches them
# twice (from Slurm and from here) once. Exit code 75 when stopped by a signal: the batch script requeues on it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
(
  trap '' USR1
  exec "$PY" -m torch.distributed.run \
    --nnodes "${SLURM_NNODES:?}" --nproc_per_node "${GPUS_PER_NODE:?}" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" --rdzv_id "${SLURM_JOB_ID:?}" \
    recipes/pretrain.py "$@"
) &
pid=$!
signalled=0
# shellcheck disable=SC2317  # called from the traps
forward() { signalled=1; pkill "-$1" -P "$pid" || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early (status > 128) when a trap runs; keep waiting until torchrun is gone.
while true; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
if [ "$signalled" = 1 ] && [ "$rc" != 0 ]; then
  exit 75  # the trainers saved and exited 75 (torchrun reports any worker's failure as 1)
fi
exit "$rc"
