"""Launchers only read the environment: SLURM script and rank discovery."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from chunkflow.parallel.distributed import env_world

ROOT = Path(__file__).resolve().parents[1]


def test_sbatch_runs_one_torchrun_per_node_with_c10d_rendezvous(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\necho "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\nprintf "node07\\nnode08\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[07-08]",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8", PYTHON="python",
               MASTER_PORT="29500")
    out = subprocess.run(["bash", str(ROOT / "scripts/slurm/finetune.sbatch"), "configs/qwen7b_32k.yaml",
                          "train.steps=5"], env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--nnodes 2" in out and "--nproc-per-node 8" in out
    assert "--rdzv-backend c10d" in out and "--rdzv-endpoint node07:29500" in out
    # resumable: a run directory keyed by the job id (stable across requeues), load=auto;
    # the user's overrides come last and win
    assert out.rstrip().endswith("scripts/finetune.py --config configs/qwen7b_32k.yaml train.load=auto "
                                 "train.output_dir=runs/chunkflow-4242 train.steps=5")


def test_rank_from_torchrun_then_slurm(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert env_world() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert env_world() == (5, 16, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert env_world() == (3, 8, 3)  # torchrun's variables win
