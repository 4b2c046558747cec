"""Step time with and without each overlap of the ChunkFlow executor (issue 16, docs/overheads.md).

    python scripts/bench_overheads.py                          # ~10 min on 2 CPU cores
    python scripts/bench_overheads.py --reps 6 data.global_batch_size=16

Two 2-process layouts on the model of configs/bench_cpu.yaml, ChunkFlow schedule, fp32:

    pp2   PP = 2, DP = 1: the executor's p2p overlap on / off (receives posted before the
          compute ahead of them, sends waited a Comm later vs every Comm waited at once)
    dp2   PP = 1, DP = 2: megatron DDP's overlap_grad_reduce on / off (buckets of
          train.grad_bucket_params parameters; off = one all-reduce after backward)

Each layout builds both variants on the same weights and runs the same global batches,
the variants interleaved (order alternating per repetition) after one warm-up step each.
Step time = wall seconds of ``schedule.run`` plus the finalisation (gradient reduce)
inside it, between two barriers, maximum over ranks. Prints medians, per-repetition
ratios (off / on) and writes JSON (``--out``). No host-sync variant: on a CPU every
kernel is synchronous, so a read-back costs nothing to remove here (see the doc).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(rank: int, world: int, layout: str, config: str, overrides: list, reps: int) -> dict:
    import dataclasses
    import time

    import torch
    import torch.distributed as dist

    from chunkflow.config import load_config
    from chunkflow.data.loader import StepPlanLoader
    from chunkflow.data.synthetic import make_synthetic
    from chunkflow.parallel import comm
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.build import build_model_and_ddp, build_schedule

    torch.set_num_threads(1)
    par = ["parallel.pipeline=2"] if layout == "pp2" else ["parallel.pipeline=1"]
    cfg = load_config(config, list(overrides) + par + ["train.schedule=chunkflow", "bench.memory_budget_mb=0"])
    ctx = init_distributed(cfg)
    torch.manual_seed(cfg.train.seed)
    variants = {}
    state = None
    for on in (True, False):
        vcfg = cfg
        if layout == "dp2":
            vcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, overlap_grad_reduce=on))
        ddp, _ = build_model_and_ddp(vcfg, ctx, full_state=state)
        if state is None and ctx.pp_size == 1:
            state = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
        schedule = build_schedule(vcfg, ddp, ctx)
        if layout == "pp2":
            schedule.executor.overlap_p2p = on
        variants["on" if on else "off"] = (ddp, schedule)
    samples = make_synthetic(cfg.data.synthetic, max_seq_len=cfg.data.max_seq_len,
                             vocab_size=cfg.model.vocab_size, seed=cfg.data.seed)
    loader = StepPlanLoader.from_config(cfg, samples, dp_size=ctx.dp_size)
    plans = [loader.next() for _ in range(reps + 1)]
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i, plan in enumerate(plans):
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        for name in order:
            ddp, schedule = variants[name]
            ddp.zero_grad_buffer()
            comm.barrier()
            t0 = time.perf_counter()
            schedule.run(plan.rows_per_rank[ctx.dp_rank])
            comm.barrier()
            dt = comm.reduce_scalars([time.perf_counter() - t0], op="max")[0]
            if i > 0:  # the first plan warms both variants up
                times[name].append(dt)
    dist.barrier()
    return {"layout": layout, "times": times,
            "tokens": [int(p.num_tokens) for p in plans[1:]]} if rank == 0 else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench_cpu.yaml"))
    ap.add_argument("--layouts", default="pp2,dp2")
    ap.add_argument("--reps", type=int, default=5, help="timed global batches per variant")
    ap.add_argument("--out", default="runs/bench_overheads.json")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()

    from chunkflow.parallel.spawn import run_distributed

    results = []
    for layout in args.layouts.split(","):
        out = run_distributed(worker, 2, (layout, args.config, args.overrides, args.reps), timeout_s=3600)[0]
        on, off = out["times"]["on"], out["times"]["off"]
        ratios = [b / a for a, b in zip(on, off)]
        out.update(median_on_s=statistics.median(on), median_off_s=statistics.median(off),
                   ratios_off_over_on=ratios, median_ratio=statistics.median(ratios))
        results.append(out)
        what = "p2p overlap" if layout == "pp2" else "grad-reduce overlap"
        print(f"{layout} {what}: on {out['median_on_s']:.3f} s, off {out['median_off_s']:.3f} s "
              f"(median of {len(on)}); off/on per batch " + " ".join(f"{r:.3f}" for r in ratios)
              + f", median {out['median_ratio']:.3f}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": " ".join(sys.argv), "config": args.config,
                                "overrides": args.overrides, "results": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
