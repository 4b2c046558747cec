"""End to end through the user's entry point: torchrun scripts/finetune.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chunkflow.parallel.spawn import free_port

pytestmark = [pytest.mark.megatron, pytest.mark.slow, pytest.mark.once]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"


def finetune(out: Path, *overrides: str, nproc: int = 2, timeout: int = 600) -> list[dict]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", str(ROOT / "scripts" / "finetune.py"),
        "--config", str(CONFIG), f"train.output_dir={out}", *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "done:" in proc.stdout and "outputs:" in proc.stdout, proc.stdout
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_default_trains_and_loss_falls(tmp_path):
    rows = finetune(tmp_path / "run", "train.steps=30")
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("loss", "grad_norm", "lr", "tokens", "tokens_per_s", "tflops_per_s",
                "peak_mem_bytes", "bubble_fraction"):
        assert all(r[key] is not None for r in rows), key
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "checkpoint_step30" / "trainer.json").is_file()


def test_resume_continues_exactly(tmp_path):
    full = finetune(tmp_path / "full", "train.steps=6", "train.save_every=3", "train.save_at_end=false")
    resumed = finetune(
        tmp_path / "resumed", "train.steps=6",
        f"train.load={tmp_path / 'full' / 'checkpoint_step3'}", "train.save_at_end=false",
    )
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        assert a["tokens"] == b["tokens"]  # same data
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (a["loss"], b["loss"])
        assert abs(a["lr"] - b["lr"]) < 1e-12


def test_chunkflow_pp1_matches_megatron_curve(tmp_path):
    common = ("train.steps=8", "parallel.pipeline=1", "chunkflow.chunk_size=128", "train.save_at_end=false")
    meg = finetune(tmp_path / "meg", *common)
    cf = finetune(tmp_path / "cf", *common, "train.schedule=chunkflow")
    for a, b in zip(meg, cf):
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * a["loss"], (a["step"], a["loss"], b["loss"])
    assert all(r["schedule"] == "chunkflow" for r in cf)


def test_chunkflow_pipeline_trains_like_megatron(tmp_path):
    common = ("train.steps=6", "chunkflow.chunk_size=128", "chunkflow.k=2", "train.save_at_end=false")
    meg = finetune(tmp_path / "meg", *common)
    cf = finetune(tmp_path / "cf", *common, "train.schedule=chunkflow")
    for a, b in zip(meg, cf):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert 0.0 <= b["bubble_fraction"] < 1.0
