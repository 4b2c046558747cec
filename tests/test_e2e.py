"""End to end through the user's entry points: the demo (chunkflow/demo.py) and torchrun scripts/finetune.py."""

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


def test_demo_trains_chunkflow_and_matches_megatron_side_by_side(tmp_path):
    """The README's first command (chunkflow/demo.py, self-launched on 2 processes): the
    tiny default trains ChunkFlow, its first batches replay under megatron's schedule with
    the same losses, and the side by side and the timeline picture are written."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "chunkflow.demo", "--config", str(CONFIG), "--compare-steps", "5",
           "train.steps=30", f"train.output_dir={out}"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(r["schedule"] == "chunkflow" for r in rows)  # the default is the product
    for key in ("loss", "grad_norm", "lr", "tokens", "tokens_per_s", "tflops_per_s",
                "peak_mem_bytes", "bubble_fraction"):
        assert all(r[key] is not None for r in rows), key
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoint_step30" / "trainer.json").is_file()

    meg = [json.loads(line) for line in (out / "megatron" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in meg] == [1, 2, 3, 4, 5] and all(r["schedule"] == "megatron" for r in meg)
    for a, b in zip(rows, meg):  # same batches, weights and LR schedule: the same losses
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert 0.0 <= a["bubble_fraction"] < 1.0
    text = proc.stdout
    assert "done: 30 steps" in text and "the same 5 global batches (steps 1-5)" in text, text
    for row in ("tokens/s", "peak activation memory", "bubble", "loss"):
        assert f"\n  {row}" in text, row
    assert "agrees to" in text and "DIFFERS" not in text
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG" and f"{out / 'timeline.png'}" in text
    for name in ("chunkflow", "megatron"):  # both stages' measured spans of step 5
        stages = json.loads((out / f"timeline_{name}.json").read_text())["stages"]
        assert len(stages) == 2 and all(stages), name
        fwd = sorted(iv["mb"] for iv in stages[0] if iv["kind"] == "forward")
        bwd = sorted(iv["mb"] for iv in stages[0] if iv["kind"] == "backward")
        assert fwd == bwd == list(range(len(bwd))), (name, fwd, bwd)


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
    meg = finetune(tmp_path / "meg", *common, "train.schedule=megatron")
    cf = finetune(tmp_path / "cf", *common)  # tiny_cpu.yaml's schedule
    for a, b in zip(meg, cf):
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * a["loss"], (a["step"], a["loss"], b["loss"])
    assert all(r["schedule"] == "chunkflow" for r in cf)
