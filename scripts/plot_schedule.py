"""Draw a pipeline step's per-stage timeline as a PNG (and print its action table).

    # what-if: sample lengths in units U, chunk size C in U (docs/pipeline.md example)
    python scripts/plot_schedule.py --simulate --lengths 4,2,1,1 --chunk-size 2 --k 1 --stages 4
    # one global batch of the configured data (first DP rank's pipeline)
    python scripts/plot_schedule.py --config configs/tiny_cpu.yaml [--batch 0] [--dp 1] [key=value ...]
    # a timeline measured by the executor ({"stages": [[{kind, mb, start, end}, ...], ...]})
    python scripts/plot_schedule.py --timeline runs/x/timeline.json

One row per stage (stage 0 on top), time to the right. Forward blue (hatched: forward
without a graph, K/V only), recompute orange, backward green, idle grey. Labels are
micro-batch indices. Simulated runs also draw Megatron's 1F1B on the same data above
(--no-baseline to skip): the same time axis, so bar lengths compare. Costs: forward ~
tokens (--cost uniform, the paper's assumption) or tokens + attention pairs of the
configured / --hidden model (--cost attention); backward 2x forward, recompute = forward.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from chunkflow.data.assignment import CostModel
from chunkflow.pipeline.plan import PipelinePlan, build_pipeline_plan, format_plan, plain_1f1b_plan
from chunkflow.pipeline.simulate import UNIFORM, Timeline, chunk_rows, row_costs, simulate, simulate_1f1b

COLORS = {"forward": "#4C78A8", "recompute": "#F58518", "backward": "#54A24B", "idle": "#E6E6E6"}

Panel = tuple[str, Timeline, Optional[PipelinePlan]]


def draw(panels: list[Panel], path: str) -> None:
    """One subplot per panel, one bar row per stage; saved as PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    span = max(t.makespan for _, t, _ in panels) or 1.0
    stages = max(t.num_stages for _, t, _ in panels)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(12, 0.55 * stages * len(panels) + 1.2 * len(panels) + 0.6))
    for ax, (title, t, plan) in zip(axes[:, 0], panels):
        no_graph = set()
        if plan is not None:
            no_graph = {a.mb for s in range(plan.num_stages) for a in plan.actions(s)
                        if type(a).__name__ == "Forward" and not a.keep_graph}
        for s, ivs in enumerate(t.stages):
            y = t.num_stages - 1 - s
            ax.barh(y, t.makespan, left=0, height=0.8, color=COLORS["idle"], edgecolor="none")
            for iv in ivs:
                hatch = "///" if iv.kind == "forward" and (iv.mb in no_graph or not iv.graph) else None
                ax.barh(y, iv.end - iv.start, left=iv.start, height=0.8, color=COLORS[iv.kind],
                        edgecolor="white", linewidth=0.8, hatch=hatch)
                if iv.end - iv.start > span / 80:
                    ax.text((iv.start + iv.end) / 2, y, str(iv.mb), ha="center", va="center",
                            fontsize=8, color="white", fontweight="bold")
        ax.set_yticks(range(t.num_stages), [f"stage {s}" for s in reversed(range(t.num_stages))])
        ax.set_xlim(0, span)
        deps = describe(plan) if plan is not None else ""
        note = f"   ({deps})" if 0 < deps.count("=") - 1 <= 8 else ""
        ax.set_title(f"{title}   makespan {t.makespan:.4g}   bubble {100 * t.bubble_fraction:.1f}%{note}",
                     loc="left", fontsize=10)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[-1, 0].set_xlabel("time (forward cost units)")
    legend = [Patch(color=COLORS[k], label=k) for k in ("forward", "recompute", "backward", "idle")]
    legend.insert(1, Patch(facecolor=COLORS["forward"], hatch="///", edgecolor="white", label="forward, no graph"))
    fig.legend(handles=legend, loc="lower center", ncol=5, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(plan: PipelinePlan) -> str:
    """Which micro-batches are chunks of which long sample."""
    parts = []
    for mb, c in enumerate(plan.chunks):
        if c.dependent:
            parts.append(f"{mb}={c.sample}.{c.chunk_index}")
    return "mb=sample.chunk: " + (", ".join(parts) if parts else "all standalone")


def from_lengths(args: argparse.Namespace) -> list[Panel]:
    lengths = [int(x) for x in args.lengths.split(",")]
    unit = args.unit
    cm = UNIFORM if args.cost == "uniform" else CostModel.for_hidden_size(args.hidden)
    tokens = [n * unit for n in lengths]
    rows = chunk_rows(tokens, args.chunk_size * unit)
    plan = build_pipeline_plan(rows, args.stages, args.k)
    panels = [(f"ChunkFlow C={args.chunk_size}U K={args.k}", simulate(plan, row_costs(rows, cm)), plan)]
    if not args.no_baseline:
        base, t = simulate_1f1b(tokens, num_stages=args.stages, cost_model=cm)
        panels.insert(0, ("Megatron 1F1B, one sample per micro-batch", t, base))
    return panels


def from_config(args: argparse.Namespace) -> list[Panel]:
    from chunkflow.config import load_config
    from chunkflow.data.dataset import load_samples
    from chunkflow.data.loader import GlobalBatchLoader
    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step

    cfg = load_config(args.config, args.overrides)
    samples, description = load_samples(cfg.data, vocab_size=cfg.model.vocab_size)
    print(f"data: {description}")
    batches = GlobalBatchLoader(samples, global_batch_size=cfg.data.global_batch_size,
                                seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    for _ in range(args.batch):
        batches.next()
    batch = batches.next()
    cm = UNIFORM if args.cost == "uniform" else CostModel.from_model_config(cfg.model)
    stages = args.stages or cfg.parallel.pipeline
    k = args.k or cfg.chunkflow.k
    step = plan_chunkflow_step(batch, dp_size=args.dp, chunk_size=cfg.chunkflow.chunk_size, cost_model=cm)
    rows = step.for_rank(args.dp_rank)
    plan = build_pipeline_plan(rows, stages, k)
    title = f"ChunkFlow C={cfg.chunkflow.chunk_size} K={k}, batch {args.batch}, DP rank {args.dp_rank}"
    panels = [(title, simulate(plan, row_costs(rows, cm)), plan)]
    if not args.no_baseline:
        mega = plan_megatron_step(batch, dp_size=args.dp, max_seq_len=cfg.data.max_seq_len, cost_model=cm)
        mrows = mega.for_rank(args.dp_rank)
        base = plain_1f1b_plan(len(mrows), stages)
        panels.insert(0, (f"Megatron 1F1B, rows of {cfg.data.max_seq_len}", simulate(base, row_costs(mrows, cm)), base))
    return panels


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--simulate", action="store_true", help="simulate --lengths")
    src.add_argument("--config", help="simulate one global batch of this config's data")
    src.add_argument("--timeline", help="plot a measured timeline JSON")
    parser.add_argument("--lengths", default="4,2,1,1", help="sample lengths in units U")
    parser.add_argument("--chunk-size", type=int, default=2, help="C in units U (--simulate)")
    parser.add_argument("--unit", type=int, default=1, help="tokens per U (matters for --cost attention)")
    parser.add_argument("--k", type=int, default=None, help="K (default 1, or chunkflow.k)")
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages (default 4 / parallel.pipeline)")
    parser.add_argument("--cost", choices=("uniform", "attention"), default="uniform")
    parser.add_argument("--hidden", type=int, default=4096, help="model width for --simulate --cost attention")
    parser.add_argument("--batch", type=int, default=0, help="global batch index (--config)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (--config)")
    parser.add_argument("--dp-rank", type=int, default=0, help="whose pipeline to draw (--config)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the Megatron 1F1B panel")
    parser.add_argument("--print", action="store_true", help="print the per-stage action tables")
    parser.add_argument("--save-timeline", help="also write the (last) simulated timeline as JSON")
    parser.add_argument("-o", "--output", default="schedule.png", help="PNG path")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (--config)")
    args = parser.parse_args(argv)
    try:
        if args.timeline:
            panels: list[Panel] = [(args.timeline, Timeline.load(args.timeline), None)]
        elif args.simulate:
            args.k, args.stages = args.k or 1, args.stages or 4
            panels = from_lengths(args)
        else:
            panels = from_config(args)
    except (ValueError, OSError) as e:  # ConfigError and data errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    for title, t, plan in panels:
        print(f"{title}: makespan {t.makespan:.4g}, bubble {100 * t.bubble_fraction:.1f}%")
        if plan is not None and args.print:
            print(describe(plan))
            print(format_plan(plan))
    if args.save_timeline:
        panels[-1][1].save(args.save_timeline)
    draw(panels, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
