"""Per-rank memory of the Megatron path and ChunkFlow as the longest sample grows.

    python scripts/memory_profile.py --config configs/tiny_cpu.yaml --multiples 4,8,16,32 --pp 1,2
    python scripts/memory_profile.py --config configs/tiny_cpu.yaml --multiples 4,8,16,32,64 --offload-kv
    python scripts/memory_profile.py --config configs/tiny_cpu.yaml --budget-mib 48 --offload-kv

For each multiple m, one global batch holds a sample of m x C tokens (C =
chunkflow.chunk_size) plus a few short ones. Each (schedule, m, pipeline size) runs in
its own processes (so peak RSS is that run's), one per pipeline stage, and every rank
reports:

* activations: bytes saved for backward at peak (parameters excluded);
* K/V state: the store's K/V buffers and their gradients, in the device pool and in the
  host pool (``chunkflow.offload_kv``), and the K/V blocks fetched to the device;
* cached inputs: stage inputs kept for a later recompute (PP > 1), device or host pool;
* device side: activations + every device-pool peak (the figure a GPU must hold; on
  CPU the "device" pool is ordinary tensors, the host pool memory-mapped files);
* process peak: RSS growth on CPU (it includes the mapped host pool), allocated device
  memory on GPU (chunkflow.train.metrics.PeakMemory);
* step time of the measured step (the second of two; noisy on a shared machine).

``--offload-kv`` adds a ChunkFlow run with ``chunkflow.offload_kv=true``.
``--budget-mib B``: instead of a table over multiples, double the longest sample
(from 4C) for each ChunkFlow variant until its device side exceeds B MiB on some rank
(or ``--max-multiple`` is reached), and print the longest that fit.
Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

MIB = 2**20


def _measure(rank: int, world: int, config: str, overrides: list, variant: str, m: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np

    from chunkflow.config import load_config
    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
    from chunkflow.data.types import Sample
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.scheduling.memory import SavedTensorMeter
    from chunkflow.train.build import build_model_and_ddp, build_schedule
    from chunkflow.train.metrics import PeakMemory

    schedule = "megatron" if variant == "megatron" else "chunkflow"
    C = load_config(config, overrides).chunkflow.chunk_size
    cfg = load_config(config, list(overrides) + [
        "parallel.tensor=1", f"parallel.pipeline={world}", f"data.max_seq_len={max(m * C, 1)}",
        f"train.schedule={schedule}", f"chunkflow.offload_kv={str(variant == 'offload').lower()}"])
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
        engine.run(plan.rows_per_rank[0])  # warm-up (and the memory peaks)
        res = engine.run(plan.rows_per_rank[0])
    peak = memory.peak_allocated()
    e = dict(getattr(res, "extra", {}) or {})
    kv_device = e.get("kv_device_kv_peak_bytes", 0)
    inputs_device = e.get("kv_device_inputs_peak_bytes", 0)
    blocks = e.get("kv_device_blocks_peak_bytes", 0)
    return {
        "schedule": variant, "multiple": m, "longest": m * C, "chunk_size": C, "k": cfg.chunkflow.k,
        "pp": world, "rank": rank,
        "activation_bytes": meter.peak_bytes,
        "kv_device_bytes": kv_device, "kv_blocks_bytes": blocks, "inputs_device_bytes": inputs_device,
        "device_side_bytes": meter.peak_bytes + e.get("kv_device_peak_bytes", 0),
        "kv_host_bytes": e.get("kv_host_kv_peak_bytes", 0),
        "inputs_host_bytes": e.get("kv_host_inputs_peak_bytes", 0),
        "host_side_bytes": e.get("kv_host_peak_bytes", 0),
        "peak_rss_bytes": peak, "peak_mem_source": memory.source,
        "rss_growth_bytes": peak - memory.before, "step_s": res.wall_s,
    }


def _run(config: str, overrides: list, variant: str, m: int, pp: int) -> list[dict]:
    from chunkflow.parallel.spawn import run_distributed

    return run_distributed(_measure, pp, (config, overrides, variant, m), timeout_s=3600)


def _table(rows: list[dict]) -> None:
    print(f"{'schedule':<9} {'pp':>2} {'rank':>4} {'longest':>7} {'activ MiB':>9} {'K/V dev':>8} "
          f"{'inputs dev':>10} {'blocks':>7} {'DEVICE':>8} {'K/V host':>8} {'inp host':>8} "
          f"{'RSS+ MiB':>8} {'step s':>7}")
    for r in rows:
        print(f"{r['schedule']:<9} {r['pp']:>2} {r['rank']:>4} {r['longest']:>7} "
              f"{r['activation_bytes'] / MIB:>9.2f} {r['kv_device_bytes'] / MIB:>8.2f} "
              f"{r['inputs_device_bytes'] / MIB:>10.2f} {r['kv_blocks_bytes'] / MIB:>7.2f} "
              f"{r['device_side_bytes'] / MIB:>8.2f} {r['kv_host_bytes'] / MIB:>8.2f} "
              f"{r['inputs_host_bytes'] / MIB:>8.2f} {r['rss_growth_bytes'] / MIB:>8.1f} {r['step_s']:>7.2f}")


def _plot(rows: list[dict], path: str) -> None:
    """Device side (max over ranks) per schedule and pipeline size; the offload host side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    series: dict = {}
    for r in rows:
        for side in ("device", "host"):
            if side == "host" and r["schedule"] != "offload":
                continue
            key = (r["schedule"], r["pp"], side)
            at = series.setdefault(key, {})
            at[r["longest"]] = max(at.get(r["longest"], 0), r[f"{side}_side_bytes"] / MIB)
    for (name, pp, side), pts in sorted(series.items()):
        xs = sorted(pts)
        label = f"{name if name != 'offload' else 'chunkflow + offload_kv'}, PP={pp}: {side} side"
        ax.plot(xs, [pts[x] for x in xs], marker="o", linestyle="--" if side == "host" else "-",
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("longest sample (tokens)")
    ax.set_ylabel("MiB per rank (max over ranks)")
    ax.set_title("Memory as the longest sample grows (tiny model, CPU)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _longest_within(args, variant: str, pp: int) -> dict:
    """Double the longest sample from 4C while the device side fits ``--budget-mib``."""
    best, m, tried = None, 4, []
    while m <= args.max_multiple:
        rows = _run(args.config, args.overrides, variant, m, pp)
        tried += rows
        worst = max(r["device_side_bytes"] for r in rows)
        print(f"{variant:<9} pp={pp} longest={rows[0]['longest']:>7}: device side {worst / MIB:.2f} MiB", flush=True)
        if worst > args.budget_mib * MIB:
            break
        best, m = rows[0]["longest"], 2 * m
    return {"schedule": variant, "pp": pp, "budget_mib": args.budget_mib, "longest_fit": best,
            "capped": m > args.max_multiple, "rows": tried}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--multiples", default="4,8,16,32")
    p.add_argument("--pp", default="1", help="pipeline sizes, e.g. 1,2 (one process per stage)")
    p.add_argument("--schedules", default="megatron,chunkflow")
    p.add_argument("--offload-kv", action="store_true", help="add ChunkFlow with chunkflow.offload_kv=true")
    p.add_argument("--budget-mib", type=float, default=0.0)
    p.add_argument("--max-multiple", type=int, default=256)
    p.add_argument("--out", default="runs/memory_profile.json")
    p.add_argument("--plot", default="", help="also draw the device/host sides to this PNG")
    p.add_argument("--from-json", default="", help="re-print and plot the rows of an earlier --out")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    variants = [s for s in args.schedules.split(",") if s] + (["offload"] if args.offload_kv else [])
    pps = [int(x) for x in args.pp.split(",")]
    result: dict = {"config": args.config, "overrides": args.overrides, "argv": sys.argv[1:]}
    if args.budget_mib > 0:
        fits = [_longest_within(args, v, pp) for pp in pps for v in variants if v != "megatron"]
        for f in fits:
            cap = " (stopped at --max-multiple)" if f["capped"] else ""
            print(f"{f['schedule']:<9} pp={f['pp']}: longest sample within {f['budget_mib']:g} MiB "
                  f"device side: {f['longest_fit']} tokens{cap}")
        result["budget"] = fits
    elif args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
        _table(rows)
        if args.plot:
            _plot(rows, args.plot)
        return 0
    else:
        rows = [r for pp in pps for m in [int(x) for x in args.multiples.split(",")]
                for v in variants for r in _run(args.config, args.overrides, v, m, pp)]
        _table(rows)
        result["rows"] = rows
        if args.plot:
            _plot(rows, args.plot)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
