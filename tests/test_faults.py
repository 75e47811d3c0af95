"""What clusters do to runs, done for real to 2 torchrun ranks on gloo: a rank SIGKILLed mid-step, a rank that hangs
(SIGSTOP), a disk that fills up while a checkpoint is written, a straggler. Each checks what happened, how fast it was noticed, and that
nothing after the last complete checkpoint is lost (the run resumes from it to the uninterrupted run's parameters)."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (CLUSTER_RUN, CLUSTER_STEPS, COMPARED, ENV, ROOT, assert_same_params, metrics, module_state,
                      recipe_cmd, run_recipe, start, wait_for_step)
from tml.train.checkpoint import damage, latest_tag, tag_for


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (from /proc)."""
    kids = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split()
    for pid in kids:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among torchrun {torchrun_pid}'s children {kids}")


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited child that its parent has not reaped yet is a zombie: not alive)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def resumes_from_step_8_as_if_uninterrupted(run, synth_data, two_rank_run) -> None:
    """The failed run's newest checkpoint is step 8's, intact; resumed, it ends with the uninterrupted run's parameters
    and losses."""
    ckpts = run / "checkpoints"
    assert latest_tag(ckpts) == tag_for(8) and damage(ckpts / tag_for(8)) is None
    resumed = run_recipe(run, f"data.path={synth_data}", *CLUSTER_RUN, "trainer.auto_resume=true", nproc=2)
    assert f"resumed from {ckpts / tag_for(8)} at step 8" in resumed.stdout
    assert_same_params(module_state(run, CLUSTER_STEPS), module_state(two_rank_run, CLUSTER_STEPS))
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(two_rank_run)]


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
    resumes_from_step_8_as_if_uninterrupted(run, synth_data, two_rank_run)


def test_hung_rank_is_bounded_by_the_collective_timeout_and_the_run_resumes(synth_data, two_rank_run, tmp_path):
    """Rank 1 is SIGSTOPped after step 10 (alive, sockets open, never answering): rank 0's gradient all-reduce (on
    DeepSpeed's data-parallel group, which must carry parallel.collective_timeout_s too) times out after 10 s, its
    error names rank 1, torchrun then kills the stopped rank (SIGTERM waits 30 s, then SIGKILL). The checkpoint of
    step 8 is intact and the resumed run ends with the uninterrupted run's parameters."""
    run = tmp_path / "run"
    proc = start(run, f"data.path={synth_data}", *CLUSTER_RUN, "parallel.collective_timeout_s=10", nproc=2)
    wait_for_step(proc, run, 10)
    rank0 = worker_pid(proc.pid, 0)
    t0 = time.time()
    os.kill(worker_pid(proc.pid, 1), signal.SIGSTOP)
    while alive(rank0) and time.time() - t0 < 120:
        time.sleep(0.05)
    rank0_s = time.time() - t0
    out, _ = proc.communicate(timeout=120)
    torchrun_s = time.time() - t0
    print(f"rank 1 SIGSTOPped: rank 0 exited {rank0_s:.1f} s later, torchrun {torchrun_s:.1f} s")
    assert proc.returncode != 0
    assert "Timed out waiting 10000ms" in out and "ranks that did not answer within 5 s: [1]" in out, out[-3000:]
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9", out), out[-3000:]
    assert 10 <= rank0_s < 10 + 5 + 20, rank0_s  # the timeout, the 5 s roll call, start-up slack on a busy machine
    resumes_from_step_8_as_if_uninterrupted(run, synth_data, two_rank_run)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a size-limited tmpfs (root only); yields a function mount(path, size) and unmounts at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounted = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for p in reversed(mounted):
        subprocess.run(["umount", "-l", str(p)], check=False)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(synth_data, two_rank_run, tmp_path, tmpfs):
    """The run dir is a 16 MB filesystem and a checkpoint takes 10.2 MB: step 2's save fits, step 4's does not.
    Every rank stops before writing, with an error naming the directory and the bytes needed. Then the staging
    directory alone is a 4 MB filesystem (the run dir has room): step 4's save fails while writing, with the path
    and bytes; nothing is published. With room again the run resumes from step 2 and matches the reference."""
    run = tmpfs(tmp_path / "run", "16m")
    common = [f"data.path={synth_data}", "trainer.save_every=2", "trainer.keep_last=1", "logger=none",
              "trainer.max_steps=4"]
    ckpts = run / "checkpoints"
    t0 = time.time()
    proc = subprocess.run(recipe_cmd(run, common, 2), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and latest_tag(ckpts) == tag_for(2) and damage(ckpts / tag_for(2)) is None, out[-3000:]
    size = sum(json.loads((ckpts / tag_for(2) / "complete.json").read_text())["files"].values())
    assert out.count(f"not enough space to save step 4 in {ckpts}: about {size} bytes needed") >= 2, out[-3000:]
    assert "the newest complete checkpoint is step_00000002" in out
    print(f"disk full (pre-check): run ended {time.time() - t0:.1f} s after start")

    subprocess.run(["mount", "-o", "remount,size=64m", str(run)], check=True)  # the operator frees space ...
    tmpfs(ckpts / ".tmp", "4m")  # ... but the staging directory is on a full filesystem
    t0 = time.time()
    proc = subprocess.run(recipe_cmd(run, [*common, "trainer.auto_resume=true"], 2), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"resumed from {ckpts / tag_for(2)}" in out, out[-3000:]
    m = re.search(rf"writing the checkpoint of step 4 to {re.escape(str(ckpts / '.tmp' / tag_for(4)))} failed on "
                  rf"rank 0 after (\d+) bytes .*; it needs about {size} bytes, (\d+) are free", out, re.S)
    assert m and int(m[1]) + int(m[2]) < size, out[-3000:]
    print(f"disk full (while writing): run ended {time.time() - t0:.1f} s after start")
    assert latest_tag(ckpts) == tag_for(2) and damage(ckpts / tag_for(2)) is None
    assert not (ckpts / tag_for(4)).exists()

    subprocess.run(["umount", str(ckpts / ".tmp")], check=True)
    run_recipe(run, *common, "trainer.auto_resume=true", nproc=2)
    for a, b in zip(metrics(run), metrics(two_rank_run)[:4], strict=True):
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}, a["step"]


def test_straggler_shows_in_step_time_and_per_rank_busy_time(synth_data, tmp_path):
    run_recipe(tmp_path, f"data.path={synth_data}", "trainer.max_steps=3", "logger=none",
               "trainer.fault.slow_rank=1", "trainer.fault.slow_rank_s=0.5", nproc=2)
    for r in metrics(tmp_path):
        assert r["slowest_rank"] == 1 and r["rank_busy_s"][1] - r["rank_busy_s"][0] > 0.4, r
        if r["step"] > 1:  # step 1 of rank 0 overlaps rank 1's first sleep (the ranks start apart)
            # rank 0 waits for it in the gradient all-reduce (less what rank 0 spent logging while rank 1 slept)
            assert r["step_time_s"] > 0.4
