"""Megatron's stock schedule against ChunkFlow: same model, batches, layout and budget.

Every rank runs :func:`run_benchmark`; decisions are taken on numbers gathered from all
ranks, so every rank takes the same branch. One global batch list, one initial weight
state, several *sides* (a schedule with its settings)::

    batches : the first warmup_steps [+ selection_steps in sweep mode] + timed_steps
              global batches of the configured data
    plans   : Megatron packs each batch into rows of data.max_seq_len (THD);
              ChunkFlow cuts the same batch into chunks of C (one plan per C)
    probe   : every Megatron candidate (full, block:L-1..1, selective, none) runs the
              warm-up batches; of those whose activation peak fits bench.memory_budget_mb
              the one with the fewest recompute FLOPs is kept. Every ChunkFlow point
              (C, K) runs the warm-up batches too. A probe that runs out of device memory
              (torch.OutOfMemoryError) is reported as "does not fit" and the run goes on;
              where that could strand other ranks, probes that cannot fit are not run
              (bench.safe_probes, chunkflow/bench/probe.py).
    select  : sweep mode only: the fitting (C, K) points are timed round robin on the
              selection batches and the fastest is kept; the timed batches score it
    time    : for each timed batch, both sides in turn (round robin, the order reversed
              every other batch: background load hits both alike), all ranks released
              together by a barrier
    check   : every side's per-step loss and gradient norm equal Megatron's

No optimizer step: each step is forward + backward from the same initial weights, so all
sides do the same math and the loss check is exact (the optimizer's cost is the same for
both sides and is left out of the timing). Every model is built from one saved initial
state; sides that share a recompute setting share a model (ChunkFlow runs without
megatron recompute: K bounds its memory).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from chunkflow.bench.config import MIB, batch_roles, chunkflow_points, megatron_candidates, recompute_setting, validate_bench
from chunkflow.bench.measure import input_cache_peak_bytes, megatron_recompute_flops
from chunkflow.bench.probe import (chunkflow_keeps_all_of, device_capacity_bytes, keeps_all_of, predicted_mem_peak,
                                   probes_unrecoverable)
from chunkflow.config.schema import Config
from chunkflow.data.plan import StepPlan, plan_chunkflow_step, plan_megatron_step
from chunkflow.parallel import comm
from chunkflow.parallel.distributed import ParallelContext
from chunkflow.scheduling.memory import SavedTensorMeter
from chunkflow.train.metrics import PeakMemory
from chunkflow.train.progress import eta_seconds, format_duration

__all__ = ["Side", "run_benchmark", "bench_worker", "guarded"]


@dataclass
class Side:
    """One way to run the global batches, and what was measured (``records[step]`` holds
    one dict per rank, in rank order)."""

    schedule: str  # "megatron" | "chunkflow"
    recompute: str  # megatron's train.recompute ("none" for ChunkFlow)
    plans: list[StepPlan]
    chunk_size: Optional[int] = None
    k: Optional[int] = None
    built_schedule: Any = None  # the schedule object (run(rows) -> StepResult) of this side
    records: dict[int, list[dict]] = field(default_factory=dict)
    timed: bool = False
    oom: bool = False  # a probe ran out of device memory on some rank: does not fit
    skipped: Optional[str] = None  # safe probing: why this side was not run (it cannot fit)

    @property
    def name(self) -> str:
        if self.schedule == "megatron":
            return f"megatron recompute={self.recompute}"
        return f"chunkflow C={self.chunk_size} K={self.k}"

    def activation_peak(self) -> int:
        return max((r["activation_bytes"] for rs in self.records.values() for r in rs), default=0)

    def mem_peak(self) -> int:
        return max((r["mem_peak_bytes"] for rs in self.records.values() for r in rs), default=0)

    def fits(self, cfg: Config) -> bool:
        if self.oom or self.skipped:
            return False
        b = cfg.bench
        act_ok = b.memory_budget_mb <= 0 or self.activation_peak() <= b.memory_budget_mb * MIB
        mem_ok = b.peak_mem_budget_mb <= 0 or self.mem_peak() <= b.peak_mem_budget_mb * MIB
        return act_ok and mem_ok


class _Bench:
    def __init__(self, cfg: Config, ctx: ParallelContext, log: Callable[[str], None]):
        from chunkflow.data.assignment import CostModel
        from chunkflow.data.loader import GlobalBatchLoader
        from chunkflow.train.data_cache import load_run_samples

        self.cfg, self.ctx, self.log = cfg, ctx, log
        b, d = cfg.bench, cfg.data
        samples, self.data_desc = load_run_samples(cfg, ctx, log=log)
        loader = GlobalBatchLoader(samples, global_batch_size=d.global_batch_size, seed=d.seed, shuffle=d.shuffle)
        self.warmup, self.selection, self.timed = batch_roles(cfg)
        self.batches = [next(loader) for _ in range(len(self.warmup) + len(self.selection) + len(self.timed))]
        self.cost_model = CostModel.from_model_config(cfg.model)
        self.memory = PeakMemory(ctx.device)
        self.models: dict[str, Any] = {}
        self.init_state: Optional[dict] = None
        safe = cfg.bench.safe_probes
        self.safe = probes_unrecoverable(ctx.device, ctx.world_size) if safe == "auto" else safe == "always"
        capacity = device_capacity_bytes(ctx.device) if self.safe else None
        capacities = [c for c in comm.all_gather_object(capacity) if c is not None]
        self.capacity = min(capacities) if capacities else None  # the same on every rank

    # ------------------------------------------------------------------ plans, models
    def megatron_plans(self) -> list[StepPlan]:
        return [plan_megatron_step(b, dp_size=self.ctx.dp_size, max_seq_len=self.cfg.data.max_seq_len,
                                   cost_model=self.cost_model) for b in self.batches]

    def chunkflow_plans(self, chunk_size: int) -> list[StepPlan]:
        return [plan_chunkflow_step(b, dp_size=self.ctx.dp_size, chunk_size=chunk_size,
                                    cost_model=self.cost_model) for b in self.batches]

    def side_config(self, side: Side) -> Config:
        c = self.cfg
        recompute, num_layers = recompute_setting(side.recompute)
        train = dataclasses.replace(c.train, schedule=side.schedule, recompute=recompute,
                                    recompute_num_layers=num_layers)
        chunk = dataclasses.replace(c.chunkflow, chunk_size=side.chunk_size or c.chunkflow.chunk_size,
                                    k=side.k or c.chunkflow.k, mode="chunkflow")
        return dataclasses.replace(c, train=train, chunkflow=chunk)

    def model(self, recompute: str) -> Any:
        """The DDP-wrapped model for a recompute setting, built once, from the initial state."""
        if recompute in self.models:
            return self.models[recompute]
        from chunkflow.train.build import build_model_and_ddp

        setting, num_layers = recompute_setting(recompute)
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(
            self.cfg.train, recompute=setting, recompute_num_layers=num_layers))

        def prepare(model: torch.nn.Module) -> None:
            if self.init_state is None:
                if cfg.model.hf_dir:
                    from chunkflow.model.hf import load_hf_weights

                    load_hf_weights(model, cfg.model.hf_dir, cfg.model, tp_rank=self.ctx.tp_rank,
                                    tp_size=self.ctx.tp_size)
                self.init_state = {k: v.detach().clone() if torch.is_tensor(v) else v
                                   for k, v in model.state_dict().items()}
            else:
                model.load_state_dict(self.init_state)

        ddp, _ = build_model_and_ddp(cfg, self.ctx, prepare=prepare)
        self.models[recompute] = ddp
        return ddp

    def release(self, recompute: str) -> None:
        self.models.pop(recompute, None)
        gc.collect()

    def attach_schedule(self, side: Side) -> None:
        from chunkflow.train.build import build_schedule

        side.built_schedule = build_schedule(self.side_config(side), self.model(side.recompute), self.ctx)

    # ------------------------------------------------------------------ one step
    def step(self, side: Side, i: int) -> dict:
        """Run global batch ``i`` through ``side`` on this rank; returns this rank's record."""
        ctx, ddp = self.ctx, self.models[side.recompute]
        rows = side.plans[i].rows_per_rank[ctx.dp_rank]
        self.memory.reset(trim=True)
        dist.barrier()  # every rank starts the step together
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        with SavedTensorMeter(exclude=ddp.module) as meter:
            result = side.built_schedule.run(rows)
        wall = time.perf_counter() - t0
        extra = getattr(result, "extra", None) or {}
        cache = 0
        pipeline_plan = side.built_schedule.last.plan if getattr(side.built_schedule, "last", None) is not None else None
        # with chunkflow.offload_kv the cached inputs are stashed in the host pool (StateStore.stash)
        if side.schedule == "chunkflow" and pipeline_plan is not None and not self.cfg.chunkflow.offload_kv:
            mc = ddp.module.config
            cache = input_cache_peak_bytes(
                pipeline_plan.actions(ctx.pp_rank), rows, first_stage=ctx.is_first_stage,
                hidden=mc.hidden_size, bytes_per_value=torch.tensor([], dtype=mc.params_dtype).element_size(),
                seq_div=ctx.tp_size if mc.sequence_parallel else 1)
        kv_state = int(extra.get("kv_state_peak_bytes", 0))
        if side.schedule == "chunkflow":
            timeline = side.built_schedule.last.timeline
        else:
            timeline = getattr(side.built_schedule, "last_timeline", [])
        return {
            "rank": ctx.rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank, "tp_rank": ctx.tp_rank,
            "loss_rank": ctx.is_last_stage and ctx.tp_rank == 0,
            "wall_s": wall, "busy_s": float(result.busy_s), "run_wall_s": float(result.wall_s),
            "loss_sum": float(result.loss_sum), "num_loss_tokens": int(result.num_loss_tokens),
            "saved_activation_bytes": int(meter.peak_bytes), "kv_prefix_bytes": int(meter.peak_kv_bytes),
            "kv_state_bytes": kv_state, "input_cache_bytes": int(cache),
            "activation_bytes": int(meter.peak_bytes + meter.peak_kv_bytes + kv_state + cache),
            "mem_before_bytes": int(self.memory.before), "mem_peak_bytes": int(self.memory.peak_allocated()),
            "grad_sq": _grad_sq(ddp) if ctx.dp_rank == 0 else 0.0,
            "micro_batches": len(rows),
            # per micro-batch compute seconds by kind, for the time breakdown
            "spans": [(t["kind"], int(t.get("mb", -1)), t["end"] - t["start"]) for t in timeline],
        }

    def run_steps(self, side: Side, steps: list[int]) -> None:
        """Run ``steps`` through ``side``; an out-of-memory error on any rank marks the side
        as not fitting (``side.oom``) instead of ending the run."""
        local, oom = guarded(lambda: {i: self.step(side, i) for i in steps}, self.ctx.device)
        flags = comm.all_gather_object(oom is not None)
        if any(flags):
            side.oom = True
            self.log(f"probe  {side.name:<32} out of device memory -> does not fit ({oom or 'on another rank'})")
            return
        self.collect(side, local)

    def collect(self, side: Side, local: dict[int, dict]) -> None:
        gathered = comm.all_gather_object(local)
        for i in local:
            side.records[i] = [g[i] for g in gathered]

    # ------------------------------------------------------------------ phases
    def probe(self, side: Side, tried: list[Side]) -> None:
        if self.safe:
            side.skipped = self.cannot_fit(side, tried)
            if side.skipped:
                self.log(f"probe  {side.name:<32} not run: {side.skipped}")
                return
        self.attach_schedule(side)
        self.run_steps(side, self.warmup)
        if not side.oom:
            self.log(f"probe  {side.name:<32} activations {side.activation_peak() / MIB:9.1f} MiB  "
                     f"peak mem {side.mem_peak() / MIB:8.1f} MiB  -> "
                     f"{'fits' if side.fits(self.cfg) else 'over budget'}")

    def probe_megatron(self) -> tuple[Side, list[Side]]:
        """Probe every recompute candidate on the warm-up batches; keep the fitting one with
        the fewest recompute FLOPs (none fitting: the one with the smallest peak)."""
        plans = self.megatron_plans()
        tried = []
        for recompute in megatron_candidates(self.cfg):
            side = Side("megatron", recompute, plans)
            self.probe(side, tried)
            tried.append(side)
        fitting = [s for s in tried if s.fits(self.cfg)]
        ran = [s for s in tried if not s.oom and not s.skipped]
        if not ran:
            raise RuntimeError("every Megatron recompute candidate ran out of device memory")
        if fitting:
            per_stage = self.cfg.model.num_layers // self.cfg.parallel.pipeline
            chosen = min(fitting, key=lambda s: sum(megatron_recompute_flops(
                self.cfg.model, plans[i], s.recompute, layers_per_stage=per_stage) for i in self.warmup))
        else:
            chosen = min(ran, key=Side.activation_peak)
        for side in tried:  # keep the chosen model, and the recompute-free one ChunkFlow shares
            if side is not chosen:
                side.built_schedule = None
                if side.recompute != "none":
                    self.release(side.recompute)
        self.log(f"megatron: {chosen.name} ({'fits' if fitting else 'nothing fits; smallest peak'})")
        return chosen, tried

    def probe_chunkflow(self) -> list[Side]:
        sides, plans_by_c = [], {}
        for c, k in chunkflow_points(self.cfg):
            plans = plans_by_c.setdefault(c, self.chunkflow_plans(c))
            side = Side("chunkflow", "none", plans, chunk_size=c, k=k)
            self.probe(side, sides)
            sides.append(side)
        return sides

    def cannot_fit(self, side: Side, tried: list[Side]) -> Optional[str]:
        """Safe probing: why ``side`` cannot fit, judged from the sides probed before it
        (gathered numbers, so every rank answers the same); None = run it."""
        per_stage = self.cfg.model.num_layers // self.cfg.parallel.pipeline
        for other in tried:
            if other.skipped or other.schedule != side.schedule or other.fits(self.cfg):
                continue
            if side.schedule == "megatron":
                dominated = keeps_all_of(side.recompute, other.recompute, per_stage)
            else:
                dominated = chunkflow_keeps_all_of((side.chunk_size, side.k), (other.chunk_size, other.k))
            if dominated:
                return (f"keeps all that {other.name} keeps, which "
                        + ("ran out of device memory" if other.oom else "is over budget"))
        if side.schedule == "megatron" and self.capacity is not None:
            measured = {s.recompute: (s.activation_peak(), s.mem_peak()) for s in tried
                        if s.schedule == "megatron" and not s.oom and not s.skipped}
            predicted = predicted_mem_peak(side.recompute, measured, per_stage, in_flight=self.ctx.pp_size)
            if predicted is not None and predicted > self.capacity:
                return (f"predicted device peak {predicted / MIB:.0f} MiB exceeds the "
                        f"{self.capacity / MIB:.0f} MiB a rank has")
        return None

    def select_chunkflow(self, points: list[Side]) -> Side:
        """The (C, K) to score. Sweep: the fitting point with the most tokens/s on the
        selection batches (never on the timed ones); else the one configured point."""
        usable = [p for p in points if not p.oom and not p.skipped]
        if not usable:
            raise RuntimeError("every ChunkFlow point ran out of device memory")
        fitting = [p for p in usable if p.fits(self.cfg)] or usable
        if not self.selection or len(fitting) == 1:
            return fitting[0]
        self.time_round_robin(fitting, self.selection, label="select")

        def tokens_per_s(p: Side) -> float:
            return (sum(p.plans[i].num_tokens for i in self.selection)
                    / sum(max(r["wall_s"] for r in p.records[i]) for i in self.selection))

        # The selection batches' own peaks count too: a warm-up batch without a long sample
        # understates the K/V state a point needs.
        still = [p for p in fitting if p.fits(self.cfg)] or fitting
        best = max(still, key=tokens_per_s)
        self.log(f"select {best.name} ({tokens_per_s(best):.0f} tokens/s on {len(self.selection)} selection batches)")
        return best

    def time_round_robin(self, sides: list[Side], steps: list[int], label: str = "timed") -> None:
        local: dict[int, dict[int, dict]] = {id(s): {} for s in sides}
        t0 = time.perf_counter()
        for n, i in enumerate(steps):
            for side in (sides if n % 2 == 0 else sides[::-1]):  # alternate who goes first
                local[id(side)][i] = self.step(side, i)
            if self.ctx.rank == 0:  # progress: this phase's elapsed time and ETA
                elapsed = time.perf_counter() - t0
                eta = eta_seconds(elapsed, 0, n + 1, len(steps))
                self.log(f"{label}  batch {n + 1}/{len(steps)}: " + "  ".join(
                    f"{s.name} {local[id(s)][i]['wall_s']:.2f}s" for s in sides)
                    + f"  (elapsed {format_duration(elapsed)}, eta {format_duration(eta)})")
        for side in sides:
            self.collect(side, local[id(side)])
            side.timed = side.timed or label == "timed"


def guarded(fn: Callable[[], Any], device: torch.device) -> tuple[Any, Optional[str]]:
    """``(fn(), None)``, or ``(None, message)`` if ``fn`` ran out of device memory; then the
    failed step's tensors are dropped and the allocator's cache is returned to the device.

    On a pipeline the failing rank's peers may be waiting in a p2p for it; the error is
    caught on the rank that raised it (see docs/benchmarks.md for what this covers).
    """
    try:
        return fn(), None
    except torch.OutOfMemoryError as e:
        message = str(e).splitlines()[0] if str(e) else "torch.OutOfMemoryError"
    gc.collect()
    if device.type == "cuda":  # pragma: no cover - GPU only
        torch.cuda.empty_cache()
    return None, message


def _grad_sq(ddp: Any) -> float:
    """Sum of squared gradients of this rank's parameters (fp64)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in ddp.module.parameters():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None:
            total += g.detach().double().pow(2).sum().cpu()
    return float(total)


def run_benchmark(cfg: Config, ctx: ParallelContext, *, log: Callable[[str], None] = print,
                  argv: Optional[list[str]] = None) -> dict:
    """Run every side on this process group; returns the report (same dict on every rank)."""
    from chunkflow.bench.report import build_report, machine_description

    validate_bench(cfg)
    t_start = time.perf_counter()
    machine = machine_description(cfg, ctx)
    bench = _Bench(cfg, ctx, log if ctx.rank == 0 else (lambda _msg: None))
    bench.log(f"data: {bench.data_desc}; {len(bench.warmup)} warm-up + {len(bench.timed)} timed global "
              f"batches of {cfg.data.global_batch_size} samples; layout tp={ctx.tp_size} pp={ctx.pp_size} "
              f"dp={ctx.dp_size}; budget {cfg.bench.memory_budget_mb or 'none'} MiB")
    megatron, tried = bench.probe_megatron()
    points = bench.probe_chunkflow()
    chosen = bench.select_chunkflow(points)
    bench.time_round_robin([megatron, chosen], bench.timed)
    machine["loadavg_end"] = _loadavg()
    machine["elapsed_s"] = time.perf_counter() - t_start
    return build_report(cfg, ctx, megatron=megatron, tried=tried, points=points, chosen=chosen,
                        timed=bench.timed, selection=bench.selection, warmup=bench.warmup, machine=machine,
                        data_desc=bench.data_desc, argv=argv)


def _loadavg() -> Optional[list[float]]:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def bench_worker(rank: int, world: int, config: Optional[str], overrides: list[str],
                 argv: Optional[list[str]] = None) -> dict:
    """Entry of one spawned rank (``chunkflow.parallel.spawn.run_distributed``)."""
    import warnings

    warnings.filterwarnings("ignore")
    from chunkflow.config import load_config
    from chunkflow.parallel.distributed import destroy_distributed, init_distributed

    cfg = load_config(config, overrides)
    ctx = init_distributed(cfg)
    try:
        return run_benchmark(cfg, ctx, log=lambda m: print(m, flush=True), argv=argv)
    finally:
        destroy_distributed()
