"""Resume reproduces the uninterrupted run: distributed-optimizer state and random state.

One spawn of 2 ranks (DP=2) runs, through the Trainer, each of:
  * distributed optimizer: train N steps saving at step k; resume from step k; the
    resumed losses equal the uninterrupted ones exactly (fp32, same reduction order);
  * LoRA with dropout 0.1: the same, plus a control resumed from a copy of the
    checkpoint without ``rng/`` (so the random state is not restored), whose losses must
    differ: a checkpoint that forgot the RNG would fail the first comparison.
A second spawn (4 ranks, TP=2 x DP=2) repeats the distributed-optimizer check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chunkflow.parallel.spawn import run_distributed
from chunkflow.train.checkpoint_files import write_manifest

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT = 4, 2
TINY = [
    "parallel.pipeline=1", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=160",
    "model.vocab_size=256", "data.max_seq_len=256", "data.global_batch_size=4",
    "data.synthetic.num_samples=64", f"train.steps={STEPS}", f"train.save_every={SAVE_AT}",
    "train.save_at_end=false", "train.warmup_steps=1", "train.schedule=megatron",
]


def _train(overrides: list[str], out: Path, load: str = "") -> tuple[list[float], dict]:
    """A fresh process group state, seeds and Trainer, as a new torchrun would have."""
    import torch.distributed as dist

    from chunkflow.config import load_config
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml",
                      TINY + overrides + [f"train.output_dir={out}", f"train.load={load}"])
    ctx = init_distributed(cfg)
    trainer = Trainer(cfg, ctx, log=lambda *_: None)
    trainer.train()
    dist.barrier()
    losses = []
    if ctx.is_logging_rank:
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return losses, {"dp_size": ctx.dp_size}


def worker(rank: int, world: int, tmp: str, layout: list[str], with_lora: bool = True) -> dict:
    import torch.distributed as dist

    tmp_path = Path(tmp)
    out: dict = {"strict": getattr(dist.all_reduce, "_chunkflow_strict", False)}
    opt = layout + ["train.distributed_optimizer=true"]
    full, info = _train(opt, tmp_path / "opt_full")
    ckpt = tmp_path / "opt_full" / f"checkpoint_step{SAVE_AT}"
    resumed, _ = _train(opt, tmp_path / "opt_resumed", load=str(ckpt))
    out.update(opt_full=full, opt_resumed=resumed, dp_size=info["dp_size"],
               opt_files=sorted(p.name for p in ckpt.iterdir()))
    if not with_lora:
        return out

    lora = ["lora.enabled=true", "lora.dropout=0.1", "lora.rank=4", "train.lr=1e-2"]
    full, _ = _train(lora, tmp_path / "lora_full")
    ckpt = tmp_path / "lora_full" / f"checkpoint_step{SAVE_AT}"
    resumed, _ = _train(lora, tmp_path / "lora_resumed", load=str(ckpt))
    no_rng = tmp_path / "lora_no_rng"
    if rank == 0:
        shutil.copytree(ckpt, no_rng)
        shutil.rmtree(no_rng / "rng")
        write_manifest(no_rng)  # vouch for the edited copy (loading verifies the manifest)
    dist.barrier()
    control, _ = _train(lora, tmp_path / "lora_control", load=str(no_rng))
    out.update(lora_full=full, lora_resumed=resumed, lora_control=control)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(worker, 2, (str(tmp_path_factory.mktemp("ckpt")), []), timeout_s=600)


def _logged(runs: list[dict]) -> dict:
    (out,) = [r for r in runs if r["opt_full"]]  # the one logging rank
    return out


def test_strict_device_mode_reached_the_ranks(runs):
    assert all(r["strict"] for r in runs)


def test_distributed_optimizer_resume_is_exact(runs):
    out = _logged(runs)
    assert out["dp_size"] == 2
    assert {"model", "rng", "trainer.json"} <= set(out["opt_files"])
    full, resumed = out["opt_full"], out["opt_resumed"]
    assert len(full) == STEPS and len(resumed) == STEPS - SAVE_AT
    assert resumed == full[SAVE_AT:], (full, resumed)  # bit-exact, fp32


def test_dropout_resume_is_exact_and_needs_the_rng(runs):
    out = _logged(runs)
    full, resumed, control = out["lora_full"], out["lora_resumed"], out["lora_control"]
    assert resumed == full[SAVE_AT:], (full, resumed)
    # Without the saved random state the dropout masks differ, and so does every loss.
    assert all(c != f for c, f in zip(control, full[SAVE_AT:])), (full, control)


def test_distributed_optimizer_resume_is_exact_tp2_dp2(tmp_path):
    runs = run_distributed(worker, 4, (str(tmp_path), ["parallel.tensor=2"], False), timeout_s=900)
    out = _logged(runs)
    assert out["dp_size"] == 2
    assert out["opt_resumed"] == out["opt_full"][SAVE_AT:], (out["opt_full"], out["opt_resumed"])
