"""Activation memory of the Megatron path and ChunkFlow as the longest sample grows.

    python scripts/memory_profile.py --config configs/tiny_cpu.yaml --multiples 4,8,16,32

For each multiple m, one global batch holds a sample of m x C tokens (C =
chunkflow.chunk_size) plus a few short ones. Each (schedule, m) runs in its own process
(so peak RSS is that run's) on one rank and reports: bytes saved for backward at peak
(activations; ChunkFlow's K/V-prefix tensors separately), the K/V state store, and the
process's peak memory (RSS on CPU, allocated device memory on GPU; the one reader
chunkflow.train.metrics.PeakMemory). Prints a table and writes JSON next to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def _measure(rank: int, world: int, config: str, overrides: list, schedule: str, m: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    from chunkflow.config import load_config
    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
    from chunkflow.data.types import Sample
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.scheduling.memory import SavedTensorMeter
    from chunkflow.train.metrics import PeakMemory
    from chunkflow.train.build import build_model_and_ddp, build_schedule

    C = load_config(config, overrides).chunkflow.chunk_size
    cfg = load_config(config, list(overrides) + ["parallel.pipeline=1", "parallel.tensor=1",
                                                 f"data.max_seq_len={max(m * C, 1)}",
                                                 f"train.schedule={schedule}"])
    ctx = init_distributed(cfg)
    ddp, _ = build_model_and_ddp(cfg, ctx)
    rng = np.random.default_rng(m)
    samples = []
    for i, n in enumerate([m * C, 40, 17, 9]):
        raw = rng.integers(0, cfg.model.vocab_size, n + 1)
        samples.append(Sample(i, raw[:-1], raw[1:], np.ones(n, dtype=np.float32)))
    if schedule == "megatron":
        plan = plan_megatron_step(samples, dp_size=1, max_seq_len=cfg.data.max_seq_len)
    else:
        plan = plan_chunkflow_step(samples, dp_size=1, chunk_size=C)
    engine = build_schedule(cfg, ddp, ctx)
    memory = PeakMemory(ctx.device)
    memory.reset(trim=True)  # the peak of this run alone, where the platform can reset it
    with SavedTensorMeter(exclude=ddp.module) as meter:
        res = engine.run(plan.rows_per_rank[0])
    peak = memory.peak_allocated()
    return {
        "schedule": schedule, "multiple": m, "longest": m * C, "chunk_size": C, "k": cfg.chunkflow.k,
        "saved_activation_bytes": meter.peak_bytes,
        "saved_kv_prefix_bytes": meter.peak_kv_bytes,
        "kv_state_bytes": int(getattr(res, "extra", {}).get("kv_state_peak_bytes", 0)),
        "peak_rss_bytes": peak, "peak_mem_source": memory.source,
        "rss_growth_bytes": peak - memory.before,
    }


def main(argv: list[str] | None = None) -> int:
    from chunkflow.parallel.spawn import run_distributed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--multiples", default="4,8,16,32")
    p.add_argument("--out", default="runs/memory_profile.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    rows = []
    for m in [int(x) for x in args.multiples.split(",")]:
        for schedule in ("megatron", "chunkflow"):
            rows.append(run_distributed(_measure, 1, (args.config, args.overrides, schedule, m), timeout_s=1800)[0])
    mib = 2**20
    print(f"{'schedule':<10} {'longest':>8} {'activations MiB':>16} {'K/V prefix MiB':>15} "
          f"{'K/V state MiB':>14} {'RSS growth MiB':>15}")
    for r in rows:
        print(f"{r['schedule']:<10} {r['longest']:>8} {r['saved_activation_bytes'] / mib:>16.2f} "
              f"{r['saved_kv_prefix_bytes'] / mib:>15.2f} {r['kv_state_bytes'] / mib:>14.2f} "
              f"{r['rss_growth_bytes'] / mib:>15.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "overrides": args.overrides, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
