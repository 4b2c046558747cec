"""Where a side's step time goes, and what the pipeline simulator predicted.

Measured breakdown, per timed step, mean over the ranks of one pipeline (seconds)::

    compute      forward + backward spans (SpanTimer), minus the recompute below
    recompute    ChunkFlow: its Recompute spans. Megatron: recompute runs inside
                 backward_step, so it is estimated from FLOPs: a backward span that does
                 2F + rF work (r = recompute FLOPs / forward FLOPs) spends r / (2 + r) of
                 its time recomputing
    bubble       S - busy, kept within [0, run wall - busy]: S is the makespan that
                 pipeline/simulate.py gives the step's action table when each micro-batch
                 costs, on each stage, what it measured there and p2p is free, so S - busy
                 is the idle time the schedule itself imposes (stage imbalance included:
                 the last stage also runs the output layer and the loss)
    communication  the rest of the idle time, run wall - busy - bubble: p2p transfers
                 and waits beyond the ideal schedule, and host work between spans
                 (Python bookkeeping, batch tensors built inside the schedule)
    overhead     step wall - run wall: host work outside the schedule's timer (zeroing
                 gradient buffers, batch tensors built before the first span, the loss
                 read back)

The five parts add up to the mean step wall time over the ranks.

Predicted speedup: the same simulator with FLOP costs per stage (the decoder layers
split evenly over the stages, the output layer on the last; backward = 2x forward,
plus Megatron's recompute of its layers; ChunkFlow's recompute = a forward), megatron
makespan / chunkflow makespan per step, median.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from chunkflow.bench.measure import megatron_recompute_flops
from chunkflow.config.schema import Config
from chunkflow.data.assignment import CostModel
from chunkflow.data.flops import forward_flops, matmul_params, step_pairs
from chunkflow.pipeline.plan import build_pipeline_plan, plain_1f1b_plan
from chunkflow.pipeline.simulate import row_costs, simulate

__all__ = ["time_breakdown", "predicted_speedup", "stage_flops", "PARTS"]

PARTS = ("compute", "recompute", "bubble", "communication", "overhead")


def _recompute_ratio(cfg: Config, side: Any, i: int) -> float:
    """Megatron's recompute FLOPs / forward FLOPs for batch ``i`` (0 for ChunkFlow)."""
    if side.schedule != "megatron" or side.recompute == "none":
        return 0.0
    plan, m = side.plans[i], cfg.model
    fwd = forward_flops(m, num_tokens=plan.num_tokens,
                        num_pairs=step_pairs(num_tokens=plan.num_tokens, sum_sq_seqlens=plan.sum_sq_seqlens))
    per_stage = m.num_layers // cfg.parallel.pipeline
    return megatron_recompute_flops(m, plan, side.recompute, layers_per_stage=per_stage) / fwd


def _plan(cfg: Config, side: Any, i: int, n: int):
    if side.schedule == "megatron":
        return plain_1f1b_plan(n, cfg.parallel.pipeline)
    return build_pipeline_plan(side.plans[i].rows_per_rank[0], cfg.parallel.pipeline, side.k)


def time_breakdown(cfg: Config, side: Any, steps: Sequence[int]) -> dict:
    """Mean seconds per step of each of :data:`PARTS`, and ``wall`` (module docstring)."""
    totals = {k: 0.0 for k in PARTS + ("wall",)}
    for i in steps:
        recs = sorted((r for r in side.records[i] if r["dp_rank"] == 0 and r["tp_rank"] == 0),
                      key=lambda r: r["pp_rank"])  # one record per stage, in stage order
        n = recs[0]["micro_batches"]
        if n == 0:
            continue
        cost = {k: [[0.0] * n for _ in recs] for k in ("forward", "backward", "recompute")}
        for stage, r in enumerate(recs):
            for kind, mb, seconds in r["spans"]:
                if kind in cost and 0 <= mb < n:
                    cost[kind][stage][mb] += seconds
        rho = _recompute_ratio(cfg, side, i)
        ideal = simulate(_plan(cfg, side, i, n), cost["forward"], backward_cost=cost["backward"],
                         recompute_cost=cost["recompute"]).makespan
        for r in recs:
            spans = {k: sum(s for kind, _, s in r["spans"] if kind == k) for k in cost}
            rec = spans["recompute"] + spans["backward"] * rho / (2.0 + rho)
            idle = r["run_wall_s"] - r["busy_s"]
            bubble = min(max(ideal - r["busy_s"], 0.0), max(idle, 0.0))
            part = {"compute": r["busy_s"] - rec, "recompute": rec, "bubble": bubble,
                    "communication": idle - bubble, "overhead": r["wall_s"] - r["run_wall_s"],
                    "wall": r["wall_s"]}
            for k, v in part.items():
                totals[k] += v / len(recs) / len(steps)
    return totals


def stage_flops(cfg: Config, rows: Sequence[Any]) -> list[list[float]]:
    """Forward FLOPs of each row on each pipeline stage: the decoder layers' share
    (1 / PP each) plus, on the last stage, the output layer."""
    m, pp = cfg.model, cfg.parallel.pipeline
    cm = CostModel.from_model_config(m)  # a row's cost in tokens through every matmul
    per_token = 2.0 * matmul_params(m)
    head = 2.0 * (matmul_params(m) - matmul_params(m, output_layer=False))  # per token
    total = [c * per_token for c in row_costs(rows, cm)]
    decoder = [t - head * len(r) for t, r in zip(total, rows)]
    return [[d / pp + (head * len(r) if s == pp - 1 else 0.0) for d, r in zip(decoder, rows)] for s in range(pp)]


def predicted_speedup(cfg: Config, megatron: Any, chunkflow: Any, steps: Sequence[int]) -> dict:
    """The simulator's FLOP-cost prediction of megatron / chunkflow step time (median)."""
    pp, ratios = cfg.parallel.pipeline, []
    for i in steps:
        rows = [r for r in megatron.plans[i].rows_per_rank[0] if len(r)]
        fwd = stage_flops(cfg, rows)
        rho = _recompute_ratio(cfg, megatron, i)  # recompute FLOPs / forward FLOPs, all stages
        recompute = [rho * sum(st[j] for st in fwd) / pp for j in range(len(rows))]  # each stage its layers
        bwd = [[2.0 * f + r for f, r in zip(st, recompute)] for st in fwd]
        m_span = simulate(plain_1f1b_plan(len(rows), pp), fwd, backward_cost=bwd).makespan
        crows = chunkflow.plans[i].rows_per_rank[0]
        c_span = simulate(build_pipeline_plan(crows, pp, chunkflow.k), stage_flops(cfg, crows)).makespan
        ratios.append(m_span / c_span)
    return {"median": statistics.median(ratios), "per_step": ratios,
            "model": "pipeline/simulate.py, FLOP costs per stage (decoder layers split evenly, output layer "
                     "on the last stage), free p2p"}
