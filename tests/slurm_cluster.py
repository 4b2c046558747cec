"""A throwaway two-node Slurm cluster on this machine, for tests/test_slurm.py.

Everything lives in one temporary directory: a munge key and socket of its own, a
``slurm.conf``, the controller's state, one spool directory per node, the daemons' logs.
Both nodes are ``localhost`` (``slurmd -N node1`` / ``-N node2`` on distinct ports), one
CPU each, so a 2-node job is 2 processes on this machine talking over loopback::

    tmp/
      munge.key  munge.sock          munged, private to this cluster
      slurm.conf                     SLURM_CONF for every command run through .env
      state/  spool/node1/  spool/node2/
      slurmctld.log  slurmd-node1.log  slurmd-node2.log  munged.log

Slurm comes from Debian's packages (``slurmctld slurmd slurm-client munge``, Slurm 22.05
on Debian 12), installed by :func:`ensure_slurm` when absent. Daemons run in the
foreground as children of the test process and are stopped by :meth:`SlurmCluster.stop`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

__all__ = ["SlurmUnavailable", "ensure_slurm", "SlurmCluster"]

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "mungekey"]
SKIP_ENV = "CHUNKFLOW_SKIP_SLURM"


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and could not be installed here."""


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def ensure_slurm(timeout_s: float = 600) -> None:
    """Install Slurm and munge from Debian's packages when a binary is missing."""
    if not _missing():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(_missing())} missing) and installing it "
                               f"needs root: apt-get install {' '.join(PACKAGES)}")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm is not installed and there is no apt-get; install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` timed out after {timeout_s:.0f} s (no network?)") from None
        if out.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({out.returncode}):\n{out.stdout[-1500:]}{out.stderr[-1500:]}")
    if _missing():
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but {', '.join(_missing())} still missing")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _conf(d: Path, ctld_port: int, node_ports: dict[str, int]) -> str:
    nodes = "\n".join(f"NodeName={n} NodeHostname=localhost Port={p} CPUs=1 RealMemory=1000 State=UNKNOWN"
                      for n, p in node_ports.items())
    return f"""\
ClusterName=chunkflowtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/linear
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobRequeue=1
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
{nodes}
PartitionName=debug Nodes={",".join(node_ports)} Default=YES MaxTime=INFINITE State=UP
"""


def parse_fields(text: str) -> dict[str, str]:
    """``scontrol show job`` output -> {"JobState": "COMPLETED", "Restarts": "1", ...}."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


class SlurmCluster:
    """munged + slurmctld + two slurmd on localhost, all under one temporary directory."""

    NODES = ("node1", "node2")

    def __init__(self) -> None:
        # Under /tmp rather than pytest's 0700 temp root: munged wants its socket's
        # directory searchable by everyone.
        self.dir = Path(tempfile.mkdtemp(prefix="chunkflow-slurm-"))
        self.dir.chmod(0o755)
        self.procs: dict[str, subprocess.Popen] = {}
        ports = _free_ports(1 + len(self.NODES))
        self.node_ports = dict(zip(self.NODES, ports[1:]))
        self.conf = self.dir / "slurm.conf"
        self.conf.write_text(_conf(self.dir, ports[0], self.node_ports))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del self.env[k]  # a surrounding job's variables would leak into ours

    # ------------------------------------------------------------------ daemons
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        d = self.dir
        for sub in ("state", *(f"spool/{n}" for n in self.NODES)):
            (d / sub).mkdir(parents=True)
        subprocess.run(["mungekey", "--create", f"--keyfile={d}/munge.key"], check=True, capture_output=True)
        self._spawn("munged", ["munged", "-F", f"--socket={d}/munge.sock", f"--key-file={d}/munge.key",
                               f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid",
                               f"--seed-file={d}/munged.seed"])
        self._wait(lambda: (d / "munge.sock").exists(), timeout_s, "munged to create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for n in self.NODES:
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._all_idle, timeout_s, "both nodes to be idle in sinfo")
        return self

    def _all_idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.logs()}")
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.NODES)

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self, keep: bool = False) -> None:
        """Cancel jobs, stop the daemons (TERM, then KILL), remove the directory."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", "root"], check=False, timeout=20)
            time.sleep(1)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ jobs
    def run(self, cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def sbatch(self, args: list[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        return parse_fields(self.run(["scontrol", "show", "job", job_id]).stdout)

    def wait_job(self, job_id: str, timeout_s: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                                                              "DEADLINE", "PREEMPTED")) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.get("JobState") in done:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout_s:.0f} s: {info}")
            time.sleep(1)
