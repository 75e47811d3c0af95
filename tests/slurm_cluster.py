"""A real single-host Slurm cluster for tests: munged, slurmctld and slurmd (Debian's slurm-wlm) started as child
processes from a generated config in a temp dir, listening on loopback only.

One CPU-only node with 2 CPUs, no cgroups (proctrack/linuxproc, task/none), no accounting, state and spool in the
temp dir. ``ReturnToService=2`` and ``JobRequeue=1`` so a requeued job runs again on the same node. Commands see the
cluster through ``SLURM_CONF`` (``Cluster.env``). Install the daemons as root with
``apt-get install -y slurm-wlm munge``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

NEEDED = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sacct")


def missing_binaries() -> list[str]:
    return [b for b in NEEDED[:-1] if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    """Start with ``Cluster(root).start()``; stop with ``.stop()``. ``run(*cmd)`` runs a Slurm client command."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = Path(root), cpus
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "Cluster":
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key, sock = r / "munge" / "munge.key", r / "munge" / "munge.socket"
        subprocess.run([_bin("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self._spawn([_bin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                     f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                     f"--seed-file={r / 'munge' / 'munged.seed'}"])
        self._wait(lambda: sock.exists(), timeout, "munged did not create its socket")
        ctld_port, slurmd_port = _free_ports(2)
        # The node is named after this host: launch scripts use node names as rendezvous addresses, as on a
        # cluster whose node names resolve.
        host = self.node = socket.gethostname()
        self.conf.write_text(f"""\
ClusterName=tmltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
LaunchParameters=enable_nss_slurm
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=1
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        self._spawn([_bin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn([_bin("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(lambda: re.search(r"State=(IDLE|MIXED)", self.run("scontrol", "show", "node", host,
                                                                       check=False).stdout), timeout,
                   "the node did not come up")
        return self

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{Path(cmd[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait(self, ready, timeout: float, what: str) -> None:
        t_end = time.time() + timeout
        while time.time() < t_end:
            if ready():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.2)
        raise RuntimeError(f"Slurm test cluster: {what} (dead daemons: {dead or 'none'}); logs:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*")))

    def run(self, *cmd: str, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster (``env``: extra variables, e.g. for sbatch)."""
        proc = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60,
                              **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def stop(self) -> None:
        if any(p.poll() is None for p in self.procs):
            self.run("scancel", "--full", "--user=root", check=False)  # nothing of ours outlives the session
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
