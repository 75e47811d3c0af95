"""What clusters do to runs, done for real to 2 torchrun ranks on gloo: a rank SIGKILLed mid-step. Each checks
what happened, how fast it was noticed, and that nothing after the last complete checkpoint is lost (the run
resumes from it to the uninterrupted run's parameters)."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import CLUSTER_RUN, CLUSTER_STEPS, metrics, run_recipe
from test_operations import assert_same_params, module_state, start, wait_for_step
from tml.train.checkpoint import damage, latest_tag, tag_for


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (from /proc)."""
    kids = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split()
    for pid in kids:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among torchrun {torchrun_pid}'s children {kids}")


def test_killed_rank_stops_the_others_at_once_and_the_run_resumes(synth_data, two_rank_run, tmp_path):
    """Rank 1 is SIGKILLed after step 10 (checkpoint of step 8 complete): rank 0, blocked in the step's collective,
    fails as soon as the dead rank's connections close, torchrun names rank 1 and its signal, and the resumed run
    ends with the uninterrupted run's parameters."""
    run = tmp_path / "run"
    proc = start(run, f"data.path={synth_data}", *CLUSTER_RUN, nproc=2)
    wait_for_step(proc, run, 10)
    t0 = time.time()
    os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    detect_s = time.time() - t0
    assert proc.returncode != 0
    assert "ranks that did not answer within 5 s: [1]" in out, out[-3000:]  # rank 0's error
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9", out), out[-3000:]  # torchrun's report
    assert detect_s < 40, detect_s  # torchrun: a dead worker is seen at once; the survivor fails on its socket
    print(f"rank 1 SIGKILLed: torchrun exited {detect_s:.1f} s later")
    ckpts = run / "checkpoints"
    assert latest_tag(ckpts) == tag_for(8) and damage(ckpts / tag_for(8)) is None
    resumed = run_recipe(run, f"data.path={synth_data}", *CLUSTER_RUN, "trainer.auto_resume=true", nproc=2)
    assert f"resumed from {ckpts / tag_for(8)} at step 8" in resumed.stdout
    assert_same_params(module_state(run, CLUSTER_STEPS), module_state(two_rank_run, CLUSTER_STEPS))
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(two_rank_run)]
