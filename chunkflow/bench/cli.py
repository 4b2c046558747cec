"""Command line of the benchmark (``chunkflow-benchmark``, ``scripts/benchmark.py``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chunkflow.config import ConfigError, load_config

_CLI_DOC = """Throughput of megatron-core's stock schedule vs ChunkFlow: same model, data, layout, budget.

    python scripts/benchmark.py --config configs/bench_cpu.yaml            # spawns the ranks
    python scripts/benchmark.py --config configs/bench_cpu.yaml --sweep    # C x K sweep + PNG
    torchrun --nproc-per-node 8 scripts/benchmark.py --config configs/bench_qwen7b_256k.yaml

Without torchrun it starts parallel.tensor x parallel.pipeline local processes (--nproc
to change). Prints a table, writes the JSON report to bench.output (and the sweep PNG
next to it). Exits 1 if the two sides' losses differ, 2 on a configuration error.
See docs/benchmarks.md.
"""


def main(argv: list[str] | None = None) -> int:
    """The command line of ``chunkflow-benchmark`` / ``scripts/benchmark.py``; exit code."""
    import warnings

    warnings.filterwarnings("ignore")
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=_CLI_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--sweep", action="store_true", help="sweep bench.sweep_chunk_sizes x bench.sweep_k")
    p.add_argument("--nproc", type=int, default=0, help="processes to spawn without torchrun "
                   "(default parallel.tensor x parallel.pipeline)")
    p.add_argument("--timeout-s", type=float, default=3600, help="kill the spawned ranks after this long")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. bench.timed_steps=5")
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides) + (["bench.sweep=true"] if args.sweep else [])
    try:
        cfg = load_config(args.config, overrides)
        from chunkflow.bench import validate_bench

        validate_bench(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from chunkflow.bench import bench_worker, format_table, plot_sweep, write_report

    command = ["scripts/benchmark.py"] + argv
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun / srun
        report = bench_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args.config, overrides, command)
        if int(os.environ["RANK"]) != 0:
            return 0 if report["loss_check"]["ok"] else 1
    else:
        from chunkflow.parallel.spawn import run_distributed

        world = args.nproc or cfg.parallel.tensor * cfg.parallel.pipeline
        report = run_distributed(bench_worker, world, (args.config, overrides, command), timeout_s=args.timeout_s)[0]
    print(format_table(report))
    out = write_report(report, cfg.bench.output)
    png = plot_sweep(report, Path(cfg.bench.output).with_suffix(".png"))
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0 if report["loss_check"]["ok"] else 1
