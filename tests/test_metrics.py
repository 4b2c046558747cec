"""FLOP formula, MFU, the device-peak table, the peak-memory reader and the trainer's record."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chunkflow.config import ConfigError, load_config
from chunkflow.data.assignment import CostModel, estimate_cost
from chunkflow.data.chunking import build_chunks
from chunkflow.data.flops import causal_pairs, forward_flops, matmul_params, step_pairs, training_flops
from chunkflow.parallel.spawn import run_distributed
from chunkflow.train.metrics import (PeakMemory, device_peak_tflops, mfu, resolve_peak_tflops, step_flops,
                                     throughput_metrics)

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=160",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=256",
    "data.max_seq_len=512", "chunkflow.chunk_size=64",
]


# ---------------------------------------------------------------------------- FLOPs
def test_flops_by_hand():
    m = SimpleNamespace(num_layers=1, hidden_size=4, ffn_hidden_size=8, num_attention_heads=2,
                        num_query_groups=1, vocab_size=10)
    # q 4*4, k and v 2 * 4*2, o 4*4, SwiGLU 3*4*8, LM head 4*10
    assert matmul_params(m) == 16 + 16 + 16 + 96 + 40
    assert matmul_params(m, output_layer=False) == 144
    assert causal_pairs(3) == 6 and causal_pairs(2, prefix=3) == 2 * 3 + 3
    assert forward_flops(m, num_tokens=3, num_pairs=6) == 2 * 3 * 184 + 4 * 1 * 4 * 6
    assert training_flops(m, num_tokens=3, num_pairs=6) == 3 * 1200
    assert step_pairs(num_tokens=3 + 5, sum_sq_seqlens=9 + 25) == causal_pairs(3) + causal_pairs(5)


def test_qwen25_7b_matches_design_figures():
    """docs/metrics.md: 6N = 42.4 GFLOP/token (N = 7.07B), causal attention ~19.7 GFLOP/token
    at 32K and ~158 at 256K, Megatron's convention (torchtitan's would be twice that)."""
    m = load_config(str(ROOT / "configs" / "qwen7b_32k.yaml"), []).model
    n = matmul_params(m)
    assert round(n / 1e9, 2) == 7.07
    assert round(6 * n / 1e9, 1) == 42.4
    for length, gflop in ((32 * 1024, 19.7), (256 * 1024, 158.0)):
        total = step_flops(m, num_tokens=length, sum_sq_seqlens=length**2)
        attention_per_token = total / length - 6 * n
        assert attention_per_token / 1e9 == pytest.approx(gflop, abs=0.05 if gflop < 100 else 0.5)


def test_chunked_and_whole_sample_count_the_same_flops():
    from chunkflow.data.types import Sample
    import numpy as np

    m = load_config(None, TINY).model
    n = 300
    ids = np.arange(n, dtype=np.int64)
    chunks = build_chunks([Sample(0, ids, ids, np.ones(n, np.float32))], chunk_size=64)
    pairs = sum(causal_pairs(len(r), int(r.position_ids[0])) for r in chunks)
    assert pairs == causal_pairs(n)
    whole = step_flops(m, num_tokens=n, sum_sq_seqlens=n * n)
    assert sum(training_flops(m, num_tokens=len(r), num_pairs=causal_pairs(len(r), int(r.position_ids[0])))
               for r in chunks) == pytest.approx(whole, rel=1e-12)
    # The data-parallel cost model is the same formula in units of one token's linear work.
    cost = CostModel.from_model_config(m)
    for r in chunks:
        p = causal_pairs(len(r), int(r.position_ids[0]))
        want = forward_flops(m, num_tokens=len(r), num_pairs=p) / (2.0 * matmul_params(m))
        assert estimate_cost(r, cost_model=cost) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------- MFU
@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0),
    ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0), ("NVIDIA A10G", None),
    ("NVIDIA GeForce RTX 4090", None), ("AMD Instinct MI300X", 1307.0),
])
def test_device_peak_table(name, peak):
    assert device_peak_tflops(name) == peak


def test_mfu_and_peak_resolution():
    assert mfu(494.5, 989.0) == pytest.approx(0.5)
    assert mfu(1.0, None) is None and mfu(1.0, 0.0) is None
    cpu = torch.device("cpu")
    assert resolve_peak_tflops(0.0, cpu)[0] is None  # CPU: no peak unless configured
    assert resolve_peak_tflops(123.0, cpu) == (123.0, "train.peak_tflops")
    assert load_config(None, ["train.peak_tflops=400"]).train.peak_tflops == 400.0
    with pytest.raises(ConfigError, match="peak_tflops"):
        load_config(None, ["train.peak_tflops=-1"])


def _stats(pp, busy, wall, step, alloc, reserved):
    return dict(pp_rank=pp, busy_s=busy, wall_s=wall, step_time_s=step, peak_mem_allocated_bytes=alloc,
                peak_mem_reserved_bytes=reserved)


def test_throughput_metrics_from_rank_stats():
    stats = [_stats(0, 1.0, 2.0, 3.0, 10, 20), _stats(1, 1.5, 2.0, 4.0, 30, 25),
             _stats(0, 2.0, 2.0, 3.5, 5, 40), _stats(1, 0.5, 2.0, 3.9, 7, 8)]
    out = throughput_metrics(stats, num_tokens=8000, flops=8e12, num_stages=2, peak_tflops=0.5)
    assert out["step_time_s"] == 4.0 and out["world_size"] == 4
    assert out["tokens_per_s"] == 2000.0 and out["tokens_per_s_per_gpu"] == 500.0
    assert out["tflops_per_s"] == 2.0 and out["tflops_per_s_per_gpu"] == 0.5
    assert out["mfu"] == pytest.approx(1.0)
    assert out["peak_mem_allocated_bytes"] == out["peak_mem_bytes"] == 30
    assert out["peak_mem_reserved_bytes"] == 40
    assert out["stage_busy_fraction"] == [0.75, 0.5]
    assert out["bubble_fraction"] == pytest.approx(1 - 0.625) and out["busy_fraction_max"] == 1.0
    # A timing bug (busy > wall) shows: the bubble is reported unclamped.
    bad = throughput_metrics([_stats(0, 3.0, 2.0, 3.0, 1, 1)], num_tokens=1, flops=1.0, num_stages=1,
                             peak_tflops=None)
    assert bad["bubble_fraction"] == pytest.approx(-0.5) and bad["busy_fraction_max"] == 1.5
    assert bad["mfu"] is None


def test_peak_memory_reader_on_cpu():
    mem = PeakMemory(torch.device("cpu"))
    mem.reset(trim=True)
    block = torch.ones(16 * 2**20, dtype=torch.float32)  # 64 MiB, touched
    grown = mem.peak_allocated() - mem.before
    assert mem.peak_reserved() == mem.peak_allocated()
    del block
    if not mem.resettable:
        pytest.skip("ru_maxrss: the process peak cannot be reset here")
    assert grown >= 48 * 2**20, grown
    mem.reset(trim=True)
    assert mem.peak_allocated() - mem.before < 48 * 2**20  # the freed block is not this region's


# ---------------------------------------------------------------------------- trainer
def _train(rank: int, world: int, out: str) -> list:
    """Two trainers in one spawn (chunkflow without a peak, megatron with one), 2 steps each."""
    from chunkflow.config import load_config
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.trainer import Trainer

    common = TINY + ["parallel.pipeline=2", "data.global_batch_size=4", "data.synthetic.num_samples=32",
                     "train.steps=2", "train.save_at_end=false", "chunkflow.k=2"]
    runs = [("chunkflow", 0.0), ("megatron", 0.002)]
    cfg = load_config(None, common + [f"train.output_dir={out}/a"])
    ctx = init_distributed(cfg)
    records = []
    for i, (schedule, peak) in enumerate(runs):
        cfg = load_config(None, common + [f"train.output_dir={out}/{i}", f"train.schedule={schedule}",
                                          f"train.peak_tflops={peak}"])
        trainer = Trainer(cfg, ctx, log=lambda *a, **k: None)
        records.append([trainer.train_step() for _ in range(cfg.train.steps)])
    return records


@pytest.mark.megatron
def test_trainer_record_has_per_gpu_figures(tmp_path):
    import json

    per_rank = run_distributed(_train, 2, (str(tmp_path),), timeout_s=600)
    for i, peak in enumerate((0.0, 0.002)):
        written = [json.loads(line) for line in (tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()]
        assert written == per_rank[1][i]  # the logging rank (last stage) writes what it returns
        for rank_records in per_rank:  # every rank computes the same figures from the same gather
            assert [r["step_time_s"] for r in rank_records[i]] == [r["step_time_s"] for r in written]
        for r in written:
            assert r["world_size"] == 2 and r["step_time_s"] > 0
            assert r["tokens_per_s_per_gpu"] * 2 == pytest.approx(r["tokens_per_s"], rel=1e-12)
            assert r["tflops_per_s_per_gpu"] * 2 == pytest.approx(r["tflops_per_s"], rel=1e-12)
            assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"], rel=1e-12)
            if peak:
                assert r["mfu"] == pytest.approx(r["tflops_per_s_per_gpu"] / peak, rel=1e-12)
            else:
                assert r["mfu"] is None  # CPU, no train.peak_tflops
            assert r["peak_mem_bytes"] == r["peak_mem_allocated_bytes"] > 50 * 2**20  # torch alone
            assert r["peak_mem_reserved_bytes"] >= r["peak_mem_allocated_bytes"]
            # busy <= wall on every rank (SpanTimer spans never overlap), so no clamp is needed
            assert len(r["stage_busy_fraction"]) == 2
            assert all(0.0 < b <= 1.0 + 1e-9 for b in r["stage_busy_fraction"]), r["stage_busy_fraction"]
            assert 0.0 < r["busy_fraction_max"] <= 1.0 + 1e-9
            assert r["bubble_fraction"] == pytest.approx(1 - sum(r["stage_busy_fraction"]) / 2, abs=1e-12)
            assert r["bubble_fraction"] >= -1e-9
