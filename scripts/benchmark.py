"""Throughput of megatron-core's stock schedule vs ChunkFlow: same model, data, layout, budget.

    python scripts/benchmark.py --config configs/bench_longtail_cpu.yaml [--sweep] [key=value ...]

Also installed as ``chunkflow-benchmark``; the logic is ``chunkflow.bench.cli.main``
(``--help`` gives every option, docs/benchmarks.md the method).
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")

from chunkflow.bench.cli import main  # noqa: E402  (also installed as chunkflow-benchmark)

if __name__ == "__main__":
    sys.exit(main())
