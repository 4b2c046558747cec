"""Throughput benchmark: megatron-core's stock schedule against ChunkFlow (issue 8).

    python scripts/benchmark.py --config configs/bench_cpu.yaml [--sweep]

:func:`run_benchmark` runs both sides on one process group (same model weights, global
batches, layout and activation-memory budget) and returns the report that
:mod:`chunkflow.bench.report` prints, writes as JSON and plots. See docs/benchmarks.md.
"""

from chunkflow.bench.config import chunkflow_points, megatron_candidates, validate_bench
from chunkflow.bench.report import check_losses, format_table, plot_sweep, write_report
from chunkflow.bench.driver import bench_worker, run_benchmark

__all__ = ["run_benchmark", "bench_worker", "validate_bench", "megatron_candidates", "chunkflow_points",
           "check_losses", "format_table", "plot_sweep", "write_report"]
