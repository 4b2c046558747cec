"""Bounded failure (issue 14): a rank that raises or is stopped ends the whole job
within ``parallel.timeout_s`` plus a margin, through the quiet launcher
(``python -m chunkflow.parallel.launch``, torchrun's arguments), with the failure
named once. Also: a user error under the launcher exits 2 with its one line only.

A few torchrun launches in all (each costs 10-60 s on the shared 2-core machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chunkflow.parallel.spawn import free_port

pytestmark = [pytest.mark.megatron, pytest.mark.slow, pytest.mark.once]

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20
SMALL = ["data.max_seq_len=256", "chunkflow.chunk_size=64", "train.steps=6", "data.synthetic.num_samples=64",
         f"parallel.timeout_s={TIMEOUT_S}", "train.save_at_end=false",
         "train.schedule=megatron"]  # failure handling does not depend on the schedule: the one measured


def launch(script: Path, out: Path, *overrides: str, fail: str = "") -> tuple[int, str, str, float]:
    cmd = [sys.executable, "-m", "chunkflow.parallel.launch", "--nproc-per-node=2",
           f"--master-port={free_port()}", str(script), "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
           f"train.output_dir={out}", *SMALL, *overrides]
    env = dict(os.environ, PYTHONWARNINGS="ignore", CHUNKFLOW_TEST_FAIL=fail)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


def _started_at(stdout: str) -> bool:
    return "step     2/6" in stdout  # the failure came mid-run, after two good steps


def test_user_error_under_the_launcher_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2\n')
    code, out, err, _ = launch(ROOT / "scripts" / "finetune.py", tmp_path / "run", f"data.path={bad}")
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:2: malformed JSON"), err
    assert out == ""


def test_exception_on_one_rank_ends_the_job_once(tmp_path):
    code, out, err, _ = launch(ROOT / "tests" / "_failing_finetune.py", tmp_path / "run", fail="raise:1:3")
    assert code == 1 and _started_at(out), (out, err)
    assert err.count("injected failure on rank 1 at step 3") == 2  # the traceback's last line and ours
    assert err.count("internal error on rank 1") == 1
    assert "lost contact" not in err  # the peer that saw it second stays silent


@pytest.mark.parametrize("layout", [["parallel.pipeline=2"], ["parallel.pipeline=1"]], ids=["pp2", "dp2"])
def test_stopped_rank_ends_the_job_within_the_timeout(tmp_path, layout):
    code, out, err, elapsed = launch(ROOT / "tests" / "_failing_finetune.py", tmp_path / "run", *layout,
                                     fail="stop:1:3")
    assert code == 1 and _started_at(out), (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rank 0: lost contact with the other ranks"), err
    assert f"{TIMEOUT_S * 1000}ms" in lines[0]  # gloo's own timeout fired, not a kill from outside


def test_spawned_ranks_die_with_the_process_that_started_them(tmp_path):
    """An interrupted test run (its pytest killed) leaves no rank behind waiting on a peer."""
    import os
    import signal
    import time

    code = ("import sys; sys.path.insert(0, 'tests')\n"
            "from _workers import write_pid_and_wait\n"
            "from chunkflow.parallel.spawn import run_distributed\n"
            f"run_distributed(write_pid_and_wait, 2, ({str(tmp_path)!r},), timeout_s=900)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.iterdir() if p.read_text()]
        assert len(pids) == 2, "ranks did not start"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in pids if os.path.exists(f"/proc/{p}") and
             open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived their parent"
