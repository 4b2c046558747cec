"""scripts/slurm/finetune.sbatch on a real Slurm cluster: two nodes on this machine.

A module fixture installs Slurm from Debian's packages when absent (tests/slurm_cluster.py)
and starts munged, slurmctld and two slurmd (node1, node2: both localhost, 1 CPU each).
Without Slurm and without a way to install it the tests fail, saying so; set
CHUNKFLOW_SKIP_SLURM=1 to skip them on purpose.

* the tiny config trains as a 2-node job (one torchrun per node, c10d rendezvous, PP=2);
* pre-emption: SIGUSR1 to the batch shell (what ``--signal=B:USR1@N`` delivers) makes
  the training processes checkpoint, the script requeue the job, and the requeued job
  resume and finish with the uninterrupted run's losses, bit for bit;
* the time limit itself sends that SIGUSR1 (a stand-in for Python keeps this one cheap),
  each training process receives it exactly once, and the job is requeued.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from chunkflow.parallel.spawn import free_port
from slurm_cluster import SKIP_ENV, SlurmCluster, SlurmUnavailable, ensure_slurm

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "finetune.sbatch"
STEPS = 20
TINY = ["configs/tiny_cpu.yaml", f"train.steps={STEPS}", "train.log_every=1", "data.synthetic.num_samples=512",
        "train.schedule=megatron"]


@pytest.fixture(scope="module")
def cluster():
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: the Slurm tests are skipped on request")
    try:
        ensure_slurm()
    except SlurmUnavailable as e:
        pytest.fail(f"cannot run the Slurm tests: {e}\n(set {SKIP_ENV}=1 to skip them on purpose)", pytrace=False)
    c = SlurmCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def submit(cluster: SlurmCluster, run_dir: Path, *overrides: str, sbatch_args=(), env=None) -> str:
    """The real script, sized for this machine: 2 nodes x 1 process, 1 CPU each."""
    args = ["--nodes=2", "--cpus-per-task=1", "--gpus-per-node=0", f"--chdir={ROOT}",
            f"--output={run_dir}.out", *sbatch_args, str(SBATCH), *TINY, *overrides]
    env = {"PYTHON": sys.executable, "GPUS_PER_NODE": "1", "RUN_DIR": str(run_dir), **(env or {})}
    return cluster.sbatch(args, env=env)


def finished(cluster: SlurmCluster, job: str, run_dir: Path, timeout_s: float = 300) -> dict:
    info = cluster.wait_job(job, timeout_s)
    log = Path(f"{run_dir}.out").read_text(errors="replace") if Path(f"{run_dir}.out").exists() else ""
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    info["log"] = log
    return info


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slurm") / "uninterrupted"
    job = submit(cluster, run_dir)
    info = finished(cluster, job, run_dir)
    return info, metrics(run_dir)


def test_two_node_job_trains(uninterrupted):
    info, recs = uninterrupted
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]", info
    assert info["Restarts"] == "0"
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert all(r["world_size"] == 2 for r in recs)
    assert "rendezvous localhost:" in info["log"]  # the first node's NodeAddr, not its name
    assert "requeueing" not in info["log"]


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(cluster, uninterrupted, tmp_path):
    _, reference = uninterrupted
    run_dir = tmp_path / "preempted"
    job = submit(cluster, run_dir)
    deadline = time.monotonic() + 240
    while len(metrics(run_dir)) < 2:  # training is under way: warn it as the time limit would
        assert time.monotonic() < deadline, cluster.job(job)
        assert cluster.job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), cluster.job(job)
        time.sleep(0.2)
    cluster.run(["scancel", "--batch", "--signal=USR1", job])
    info = finished(cluster, job, run_dir)
    log = info["log"]

    assert int(info["Restarts"]) >= 1, info
    saved = [line for line in log.splitlines() if "pre-empted at step" in line and "saved" in line]
    assert saved, log[-6000:]
    step = int(saved[0].split("pre-empted at step ")[1].split(":")[0])
    assert 2 <= step < STEPS
    assert (run_dir / f"checkpoint_step{step}" / "trainer.json").is_file()
    assert f"requeueing job {job}" in log
    assert f"resuming from {run_dir / f'checkpoint_step{step}'}" in log, log[-6000:]
    assert "second signal" not in log  # each process was signalled once

    recs = metrics(run_dir)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))  # continued, nothing repeated
    for a, b in zip(reference, recs):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])  # bit for bit
    assert math.isfinite(recs[-1]["loss"])


FAKE_TRAINER = """\
#!{python}
# Stands in for "python -m torch.distributed.run ...": no torch, so the wait for the time
# limit costs nothing. Counts SIGUSR1s for 3 s after the first, as the trainer would see them.
import os, signal, sys, time
out = open(os.environ["RUN_DIR"] + ".fake." + os.environ["SLURM_NODEID"], "a")
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
if restart != "0":
    print(f"restart {{restart}}: nothing left to do", file=out, flush=True)
    sys.exit(0)
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(time.monotonic()))
print("waiting for SIGUSR1", file=out, flush=True)
deadline = time.monotonic() + 90
while (not got or time.monotonic() < got[0] + 3) and time.monotonic() < deadline:
    time.sleep(0.1)
print(f"SIGUSR1 x{{len(got)}}", file=out, flush=True)
"""


def test_time_limit_signal_reaches_each_process_once_and_requeues(cluster, tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_TRAINER.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    run_dir = tmp_path / "timelimit"
    # Warn 60 s before a 1-minute limit: due at once, sent at slurmctld's next time-limit
    # check (every 30 s).
    job = submit(cluster, run_dir, sbatch_args=["--time=1", "--signal=B:USR1@60"],
                 env={"PYTHON": str(fake), "MASTER_PORT": str(free_port())})
    info = finished(cluster, job, run_dir, timeout_s=150)
    assert int(info["Restarts"]) >= 1, info
    assert "SIGUSR1 (time limit near)" in info["log"] and f"requeueing job {job}" in info["log"]
    for node in ("0", "1"):
        lines = Path(f"{run_dir}.fake.{node}").read_text().splitlines()
        assert lines[:2] == ["waiting for SIGUSR1", "SIGUSR1 x1"], (node, lines)
        assert lines[2].endswith("nothing left to do"), (node, lines)


def test_missing_slurm_is_reported_with_the_fix(monkeypatch):
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(SlurmUnavailable, match="needs root: apt-get install slurmctld slurmd slurm-client munge"):
        ensure_slurm()
