"""The flagship recipe rehearsed on CPU: `configs/qwen7b_32k.yaml` with its own layout.

Only width, length, dtype and backend change on the command line (plus a short run:
steps, batch size and data set size), so everything the 8-GPU recipe switches on runs
here on 8 gloo processes: tensor 2 x pipeline 2 x data 2, sequence parallel, the
distributed optimizer, ChunkFlow with the config's K (C scaled with the length: 32K / 8K
-> 512 / 128), a checkpoint mid-run, and a resume from it that must reproduce the
uninterrupted run's later losses exactly. The Megatron schedule gets the same treatment.
"""

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
CONFIG = ROOT / "configs" / "qwen7b_32k.yaml"
SHRINK = [
    # width (28 heads x 4 dims, 4 KV groups, as the config's 28 / 4)
    "model.hidden_size=112", "model.ffn_hidden_size=224", "model.vocab_size=512",
    # length: 32K -> 512, C: 8K -> 128 (K stays the config's 2)
    "data.max_seq_len=512", "chunkflow.chunk_size=128",
    # dtype and backend of this machine
    "model.dtype=fp32", "parallel.backend=gloo",
    # a short run
    "train.steps=4", "train.save_every=2", "train.warmup_steps=1", "train.save_at_end=false",
    "data.global_batch_size=8", "data.synthetic.num_samples=64", "train.lr=1e-3",
]


def finetune(out: Path, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=8",
           f"--master-port={free_port()}", str(ROOT / "scripts" / "finetune.py"),
           "--config", str(CONFIG), *SHRINK, f"train.output_dir={out}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["chunkflow", "megatron"])
def test_flagship_layout_trains_saves_and_resumes_exactly(tmp_path, schedule):
    full = finetune(tmp_path / "full", f"train.schedule={schedule}")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert all(r["world_size"] == 8 for r in full)
    ckpt = tmp_path / "full" / "checkpoint_step2"
    assert (ckpt / "trainer.json").is_file()
    resumed = finetune(tmp_path / "resumed", f"train.schedule={schedule}", f"train.load={ckpt}")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])  # bit for bit
        assert a["grad_norm"] == b["grad_norm"]
