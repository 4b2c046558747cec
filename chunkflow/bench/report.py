"""Turn the measured sides into the benchmark report: a dict (written as JSON), a table,
and in sweep mode a PNG.

Per side (``report["megatron"]``, ``report["chunkflow"]``, each ``report["sweep"]`` point)::

    tokens_per_s          timed tokens / timed step time (step time = slowest rank's)
    tokens_per_s_spread   min / median / max over timed steps
    tflops_per_s          model FLOPs (metrics.step_flops: recompute not counted) / time
    peak_activation_bytes the budgeted quantity (chunkflow.bench.measure), max over ranks
    peak_mem_bytes        peak RSS on CPU / allocated device memory on GPU, max over ranks
    bubble_fraction       mean over timed steps of 1 - mean over ranks (busy / wall)
    recompute_overhead    extra forward FLOPs / model training FLOPs
    losses, grad_norms    per step (warm-up and timed), for the equality check

Top level: ``speedup`` = chunkflow tokens_per_s / megatron tokens_per_s, its per-step
spread (paired: the same batch on both sides), ``loss_check``, the full configuration,
the workload and the machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from chunkflow.bench.config import MIB
from chunkflow.bench.breakdown import PARTS, predicted_speedup, time_breakdown
from chunkflow.bench.measure import chunkflow_recompute_flops, megatron_recompute_flops
from chunkflow.bench.stats import bootstrap_median_ci
from chunkflow.config.loader import config_to_dict
from chunkflow.config.schema import Config
from chunkflow.train.metrics import step_flops

__all__ = ["build_report", "summarise", "check_losses", "machine_description", "format_table",
           "write_report", "plot_sweep"]


def _spread(values: Sequence[float]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _step_loss(side: Any, i: int) -> float:
    recs = side.records[i]
    return sum(r["loss_sum"] for r in recs if r["loss_rank"]) / max(side.plans[i].num_loss_tokens, 1)


def summarise(side: Any, cfg: Config, timed: Sequence[int]) -> dict:
    """The figures of one side (see module docstring)."""
    m = cfg.model
    out: dict[str, Any] = {"name": side.name, "schedule": side.schedule, "recompute": side.recompute,
                           "chunk_size": side.chunk_size, "k": side.k, "fits_budget": side.fits(cfg),
                           "timed": side.timed, "out_of_memory": side.oom, "skipped": side.skipped}
    if side.oom or side.skipped:  # out of device memory, or not run (safe probing): nothing measured
        out.update(peak_activation_bytes=None, peak_mem_bytes=None, losses=[], grad_norms=[], steps=[])
        return out
    all_steps = sorted(side.records)
    peak = max((r for i in all_steps for r in side.records[i]), key=lambda r: r["activation_bytes"])
    out.update(
        peak_activation_bytes=peak["activation_bytes"],
        peak_activation_breakdown={k: peak[k] for k in ("saved_activation_bytes", "kv_prefix_bytes",
                                                        "kv_state_bytes", "input_cache_bytes")},
        peak_mem_bytes=side.mem_peak(),
        mem_growth_bytes=max(r["mem_peak_bytes"] - r["mem_before_bytes"] for i in all_steps for r in side.records[i]),
        losses=[_step_loss(side, i) for i in all_steps],
        grad_norms=[math.sqrt(sum(r["grad_sq"] for r in side.records[i])) for i in all_steps],
        steps=all_steps,
    )
    steps = [i for i in timed if i in side.records]
    if not steps:
        return out
    plans = [side.plans[i] for i in steps]
    times = [max(r["wall_s"] for r in side.records[i]) for i in steps]
    tokens = [p.num_tokens for p in plans]
    flops = [step_flops(m, num_tokens=p.num_tokens, sum_sq_seqlens=p.sum_sq_seqlens) for p in plans]
    if side.schedule == "megatron":
        per_stage = m.num_layers // cfg.parallel.pipeline
        extra = [megatron_recompute_flops(m, p, side.recompute, layers_per_stage=per_stage) for p in plans]
    else:
        extra = [chunkflow_recompute_flops(m, p, side.k) for p in plans]
    bubbles = [1.0 - statistics.fmean(r["busy_s"] / max(r["run_wall_s"], 1e-9) for r in side.records[i])
               for i in steps]
    out.update(
        tokens_per_s=sum(tokens) / sum(times),
        tokens_per_s_spread=_spread([t / s for t, s in zip(tokens, times)]),
        tflops_per_s=sum(flops) / sum(times) / 1e12,
        step_time_s=times,
        bubble_fraction=statistics.fmean(bubbles),  # not clamped: < 0 means busy > wall, a bug
        bubble_fraction_per_step=bubbles,
        recompute_overhead=sum(extra) / sum(flops),
        micro_batches_per_step=[sum(1 for rows in p.rows_per_rank for row in rows if len(row)) for p in plans],
        time_breakdown_s=time_breakdown(cfg, side, steps),
    )
    return out


def check_losses(reference: dict, others: Sequence[dict], rtol: float) -> dict:
    """Every side's per-step loss and gradient norm against the reference's, relative."""
    worst_loss = worst_grad = 0.0
    per_side = []
    ref = dict(zip(reference["steps"], zip(reference["losses"], reference["grad_norms"])))
    for side in others:
        d_loss = d_grad = 0.0
        for i, loss, gn in zip(side["steps"], side["losses"], side["grad_norms"]):
            if i not in ref:
                continue
            d_loss = max(d_loss, abs(loss - ref[i][0]) / max(abs(ref[i][0]), 1e-30))
            d_grad = max(d_grad, abs(gn - ref[i][1]) / max(abs(ref[i][1]), 1e-30))
        per_side.append({"name": side["name"], "max_rel_loss_diff": d_loss, "max_rel_grad_norm_diff": d_grad,
                         "ok": d_loss <= rtol and d_grad <= rtol})
        worst_loss, worst_grad = max(worst_loss, d_loss), max(worst_grad, d_grad)
    return {"ok": all(s["ok"] for s in per_side), "rtol": rtol, "reference": reference["name"],
            "max_rel_loss_diff": worst_loss, "max_rel_grad_norm_diff": worst_grad, "sides": per_side}


def _workload(cfg: Config, megatron: Any, chunkflow: Any, timed: Sequence[int], data_desc: str) -> dict:
    steps = []
    for i in timed:
        mp, cp = megatron.plans[i], chunkflow.plans[i]
        longest = max((int(n) for row in mp.rows() for n in row.seqlens), default=0)
        steps.append({"samples": mp.num_samples, "tokens": mp.num_tokens, "longest": longest,
                      "megatron_micro_batches": mp.num_rows, "chunkflow_chunks": cp.num_rows,
                      "chunkflow_dependent_chunks": cp.num_dependent_rows})
    return {"data": data_desc, "global_batch_size": cfg.data.global_batch_size,
            "max_seq_len": cfg.data.max_seq_len, "timed_steps": steps}


def build_report(cfg: Config, ctx: Any, *, megatron: Any, tried: Sequence[Any], points: Sequence[Any],
                 chosen: Any, timed: Sequence[int], selection: Sequence[int], warmup: Sequence[int],
                 machine: dict, data_desc: str, argv: Optional[list[str]] = None) -> dict:
    """``chosen``: the ChunkFlow point scored on ``timed`` (in sweep mode chosen on the
    disjoint ``selection`` batches; the sweep's figures are those selection batches')."""
    from chunkflow.verify import TOLERANCE

    mg = summarise(megatron, cfg, timed)
    cf = summarise(chosen, cfg, timed)
    sweep = [summarise(p, cfg, selection) if p is not chosen else {**summarise(p, cfg, selection), "chosen": True}
             for p in points] if cfg.bench.sweep else []
    paired = [max(r["wall_s"] for r in megatron.records[i]) / max(r["wall_s"] for r in chosen.records[i])
              for i in timed]
    candidates = [summarise(s, cfg, timed) if s is not megatron else mg for s in tried]
    b = cfg.bench
    return {
        "mode": "sweep" if b.sweep else "single",
        "speedup": cf["tokens_per_s"] / mg["tokens_per_s"],
        "speedup_per_step": {**_spread(paired), "values": paired},
        "speedup_median_ci": bootstrap_median_ci(paired, resamples=b.bootstrap_resamples, seed=cfg.data.seed),
        "predicted_speedup": predicted_speedup(cfg, megatron, chosen, timed),
        "batches": {"warmup": list(warmup), "selection": list(selection), "timed": list(timed),
                    "note": ("the (C, K) was chosen on the selection batches and scored on the timed ones"
                             if b.sweep else "one configured (C, K): no selection")},
        "both_fit_budget": mg["fits_budget"] and cf["fits_budget"],
        "memory_budget_mb": cfg.bench.memory_budget_mb,
        "peak_mem_budget_mb": cfg.bench.peak_mem_budget_mb,
        "megatron": mg,
        "chunkflow": cf,
        "megatron_candidates": [{k: c.get(k) for k in ("name", "recompute", "fits_budget", "out_of_memory", "skipped",
                                                       "peak_activation_bytes", "peak_activation_breakdown",
                                                       "peak_mem_bytes", "timed")} for c in candidates],
        "sweep": sweep,
        "loss_check": check_losses(mg, [c for c in candidates if c is not mg and c["losses"]]
                                   + ([s for s in sweep if s["losses"]] or [cf]),
                                   TOLERANCE[cfg.model.dtype]),
        "workload": _workload(cfg, megatron, chosen, timed, data_desc),
        "steps": {"warmup": len(warmup), "selection": len(selection), "timed": len(timed)},
        "config": config_to_dict(cfg),
        "machine": machine,
        "command": " ".join(argv) if argv else None,
    }


def machine_description(cfg: Config, ctx: Any) -> dict:
    import torch

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # pragma: no cover
        mcore = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:  # pragma: no cover
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            mem_total = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover
        pass
    out = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem_total, "torch": torch.__version__, "megatron_core": mcore,
        "device": str(ctx.device), "world_size": ctx.world_size,
        "threads_per_rank": torch.get_num_threads() if ctx.device.type == "cpu" else None,
        "dtype": cfg.model.dtype, "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if ctx.device.type == "cuda":  # pragma: no cover - GPU only
        out["gpu"] = torch.cuda.get_device_name(ctx.device)
    out.update(_git_state())
    return out


def _git_state() -> dict:
    """The chunkflow checkout's commit and whether it has local changes (best effort)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    if head.returncode != 0:
        return {}
    return {"git_commit": head.stdout.strip(), "git_modified_files": len(status.stdout.splitlines())}


def _row(s: dict) -> str:
    sp = s.get("tokens_per_s_spread") or {}
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    return (f"{s['name']:<30} {'yes' if s['fits_budget'] else 'NO':>4} {fmt(s.get('tokens_per_s'), '9.0f')} "
            f"{fmt(sp.get('min'), '7.0f')}-{fmt(sp.get('max'), '<7.0f')} {fmt(s.get('tflops_per_s'), '7.4f')} "
            f"{fmt(s.get('bubble_fraction'), '6.3f')} {fmt(s.get('recompute_overhead'), '9.3f')} "
            f"{fmt(s['peak_activation_bytes'] and s['peak_activation_bytes'] / MIB, '9.1f')} "
            f"{fmt(s['peak_mem_bytes'] and s['peak_mem_bytes'] / MIB, '9.1f')}")


def format_table(report: dict) -> str:
    head = (f"{'side':<30} {'fits':>4} {'tokens/s':>9} {'min-max per step':>15} {'TFLOP/s':>7} "
            f"{'bubble':>6} {'recompute':>9} {'act MiB':>9} {'peak MiB':>9}")
    lines = [head, "-" * len(head)]
    names = set()
    for s in [report["megatron"], report["chunkflow"]] + list(report["sweep"]):
        if s["name"] not in names:
            names.add(s["name"])
            lines.append(_row(s))
    for c in report["megatron_candidates"]:
        if c["timed"]:
            continue
        what = ("out of device memory" if c["out_of_memory"] else f"not run: {c['skipped']}" if c.get("skipped")
                else f"activations {c['peak_activation_bytes'] / MIB:.1f} MiB")
        lines.append(f"{c['name']:<30} {'yes' if c['fits_budget'] else 'NO':>4}  (probe only: {what})")
    lines += ["", f"{'time per step (s)':<30} " + " ".join(f"{p:>13}" for p in PARTS + ("wall",))]
    for s in (report["megatron"], report["chunkflow"]):
        tb = s.get("time_breakdown_s") or {}
        lines.append(f"{s['name']:<30} " + " ".join(f"{tb.get(p, 0.0):13.2f}" for p in PARTS + ("wall",)))
    budget = report["memory_budget_mb"]
    sp, lc, ci = report["speedup_per_step"], report["loss_check"], report["speedup_median_ci"]
    lines += [
        "",
        f"activation budget: {f'{budget:g} MiB per rank' if budget else 'none'}"
        + ("" if report["both_fit_budget"] else "  (WARNING: a compared side does not fit)"),
        f"speedup ({report['chunkflow']['name']} over {report['megatron']['name']}): {report['speedup']:.3f}x "
        f"(per step {sp['min']:.3f}-{sp['max']:.3f})",
        f"median per-batch speedup {ci['median']:.3f}x, bootstrap {ci['level']:.0%} interval "
        f"[{ci['low']:.3f}, {ci['high']:.3f}] over {ci['n']} batches; simulator predicted "
        f"{report['predicted_speedup']['median']:.3f}x; {report['batches']['note']}",
        f"loss check: {'OK' if lc['ok'] else 'FAIL'} (max relative loss diff {lc['max_rel_loss_diff']:.2e}, "
        f"grad norm {lc['max_rel_grad_norm_diff']:.2e}, tolerance {lc['rtol']:g})",
    ]
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def plot_sweep(report: dict, path: str | Path) -> Optional[Path]:
    """Throughput and peak activation memory against C, one line per K (sweep mode)."""
    if not report["sweep"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    measured = [s for s in report["sweep"] if s.get("tokens_per_s") is not None]
    ks = sorted({s["k"] for s in measured})
    for k in ks:
        pts = sorted((s for s in measured if s["k"] == k), key=lambda s: s["chunk_size"])
        cs = [s["chunk_size"] for s in pts]
        line, = ax_t.plot(cs, [s["tokens_per_s"] for s in pts], marker="o", label=f"K={k}")
        ax_m.plot(cs, [s["peak_activation_bytes"] / MIB for s in pts], marker="o", color=line.get_color(), label=f"K={k}")
        for s in pts:  # hollow marker: over the budget
            if not s["fits_budget"]:
                for ax, y in ((ax_t, s["tokens_per_s"]), (ax_m, s["peak_activation_bytes"] / MIB)):
                    ax.plot([s["chunk_size"]], [y], marker="o", mfc="white", color=line.get_color())
    mg = report["megatron"]
    ax_t.axhline(mg["tokens_per_s"], color="k", ls="--", label=mg["name"])
    ax_m.axhline(mg["peak_activation_bytes"] / MIB, color="k", ls="--", label=mg["name"])
    if report["memory_budget_mb"]:
        ax_m.axhline(report["memory_budget_mb"], color="r", ls=":", label="budget")
    for ax, title in ((ax_t, "throughput (tokens/s)"), (ax_m, "peak activation memory per rank (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk size C (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=8)
    ax_t.legend(fontsize=8)
    fig.suptitle("ChunkFlow (C, K) on the selection batches vs Megatron on the timed ones")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
