"""Graceful stop on SIGUSR1 / SIGTERM (Slurm's pre-emption warning, ``scancel``, torchrun shutting down).

The first signal sets a flag: the loop finishes its current step, all ranks agree (any rank's flag stops all),
save a checkpoint and exit with ``EXIT_STOPPED_BY_SIGNAL``. A second signal exits at once with ``128 + signum``,
the shell's convention; the last complete checkpoint is still there (saves are atomic).
"""

from __future__ import annotations

import os
import signal

EXIT_STOPPED_BY_SIGNAL = 75  # EX_TEMPFAIL: "stopped after saving; run again with trainer.resume=true"
HANDLED = (signal.SIGUSR1, signal.SIGTERM)


class StopRequested(SystemExit):
    """Raised after the checkpoint of a signalled stop is written; its code is EXIT_STOPPED_BY_SIGNAL."""

    def __init__(self, signum: int, step: int):
        super().__init__(EXIT_STOPPED_BY_SIGNAL)
        self.signum, self.step = signum, step


class SignalFlag:
    """Installs the handlers; ``signum`` is 0 until a signal arrives."""

    def __init__(self):
        self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in HANDLED}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            os._exit(128 + signum)
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"(send it again to exit at once)", flush=True)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
