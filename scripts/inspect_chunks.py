"""Show how the configured data becomes ChunkFlow chunks, next to Megatron-style packing.

    python scripts/inspect_chunks.py --config configs/tiny_cpu.yaml [key=value ...] \
        [--batches 4] [--dp 2] [--balance lpt|round_robin]

For the first N global batches prints, for each schedule: samples, rows (ChunkFlow
standalone / dependent chunks; Megatron packed rows of data.max_seq_len), padding rows,
fill rate (real tokens / (rows x capacity)), estimated cost per data-parallel rank and the
imbalance max / mean, then the same figures over all N batches. The data-parallel size
is --dp, else WORLD_SIZE / (tensor x pipeline), else 1. No process group, no torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from chunkflow.config import ConfigError, load_config, validate_layout
from chunkflow.data.assignment import BALANCE, CostModel
from chunkflow.data.loader import GlobalBatchLoader
from chunkflow.data.plan import plan_step
from chunkflow.data.stats import format_table, plan_stats, total_stats


def load_data(cfg):
    """``(samples, description)`` of the configured data, read as training reads it (a
    JSONL path through the data cache, not into memory; imported lazily)."""
    from chunkflow.train.data_cache import load_run_samples

    return load_run_samples(cfg, log=lambda line: print(line, file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--batches", type=int, default=4, help="global batches to show (default 4)")
    parser.add_argument("--dp", type=int, default=None, help="data-parallel size")
    parser.add_argument("--balance", choices=BALANCE, default="lpt", help="rank assignment")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. chunkflow.chunk_size=128")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        mp = cfg.parallel.tensor * cfg.parallel.pipeline
        dp = args.dp if args.dp is not None else max(int(os.environ.get("WORLD_SIZE", mp)) // mp, 1)
        if dp < 1 or args.batches < 1:
            raise ConfigError(f"--dp={dp} and --batches={args.batches} must be >= 1")
        validate_layout(cfg, dp * mp)
        samples, description = load_data(cfg)
        batches = GlobalBatchLoader(samples, global_batch_size=cfg.data.global_batch_size,
                                    seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    except ValueError as e:  # ConfigError is a ValueError, and so are data errors
        print(f"error: {e}", file=sys.stderr)
        return 2

    cost = CostModel.from_model_config(cfg.model)
    print(f"data: {description}")
    print(f"dp={dp}  global_batch_size={cfg.data.global_batch_size}  "
          f"chunk_size={cfg.chunkflow.chunk_size}  max_seq_len={cfg.data.max_seq_len}  balance={args.balance}")
    print(f"cost = {cost.linear:g} x tokens + {cost.attention:.3g} x causal (query, key) pairs "
          "(token-equivalents of linear-layer work)\n")
    records, plans = [], {"megatron": [], "chunkflow": []}
    for b in range(args.batches):
        batch = batches.next()
        for schedule in plans:
            plan = plan_step(batch, schedule=schedule, dp_size=dp, max_seq_len=cfg.data.max_seq_len,
                             chunk_size=cfg.chunkflow.chunk_size, cost_model=cost, balance=args.balance)
            plans[schedule].append(plan)
            records.append({"batch": b, **plan_stats(plan)})
    records += [{"batch": "total", **total_stats(p)} for p in plans.values()]
    print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
