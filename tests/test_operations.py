"""Operations that lose nothing (issue 14): pre-emption by signal and auto-resume,
non-finite values, resuming a finished run, metrics without repeated steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _workers import TINY
from chunkflow.parallel.spawn import free_port, run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.slow, pytest.mark.once]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
RUN = ["train.steps=20", "train.save_at_end=false", "data.global_batch_size=8", "train.warmup_steps=1",
       "train.schedule=megatron"]  # tiny_cpu.yaml trains chunkflow; pre-emption is schedule-neutral


def _launch(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(ROOT / "scripts" / "finetune.py"), "--config", str(CONFIG), *RUN,
           f"train.output_dir={out}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _workers_of(proc: subprocess.Popen) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(proc.pid).children(recursive=True)
            if "finetune.py" in " ".join(c.cmdline())]


def test_sigterm_saves_and_auto_resume_is_bit_exact(tmp_path):
    full_proc = _launch(tmp_path / "full")
    full_out, full_err = full_proc.communicate(timeout=900)
    assert full_proc.returncode == 0, full_err[-3000:]
    full = _metrics(tmp_path / "full")

    out = tmp_path / "preempted"
    proc = _launch(out, "train.load=auto")  # nothing there yet: starts fresh
    deadline = time.time() + 600
    while time.time() < deadline and len(_metrics(out)) < 2:
        time.sleep(0.1)
    assert len(_metrics(out)) >= 2, "the run did not reach step 2"
    for pid in _workers_of(proc):  # as SLURM's trap does: the training processes get it
        os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "starting fresh" in stdout
    stopped = _metrics(out)[-1]["step"]
    assert 2 <= stopped < 20, stopped
    assert f"pre-empted at step {stopped}: saved" in stdout
    assert (out / f"checkpoint_step{stopped}" / "trainer.json").is_file()

    resumed = _launch(out, "train.load=auto")
    stdout, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resuming from {out / f'checkpoint_step{stopped}'}" in stdout
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 21))  # no step twice, none missing
    for a, b in zip(full, rows):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a["step"], a["loss"], b["loss"])

    again = _launch(out, f"train.load={out / f'checkpoint_step{stopped}'}", f"train.steps={stopped}")
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-3000:]
    assert "nothing to train" in stdout and "already at step" in stdout


def nonfinite_worker(rank: int, world: int, out: str, mode: str) -> dict:
    from chunkflow.config import load_config
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.trainer import NonFiniteError, Trainer

    cfg = load_config(None, list(TINY) + [
        "train.schedule=chunkflow", "train.steps=12", "train.save_every=1", "train.save_at_end=false",
        "data.global_batch_size=4", f"train.nonfinite={mode}", "train.max_skipped=3",
        f"train.output_dir={out}"])
    ctx = init_distributed(cfg)
    trainer = Trainer(cfg, ctx, log=lambda *a, **k: None)
    run, calls = trainer.schedule.run, [0]

    def poisoned(rows):  # from step 3 on, one gradient element is NaN (as after an overflow)
        result = run(rows)
        calls[0] += 1
        if calls[0] >= 3:
            trainer.model.buffers[0].grad_data[0] = float("nan")
        return result

    trainer.schedule.run = poisoned
    try:
        trainer.train()
        return {"error": None}
    except NonFiniteError as e:
        return {"error": str(e), "step": trainer.step, "skipped": trainer.skipped_total}


@pytest.mark.parametrize("mode", ["abort", "skip"])
def test_nonfinite_loss_stops_before_saving_it(tmp_path, mode):
    from chunkflow.train.checkpoint import latest_checkpoint, read_trainer_state

    out = tmp_path / mode
    r = run_distributed(nonfinite_worker, 1, (str(out), mode), timeout_s=600)[0]
    assert r["error"] is not None, "a NaN gradient went unnoticed"
    rows = _metrics(out)
    bad = [row for row in rows if row["nonfinite"]]
    if mode == "abort":
        assert "NaN/inf" in r["error"] and "step 3:" in r["error"] and r["step"] == 2
        assert not bad  # the failing step never reached the metrics
    else:
        assert "in a row" in r["error"] and r["skipped"] == 3 and r["step"] == 4
        assert len(bad) == 2 and all(not row["update_ok"] for row in bad)  # the third raised
    latest = latest_checkpoint(out)
    assert latest is not None and int(read_trainer_state(latest)["step"]) == r["step"]
    for row in rows:  # every saved step's loss was finite
        assert row["nonfinite"] or row["loss"] == row["loss"]


def test_metrics_writer_drops_steps_after_the_resume_point(tmp_path):
    from chunkflow.train.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, True)
    for step in range(1, 6):
        w.write({"step": step})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a torn line of a killed run
    w = MetricsWriter(tmp_path, True, resume_step=3)
    w.write({"step": 4})
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]
