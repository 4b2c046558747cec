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
from chunkflow.pipeline.draw import Panel, describe, draw_timelines
from chunkflow.pipeline.plan import build_pipeline_plan, format_plan, plain_1f1b_plan
from chunkflow.pipeline.simulate import UNIFORM, Timeline, chunk_rows, row_costs, simulate, simulate_1f1b


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
    from chunkflow.data.loader import GlobalBatchLoader
    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
    from chunkflow.train.data_cache import load_run_samples

    cfg = load_config(args.config, args.overrides)
    samples, description = load_run_samples(cfg)
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
    draw_timelines(panels, args.output, unit="seconds" if args.timeline else "forward cost units")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
