"""Throughput of megatron-core's stock schedule vs ChunkFlow: same model, data, layout, budget.

    python scripts/benchmark.py --config configs/bench_cpu.yaml            # spawns the ranks
    python scripts/benchmark.py --config configs/bench_cpu.yaml --sweep    # C x K sweep + PNG
    torchrun --nproc-per-node 8 scripts/benchmark.py --config configs/bench_qwen7b_256k.yaml

Without torchrun it starts parallel.tensor x parallel.pipeline local processes (--nproc
to change). Prints a table, writes the JSON report to bench.output (and the sweep PNG
next to it). Exits 1 if the two sides' losses differ, 2 on a configuration error.
See docs/benchmarks.md.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")

from chunkflow.bench.cli import main  # noqa: E402  (also installed as chunkflow-benchmark)

if __name__ == "__main__":
    sys.exit(main())
