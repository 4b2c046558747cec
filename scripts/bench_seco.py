"""SeCO / SpaCO on one process: time, time / forward-only and memory as the sample grows.

    python scripts/bench_seco.py                                   # ~4 min on 2 CPU cores
    python scripts/bench_seco.py --lengths 1024,2048 bench.memory_budget_mb=64
    python scripts/bench_seco.py --config configs/seco_cpu.yaml --lengths 4096,8192

One sample of L tokens per step, four ways, on the same weights (docs/seco_spaco.md):

    full       plain full-sequence backprop (megatron-core's schedule, no recompute)
    recompute  the same with layer-wise activation recompute (train.recompute=full)
    seco       chunkflow.mode=seco: chunks of C tokens, K=1, exact gradients
    spaco      chunkflow.mode=spaco: back-propagate t of the k = L/C chunks (Bernoulli)

Per (method, L): seconds per step (min over steps; SpaCO: mean, its cost depends on the
draw), the ratio to a forward-only pass of the same sample (no_grad, min of >= 2), and memory:
``act`` = peak bytes saved for backward + K/V state (stored K/V and their gradients),
the quantity that grows with L (weights and optimizer are constant and left out), and
the peak RSS increase of the process during the step (VmHWM reset before each step).

The memory budget is ``bench.memory_budget_mb`` (a config value, on ``act``). For each
method the longest L within it is reported: *measured* if a measured length is the
answer, *extrapolated* when every measured length fits (a line through the two longest
points, rounded down to a multiple of C). Prints a table, writes JSON and a PNG
(``--out``, default runs/bench_seco.json / .png).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from chunkflow.config import ConfigError, load_config  # noqa: E402

# The default model: small enough that 16K tokens take seconds per step on 2 cores.
DEFAULTS = ["model.hidden_size=256", "model.ffn_hidden_size=688", "model.num_layers=2",
            "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=512",
            "model.dtype=fp32", "chunkflow.chunk_size=1024", "chunkflow.spaco.budget=2",
            "bench.memory_budget_mb=256"]
METHODS = ("full", "recompute", "seco", "spaco")


def _sample(length: int, vocab: int, seed: int):
    import numpy as np

    from chunkflow.data.types import Sample

    rng = np.random.default_rng(seed)
    raw = rng.integers(0, vocab, length + 1)
    return Sample(seed, raw[:-1].astype(np.int64), raw[1:].astype(np.int64), np.ones(length, np.float32))


def _build(cfg, ctx, recompute: str, state=None):
    import dataclasses

    from chunkflow.train.build import build_model_and_ddp

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, recompute=recompute))
    prepare = (lambda m: m.load_state_dict(state, strict=False)) if state is not None else None
    return build_model_and_ddp(cfg, ctx, prepare=prepare)[0]


def _forward_only(ddp, sample, device) -> float:
    import torch

    from chunkflow.data.packing import pack_samples
    from chunkflow.model.batch import row_to_tensors
    from chunkflow.model.loss import token_losses

    (row,) = pack_samples([sample], len(sample))
    b = row_to_tensors(row, device)
    t0 = time.perf_counter()
    with torch.no_grad():
        token_losses(ddp, b)
    return time.perf_counter() - t0


def _step(method: str, models: dict, sample, cfg, device, step: int, rss) -> dict:
    """One training step of ``method``; time and memory."""
    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
    from chunkflow.pipeline.executor import ChunkFlowSchedule
    from chunkflow.parallel.distributed import ParallelContext
    from chunkflow.scheduling.memory import SavedTensorMeter
    from chunkflow.scheduling.spaco import SpaCOSampler
    from chunkflow.train.megatron_schedule import MegatronSchedule

    c = cfg.chunkflow
    ddp = models["recompute" if method == "recompute" else "base"]
    ddp.zero_grad_buffer()
    out: dict = {}
    if method in ("full", "recompute"):
        rows = plan_megatron_step([sample], dp_size=1, max_seq_len=len(sample)).rows_per_rank[0]
        rss.reset(trim=True)
        t0 = time.perf_counter()
        with SavedTensorMeter(exclude=ddp.module) as meter:
            MegatronSchedule(ddp, device).run(rows)
        out["seconds"] = time.perf_counter() - t0
        out["act_bytes"] = meter.peak_bytes + meter.peak_kv_bytes
    else:
        rows = plan_chunkflow_step([sample], dp_size=1, chunk_size=c.chunk_size).rows_per_rank[0]
        sampler = None
        if method == "spaco":
            sampler = SpaCOSampler(c.spaco.budget, c.spaco.sampler, c.spaco.max_factor, seed=cfg.train.seed)
        ctx = ParallelContext(0, 1, 0, 1, 1, 1, 0, 0, 0, device)
        engine = ChunkFlowSchedule(ddp, ctx, 1, measure_memory=True, sampler=sampler)
        engine.step = step
        rss.reset(trim=True)
        t0 = time.perf_counter()
        res = engine.run(rows)
        out["seconds"] = time.perf_counter() - t0
        e = res.extra
        out["act_bytes"] = e["saved_activation_peak_bytes"] + e["saved_kv_peak_bytes"] + e["kv_state_peak_bytes"]
        out["kv_state_bytes"] = e["kv_state_peak_bytes"]
        if sampler is not None:
            out["backprop_chunks"] = e["spaco_backprop_chunks"]
            out["chunks"] = e["spaco_chunks"]
    out["rss_increase_bytes"] = rss.peak_allocated() - rss.before
    return out


def _fits(points: list[tuple[int, float]], budget: float, chunk: int) -> tuple[int, str]:
    """Longest length within ``budget`` bytes: (length, "measured" | "extrapolated" | "none")."""
    ok = [n for n, b in points if b <= budget]
    if not ok:
        return 0, "none"
    if ok[-1] != points[-1][0] or len(points) < 2:
        return max(ok), "measured"
    (n1, b1), (n2, b2) = points[-2], points[-1]
    slope = (b2 - b1) / (n2 - n1)
    if slope <= 0:
        return n2, "measured"
    n = n2 + (budget - b2) / slope
    return max(n2, int(n // chunk) * chunk), "extrapolated"


def run(cfg, lengths: list[int], steps_short: int, steps_long: int, long_from: int, spaco_steps: int,
        methods: list[str]) -> dict:
    import torch

    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.metrics import PeakMemory

    ctx = init_distributed(cfg)
    torch.manual_seed(cfg.train.seed)
    base = _build(cfg, ctx, "none")
    state = {k: v for k, v in base.module.state_dict().items() if not k.endswith("_extra_state")}
    models = {"base": base, "recompute": _build(cfg, ctx, "full", state)}
    rss = PeakMemory(ctx.device)  # the one peak-memory reader (VmHWM, reset per step)
    warm = _sample(min(lengths), cfg.model.vocab_size, seed=0)
    for method in methods:  # warm-up: first calls allocate and pick kernels
        _step(method, models, warm, cfg, ctx.device, 0, rss)
    rows = []
    for length in lengths:
        sample = _sample(length, cfg.model.vocab_size, seed=length)
        n_steps = steps_long if length >= long_from else steps_short
        fwd = min(_forward_only(base, sample, ctx.device) for _ in range(max(2, n_steps)))
        for method in methods:
            runs = [_step(method, models, sample, cfg, ctx.device, i, rss)
                    for i in range(spaco_steps if method == "spaco" else n_steps)]
            secs = [r["seconds"] for r in runs]
            sec = sum(secs) / len(secs) if method == "spaco" else min(secs)
            row = {"method": method, "length": length, "seconds": sec, "forward_seconds": fwd,
                   "ratio": sec / fwd, "act_bytes": max(r["act_bytes"] for r in runs),
                   "rss_increase_bytes": max(r["rss_increase_bytes"] for r in runs), "steps": len(runs)}
            if method == "spaco":
                row["mean_backprop_chunks"] = sum(r["backprop_chunks"] for r in runs) / len(runs)
                row["chunks"] = runs[0]["chunks"]
            if "kv_state_bytes" in runs[0]:
                row["kv_state_bytes"] = runs[0]["kv_state_bytes"]
            rows.append(row)
            print(f"  L={length:>6} {method:<9} {sec:7.2f} s  x{sec / fwd:4.2f} fwd  "
                  f"act {row['act_bytes'] / 2**20:8.1f} MiB  rss +{row['rss_increase_bytes'] / 2**20:7.1f} MiB",
                  flush=True)
    budget = cfg.bench.memory_budget_mb * 2**20
    fits = {}
    for method in methods:
        pts = [(r["length"], r["act_bytes"]) for r in rows if r["method"] == method]
        n, how = _fits(pts, budget, cfg.chunkflow.chunk_size)
        fits[method] = {"max_length": n, "how": how}
    return {"model": {k: getattr(cfg.model, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                         "num_attention_heads", "num_query_groups", "vocab_size",
                                                         "dtype")},
            "chunk_size": cfg.chunkflow.chunk_size, "spaco": vars(cfg.chunkflow.spaco).copy(),
            "memory_budget_mb": cfg.bench.memory_budget_mb, "threads": torch.get_num_threads(),
            "rows": rows, "fits": fits}


def format_table(report: dict) -> str:
    rows, methods = report["rows"], list(dict.fromkeys(r["method"] for r in report["rows"]))
    lengths = sorted({r["length"] for r in rows})
    get = {(r["method"], r["length"]): r for r in rows}
    head = "| L | fwd-only s | " + " | ".join(f"{m} s/step (x fwd)" for m in methods) + " |"
    lines = [head, "|" + "---|" * (2 + len(methods))]
    for n in lengths:
        cells = [f"{get[m, n]['seconds']:.2f} (x{get[m, n]['ratio']:.2f})" for m in methods]
        lines.append(f"| {n} | {get[methods[0], n]['forward_seconds']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "| L | " + " | ".join(f"{m} act MiB (RSS +MiB)" for m in methods) + " |",
              "|" + "---|" * (1 + len(methods))]
    for n in lengths:
        cells = [f"{get[m, n]['act_bytes'] / 2**20:.0f} ({get[m, n]['rss_increase_bytes'] / 2**20:.0f})"
                 for m in methods]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    fits = report["fits"]
    lines += ["", f"Longest sample within bench.memory_budget_mb={report['memory_budget_mb']:g} (act): "
              + ", ".join(f"{m} {fits[m]['max_length']} ({fits[m]['how']})" for m in methods)]
    if "spaco" in methods:
        sp = [get["spaco", n] for n in lengths]
        lines.append("SpaCO back-propagated chunks (mean of draws / k; a sample of <= C tokens is one "
                     "standalone chunk, always back-propagated): "
                     + ", ".join(f"{r['mean_backprop_chunks']:.1f}/{r['chunks']}" if r["chunks"] else "standalone"
                                 for r in sp))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        n = [r["length"] for r in mine]
        axes[0].plot(n, [r["seconds"] for r in mine], "o-", label=m)
        axes[1].plot(n, [r["ratio"] for r in mine], "o-", label=m)
        axes[2].plot(n, [r["act_bytes"] / 2**20 for r in mine], "o-", label=m)
    fwd = [r for r in rows if r["method"] == methods[0]]
    axes[0].plot([r["length"] for r in fwd], [r["forward_seconds"] for r in fwd], "k--", label="forward only")
    axes[2].axhline(report["memory_budget_mb"], color="grey", ls=":", label="budget")
    titles = ("seconds per step", "step time / forward-only time", "activation memory + K/V state (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sample length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend()
    m = report["model"]
    fig.suptitle(f"SeCO / SpaCO, one process: {m['num_layers']} layers, hidden {m['hidden_size']}, "
                 f"C={report['chunk_size']}, SpaCO t={report['spaco']['budget']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (model, chunkflow, bench); default: small model")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=2, help="timed steps per point below --long-from")
    p.add_argument("--long-steps", type=int, default=1, help="timed steps per point from --long-from on")
    p.add_argument("--long-from", type=int, default=8192)
    p.add_argument("--spaco-steps", type=int, default=3, help="SpaCO draws averaged per point")
    p.add_argument("--out", default="runs/bench_seco.json")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. bench.memory_budget_mb=512")
    args = p.parse_intermixed_args(argv)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    try:
        if bad:
            raise ConfigError(f"--methods: unknown {bad}; use some of {', '.join(METHODS)}")
        base = [] if args.config else DEFAULTS
        cfg = load_config(args.config, base + [f"data.max_seq_len={max(lengths)}", "parallel.tensor=1",
                                               "parallel.pipeline=1"] + list(args.overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    from chunkflow.parallel.spawn import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    report = run(cfg, lengths, args.steps, args.long_steps, args.long_from, args.spaco_steps, methods)
    report["command"] = "scripts/bench_seco.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = format_table(report)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    try:
        plot(report, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    except ImportError:
        print(f"wrote {out} (pip install matplotlib for the PNG)")
    from chunkflow.parallel.distributed import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
