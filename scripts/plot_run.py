"""Draw loss, tokens/s per GPU and peak memory against the step for one or more runs.

    python scripts/plot_run.py runs/megatron runs/chunkflow --out docs/tiny_cpu_runs.png

Each RUN_DIR is a ``train.output_dir``: its ``metrics.jsonl`` (docs/metrics.md) gives one
point per step, and each run is labelled ``<dir name> (<schedule>)`` (the name alone when it
is the schedule's). Three panels side
by side share the step axis; steps whose loss is not finite (a skipped update) are left
out of the loss panel.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PANELS = (  # (metrics key, axis label, scale)
    ("loss", "loss (nats/token)", 1.0),
    ("tokens_per_s_per_gpu", "tokens/s per GPU", 1.0),
    ("peak_mem_allocated_bytes", "peak memory (MiB, max over ranks)", 1 / 2**20),
)


def read_run(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl``; a torn last line (a killed run) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (is it a train.output_dir?)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not rows:
        raise SystemExit(f"{path}: no complete step")
    return rows


def label(run_dir: Path, rows: list[dict]) -> str:
    name, schedule = Path(run_dir).resolve().name, rows[-1].get("schedule", "?")
    return name if name == schedule else f"{name} ({schedule})"


def draw(runs: list[tuple[str, list[dict]]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.2))
    for ax, (key, ylabel, scale) in zip(axes, PANELS):
        for i, (name, rows) in enumerate(runs):
            points = [(r["step"], r[key] * scale) for r in rows
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), marker=".", markersize=4, linewidth=1.2, label=name,
                        linestyle=("-", "--", ":", "-.")[i % 4])  # equal curves stay visible
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="train.output_dir of each run")
    parser.add_argument("--out", default="plot.png", help="PNG to write")
    args = parser.parse_args(argv)
    runs = []
    for run_dir in args.runs:
        rows = read_run(Path(run_dir))
        runs.append((label(Path(run_dir), rows), rows))
    draw(runs, args.out)
    print(f"{args.out}: {', '.join(f'{name}, {len(rows)} steps' for name, rows in runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
