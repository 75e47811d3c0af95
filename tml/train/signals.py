"""Graceful stop on SIGUSR1 / SIGUSR2 / SIGTERM (Slurm's pre-emption warning, submitit's, ``scancel``, torchrun
shutting down).

The first signal sets a flag: the loop finishes its current step, all ranks agree (any rank's flag stops all),
save a checkpoint and exit with ``EXIT_STOPPED_BY_SIGNAL``. A second signal exits at once with ``128 + signum``,
the shell's convention; the last complete checkpoint is still there (saves are atomic).

Signals within ``REPEAT_WINDOW_S`` of the first count as that one: Slurm delivers a step's signal to every process of
the step, torchrun (SIGTERM) and ``launch/slurm_node.sh`` pass it on to the trainers again milliseconds later, and a
pre-emption may send SIGTERM then the job's warning signal (submitit's SIGUSR2); none of these is an operator's
second signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

EXIT_STOPPED_BY_SIGNAL = 75  # EX_TEMPFAIL: "stopped after saving; run again with trainer.resume=true"
HANDLED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)  # USR2: submitit's pre-emption signal
REPEAT_WINDOW_S = 2.0  # a stop signal this soon after the first is the same request, not a second one


class StopRequested(SystemExit):
    """Raised after the checkpoint of a signalled stop is written; its code is EXIT_STOPPED_BY_SIGNAL."""

    def __init__(self, signum: int, step: int):
        super().__init__(EXIT_STOPPED_BY_SIGNAL)
        self.signum, self.step = signum, step


class SignalFlag:
    """Installs the handlers; ``signum`` is 0 until a signal arrives."""

    def __init__(self):
        self.signum = 0
        self._first_at = 0.0
        self._previous = {s: signal.signal(s, self._handle) for s in HANDLED}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum:
            if now - self._first_at < REPEAT_WINDOW_S:
                return  # the same stop request arriving again by another path
            os._exit(128 + signum)
        self.signum, self._first_at = signum, now
        print(f"received {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"(send it again to exit at once)", flush=True)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def requeue_submitit_job() -> bool:
    """After a signalled stop in a Slurm job that submitit started (Hydra's ``+launcher=slurm`` sweeps), ask Slurm
    to requeue the job; it then runs the same sweep point again, which resumes from the checkpoint just written
    (``trainer.auto_resume=true`` in ``configs/launcher/slurm.yaml``). Our handler replaced submitit's, which would
    requeue without a checkpoint. Returns whether it requeued. The sbatch scripts in ``launch/`` requeue themselves."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or os.environ.get("SLURM_PROCID", "0") != "0":
        return False
    job = os.environ["SLURM_JOB_ID"]
    print(f"requeueing Slurm job {job}: the sweep point resumes from its checkpoint", flush=True)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    return True
