"""The checks that run chunkflow itself: gradient equivalence and short training runs.

Every run here reads a JSONL file written by :func:`write_check_data`, so each global
batch holds exactly the lengths asked for: one sample of ``max_seq_len`` (split into
``max_seq_len / chunk_size`` dependent chunks, more than K of them, so the recompute
path runs) and short samples of odd lengths that are packed together::

    GPU default, max_seq_len 32768, C = 8192, K = 2:
      32768 -> 4 dependent chunks (chunks 0-1 forward without graphs, recomputed)
      12289 -> 2 dependent chunks;  5462 2047 781 129 33 -> packed standalone chunks

Nothing here picks a device: runs take the :class:`ParallelContext` the caller built.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from chunkflow.config.loader import load_config
from chunkflow.config.schema import Config
from chunkflow.parallel.distributed import ParallelContext

__all__ = ["batch_lengths", "write_check_data", "model_overrides", "run_config", "read_metrics",
           "summarize_metrics", "run_verify", "run_training", "compare_losses", "sync"]

QWEN7B_WIDTH = {  # Qwen2.5-7B, all but the depth
    "model.hidden_size": 3584, "model.ffn_hidden_size": 18944, "model.num_attention_heads": 28,
    "model.num_query_groups": 4, "model.vocab_size": 152064, "model.rope_base": 1000000.0,
    "model.qkv_bias": True, "model.tie_embeddings": False, "model.norm_epsilon": 1e-6,
}
TINY = {
    "model.hidden_size": 128, "model.ffn_hidden_size": 344, "model.num_attention_heads": 4,
    "model.num_query_groups": 2, "model.vocab_size": 512, "model.qkv_bias": True,
}


def sync(device: torch.device) -> None:
    """Wait for queued device work (GPU work is asynchronous; host timers need this)."""
    if device.type == "cuda":  # pragma: no cover - GPU only
        torch.cuda.synchronize(device)


def batch_lengths(max_seq_len: int, chunk_size: int) -> list[int]:
    """One global batch: a sample of max_seq_len, one of ~1.5 chunks, short odd ones."""
    mid = chunk_size + chunk_size // 2 + 1
    shorts = [max_seq_len // 6 + 1, max_seq_len // 16 - 1, max_seq_len // 42 + 1, 129, 33]
    return [max_seq_len] + [n for n in [mid] + shorts if 1 <= n <= max_seq_len]


def write_check_data(path: Path, lengths: list[int], *, num_batches: int, vocab_size: int,
                     seed: int = 0) -> None:
    """``num_batches`` repetitions of ``lengths`` (random ids >= 4), one sample a line."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(num_batches):
            for n in lengths:  # n positions = n + 1 raw tokens
                ids = rng.integers(4, vocab_size, size=n + 1)
                f.write(json.dumps({"input_ids": ids.tolist()}) + "\n")


def model_overrides(width: str, layers: int, dtype: str) -> list[str]:
    shape = QWEN7B_WIDTH if width == "qwen7b" else TINY
    return [f"{k}={v}" for k, v in shape.items()] + [f"model.num_layers={layers}", f"model.dtype={dtype}"]


def run_config(workdir: Path, name: str, *, width: str, layers: int, dtype: str, seq_len: int,
               chunk_size: int, k: int, steps: int, extra: tuple[str, ...] = ()) -> Config:
    """A single-layout run on check data written to ``workdir/<name>.jsonl``."""
    lengths = batch_lengths(seq_len, chunk_size)
    vocab = (QWEN7B_WIDTH if width == "qwen7b" else TINY)["model.vocab_size"]
    data = workdir / f"data_{seq_len}_{chunk_size}.jsonl"
    if not data.exists():
        write_check_data(data, lengths, num_batches=steps + 2, vocab_size=vocab)
    overrides = model_overrides(width, layers, dtype) + [
        "parallel.tensor=1", "parallel.pipeline=1", "parallel.backend=auto",
        f"data.path={data}", f"data.max_seq_len={seq_len}", f"data.global_batch_size={len(lengths)}",
        "data.shuffle=false", f"chunkflow.chunk_size={chunk_size}", f"chunkflow.k={k}",
        f"train.steps={steps}", f"train.output_dir={workdir / name}", "train.lr=1e-5",
        "train.min_lr=1e-6", "train.warmup_steps=1", "train.save_at_end=false", "train.log_every=1",
        "train.schedule=chunkflow",
    ] + list(extra)
    return load_config(None, overrides)


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_metrics(records: list[dict], *, world_size: int, peak_tflops: Optional[float]) -> dict:
    """Per-GPU throughput, MFU and peak memory; the first step (warm-up) is left out.

    Uses the per-GPU keys of metrics.jsonl when present (``tokens_per_s_per_gpu``,
    ``tflops_per_s_per_gpu``, ``mfu``, ``peak_mem_allocated_bytes``), else derives them
    from the whole-run keys; ``source`` says which.
    """
    timed = records[1:] if len(records) > 1 else records
    per_gpu = all("tokens_per_s_per_gpu" in r for r in timed)

    def med(key: str, scale: float = 1.0) -> Optional[float]:
        vals = [r[key] * scale for r in timed if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    if per_gpu:
        tok, tfl = med("tokens_per_s_per_gpu"), med("tflops_per_s_per_gpu")
    else:
        tok, tfl = med("tokens_per_s", 1.0 / world_size), med("tflops_per_s", 1.0 / world_size)
    mfu = med("mfu") if all("mfu" in r for r in timed) else None
    if mfu is None and tfl is not None and peak_tflops:
        mfu = tfl / peak_tflops
    peak_key = "peak_mem_allocated_bytes" if all("peak_mem_allocated_bytes" in r for r in records) else "peak_mem_bytes"
    peaks = [r[peak_key] for r in records if r.get(peak_key) is not None]
    return {
        "steps": [r["step"] for r in records],
        "losses": [r["loss"] for r in records],
        "step_time_s": med("step_time_s"),
        "tokens_per_s_per_gpu": tok,
        "tflops_per_s_per_gpu": tfl,
        "mfu": mfu,
        "peak_mem_bytes": max(peaks) if peaks else None,
        "source": ("metrics.jsonl per-GPU keys" if per_gpu else "metrics.jsonl totals / world size")
                  + f"; peak from {peak_key}; FLOPs: model FLOPs, causal attention halved (Megatron)",
    }


def describe_throughput(s: dict) -> str:
    parts = []
    if s.get("tokens_per_s_per_gpu") is not None:
        parts.append(f"{s['tokens_per_s_per_gpu']:,.0f} tok/s/GPU")
    if s.get("tflops_per_s_per_gpu") is not None:
        parts.append(f"{s['tflops_per_s_per_gpu']:.3g} TFLOP/s/GPU")
    parts.append(f"MFU {100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "MFU n/a")
    if s.get("peak_mem_bytes") is not None:
        parts.append(f"peak {s['peak_mem_bytes'] / 2**30:.1f} GiB")
    return ", ".join(parts)


def compare_losses(a: list[dict], b: list[dict]) -> tuple[float, list[str]]:
    """Largest relative loss difference over the steps both have, and any mismatch."""
    by_step = {r["step"]: r for r in a}
    worst, problems = 0.0, []
    for r in b:
        ref = by_step.get(r["step"])
        if ref is None:
            problems.append(f"step {r['step']} missing from the reference run")
            continue
        if ref["tokens"] != r["tokens"]:
            problems.append(f"step {r['step']}: {r['tokens']} tokens vs {ref['tokens']} (different data)")
        rel = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
        worst = max(worst, rel if math.isfinite(rel) else math.inf)
    return worst, problems


def reseed(seed: int) -> None:
    """Seed as ``init_distributed`` does, so every run in this process starts from the
    same weights as a fresh process would (runs here share one process)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def run_verify(cfg: Config, ctx: ParallelContext) -> dict[str, Any]:
    from chunkflow.verify import verify_equivalence

    reseed(cfg.train.seed)
    sync(ctx.device)
    t0 = time.perf_counter()
    r = verify_equivalence(cfg, ctx)
    sync(ctx.device)
    return {"ok": bool(r.ok), "max_rel_grad_diff": r.max_rel_grad_diff, "worst_param": r.worst_param,
            "loss_megatron": r.loss_megatron, "loss_chunkflow": r.loss_chunkflow,
            "tolerance": r.tolerance, "num_tokens": r.num_tokens, "num_chunks": r.num_chunks,
            "num_dependent_chunks": r.num_dependent_chunks, "seconds": time.perf_counter() - t0}


def run_training(cfg: Config, ctx: ParallelContext) -> dict[str, Any]:
    """Train ``cfg`` in this process; return the summary, the metrics and the log lines."""
    from chunkflow.train.trainer import Trainer

    lines: list[str] = []
    reseed(cfg.train.seed)
    if ctx.device.type == "cuda":  # pragma: no cover - GPU only
        torch.cuda.reset_peak_memory_stats(ctx.device)
    sync(ctx.device)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ctx, log=lambda *a, **_: lines.append(" ".join(str(x) for x in a)))
    t_built = time.perf_counter()
    summary = trainer.train()
    sync(ctx.device)
    t_end = time.perf_counter()
    del trainer
    return {"summary": summary, "records": read_metrics(Path(cfg.train.output_dir)), "log": lines[-20:],
            "build_s": t_built - t0, "train_s": t_end - t_built}


def with_overrides(cfg: Config, **sections: dict) -> Config:
    """``cfg`` with fields of its sections replaced, e.g. ``train={"schedule": "megatron"}``."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})
