"""Pick the chunk size C and K for the user: ``chunkflow.chunk_size: auto``, ``chunkflow.k: auto``.

Run once at start, on every rank, before the schedule is built (docs/autotune.md)::

    budget    train.memory_budget_mb; 0 = on GPU the device's free memory minus a margin
              (resolve_budget), on CPU an error
    profile   the real model stage runs one synthetic long sample, cut into dependent
              chunks, at two chunk sizes C1 and C2 = 2 C1 with K = 1 under the saved-tensor
              meter (a few seconds on CPU). Every rank measures its own stage and fits:
                act(n)   = a0 + a1 n     bytes saved for backward by one live chunk of n tokens,
                                         a1 per row kind (dependent chunk / packed row)
                q        bytes per key token a live dependent chunk saves (its K/V prefix + own)
                s_kv     bytes per token of a sample's K/V state buffers, K/V and gradient
                         accumulators (this stage's layers; allocated whole, num_chunks x C
                         tokens, at the sample's first chunk); s_grad 0 (not separable)
                t(row)   = t0 + t1 cost(row)   forward seconds; backward likewise
              (cost: the data layer's CostModel, tokens + attention pairs). The fits are
              gathered so every rank predicts every stage and takes the same decision.
    evaluate  for each candidate C, plan the first few global batches of the actual data
              (data/plan.py); for each K, walk every stage's action table
              (pipeline/plan.py) adding up live activations, saved prefixes, K/V state and
              the pipeline's cached inputs (StageMemory.peak), and simulate the step
              (pipeline/simulate.py) with the fitted times
    choose    the fastest candidate whose predicted memory fits the budget (ties: the
              smaller memory); none fits: a ConfigError naming the smallest memory needed

Predicted memory uses the benchmark's accounting (bench.memory_budget_mb): the peaks of
saved activations (K/V prefixes included), of the K/V state store and of the cached
inputs are summed, an upper bound, plus MEMORY_MARGIN. With ``chunkflow.offload_kv`` the K/V state on the
device is bounded by about one chunk's K/V per layer (C tokens) instead of the prefix,
and the cached inputs are stashed in the host pool (not charged).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from chunkflow.config.errors import ConfigError
from chunkflow.config.schema import AUTO, Config
from chunkflow.data.assignment import CostModel, estimate_cost
from chunkflow.data.plan import plan_chunkflow_step
from chunkflow.data.types import PackedRow, Sample
from chunkflow.pipeline.plan import build_pipeline_plan
from chunkflow.pipeline.simulate import chunk_rows, simulate
from chunkflow.scheduling.plan import Backward, Forward, Free, Recompute

__all__ = [
    "StageMemory",
    "StageTime",
    "Candidate",
    "needs_autotune",
    "candidate_grid",
    "evaluate",
    "choose",
    "format_table",
    "resolve_budget",
    "profile_stage",
    "fit_memory",
    "autotune",
    "MIB",
    "MEMORY_MARGIN",
    "GPU_MARGIN_FRACTION",
    "GPU_MARGIN_MIN_BYTES",
]

MIB = 2**20
# Default GPU budget: free memory after the model is built, minus Adam's two moments
# (allocated at the first optimizer step) and minus max(GPU_MARGIN_MIN_BYTES,
# GPU_MARGIN_FRACTION x device memory) for the allocator's fragmentation, logits and
# communication buffers.
GPU_MARGIN_FRACTION = 0.10
GPU_MARGIN_MIN_BYTES = 2 * 2**30
PLANNED_BATCHES = 4  # global batches planned per candidate C
K_CHOICES = (1, 2, 3, 4, 6, 8)
TINY = 16  # tokens of the chunks that time the per-chunk overhead
# Predicted memory is the walk's peak times (1 + MEMORY_MARGIN). The walk is exact to the
# byte on the CPU check (docs/autotune.md) where a dependent sample sets the peak; the
# margin covers fits extrapolated from one profiled C1 to other chunk sizes and data.
MEMORY_MARGIN = 0.02


@dataclass(frozen=True)
class StageMemory:
    """Fitted memory of one pipeline stage (bytes; see the module docstring)."""

    act_base: float  # a0
    act_per_token: float  # a1
    kv_saved_per_token: float  # q
    kv_state_per_token: float  # s_kv
    kv_grad_per_token: float  # s_grad
    input_per_token: float  # cached input of a no-graph forward (stages > 0; 0 on the first)
    # a1 of a packed standalone row (its own K/V saved inside, no prefix); None: act_per_token
    packed_per_token: Optional[float] = None

    def act(self, n: int, *, packed: bool = False) -> float:
        """Bytes one live graph of an n-token row saves: a dependent chunk's fit, or a
        packed standalone row's (each row kind is charged its own slope)."""
        slope = self.packed_per_token if packed and self.packed_per_token is not None else self.act_per_token
        return self.act_base + slope * n

    def peak(self, actions: Sequence[Any], rows: Sequence[PackedRow], *, offload_kv: bool = False) -> float:
        """Predicted peak bytes of a stage running ``actions`` over ``rows``: the peaks of
        live activations, of the K/V prefixes they saved, of the K/V state and of cached
        inputs, summed (the benchmark sums its measured parts peak by peak too). With
        ``offload_kv`` the cached inputs are stashed in the host pool (StateStore.stash)
        and the device holds about one chunk's K/V per layer."""
        live: dict[int, float] = {}  # mb -> activation bytes held by its graph
        keys: dict[int, tuple] = {}  # mb -> (sample, K/V prefix + own bytes its graph saved)
        stored: dict[Any, int] = {}  # long sample -> tokens in the K/V store
        cached = 0.0
        peak_live = peak_keys = peak_state = peak_cache = 0.0
        recomputed = {a.mb for a in actions if isinstance(a, Recompute)}
        for a in actions:
            if isinstance(a, Free):
                stored.pop(a.sample, None)
                continue
            row = rows[a.mb]
            n = len(row)
            if n == 0:
                continue
            sample = row.sample_ids[0] if row.dependent else None
            if isinstance(a, Forward):
                if row.dependent and sample not in stored:
                    # the store allocates a sample's K/V (and gradient) buffers whole, for
                    # num_chunks x C tokens, at its first chunk (executor: capacity)
                    size = int(row.position_ids[0]) // row.chunk_index if row.chunk_index else n
                    stored[sample] = row.num_chunks * size
                if not a.keep_graph and a.mb in recomputed:
                    cached += self.input_per_token * n
            if isinstance(a, Recompute):
                cached -= self.input_per_token * n
            if isinstance(a, Recompute) or (isinstance(a, Forward) and a.keep_graph):
                live[a.mb] = self.act(n, packed=not row.dependent)
                if row.dependent:
                    keys[a.mb] = (sample, self.kv_saved_per_token * (int(row.position_ids[0]) + n))
            elif isinstance(a, Backward):
                live.pop(a.mb, None)
                keys.pop(a.mb, None)
            tokens = sum(stored.values())
            if offload_kv:  # about one chunk's K/V per layer on the device
                tokens = min(tokens, max((len(r) for r in rows), default=0))
            peak_live = max(peak_live, sum(live.values()))
            saved: dict[Any, float] = {}  # a sample's live chunks share its stored K/V blocks
            for smp, b in keys.values():
                saved[smp] = max(saved.get(smp, 0.0), b)
            peak_keys = max(peak_keys, sum(saved.values()))
            peak_state = max(peak_state, (self.kv_state_per_token + self.kv_grad_per_token) * tokens)
            if not offload_kv:  # offloaded: stashed in the host pool, not on the device
                peak_cache = max(peak_cache, cached)
        return peak_live + peak_keys + peak_state + peak_cache


@dataclass(frozen=True)
class StageTime:
    """Fitted seconds of one chunk on the slowest stage: ``t0 + t1 x cost(row)``."""

    forward_base: float
    forward_per_cost: float
    backward_base: float
    backward_per_cost: float

    def forward(self, cost: float) -> float:
        return self.forward_base + self.forward_per_cost * cost

    def backward(self, cost: float) -> float:
        return self.backward_base + self.backward_per_cost * cost


@dataclass(frozen=True)
class Candidate:
    chunk_size: int
    k: int
    memory_bytes: float  # predicted peak per rank, max over stages, DP ranks and batches
    time_s: float  # predicted step time, mean over the planned batches
    bubble: float  # simulated bubble fraction, mean over the planned batches

    def fits(self, budget_bytes: float) -> bool:
        return self.memory_bytes <= budget_bytes


def needs_autotune(cfg: Config) -> bool:
    c = cfg.chunkflow
    return cfg.train.schedule == "chunkflow" and AUTO in (c.chunk_size, c.k)


def candidate_grid(cfg: Config, pad_multiple: int = 1) -> tuple[list[int], list[int]]:
    """Chunk sizes (powers of two from max_seq_len / 64, at least 64, up to max_seq_len;
    multiples of ``pad_multiple``) and K values to try; a number set in the config is
    the only candidate for that field. seco / spaco fix K = 1."""
    c, longest = cfg.chunkflow, cfg.data.max_seq_len
    if c.chunk_size != AUTO:
        sizes = [int(c.chunk_size)]
    else:
        low = max(64, longest // 64)
        sizes = [2**e for e in range(int(math.log2(low)), int(math.log2(longest)) + 1)
                 if low <= 2**e <= longest and 2**e % pad_multiple == 0]
        if not sizes:
            sizes = [longest - longest % pad_multiple or pad_multiple]
    if c.mode != "chunkflow":
        ks = [1]
    else:
        ks = [int(c.k)] if c.k != AUTO else list(K_CHOICES)
    return sizes, ks


def evaluate(
    batches: Sequence[Sequence[Sample]], *, chunk_sizes: Sequence[int], ks: Sequence[int], dp_size: int,
    num_stages: int, memory: Sequence[StageMemory], time: StageTime, cost_model: CostModel,
    offload_kv: bool = False, p2p_s: float = 0.0,
) -> list[Candidate]:
    """Predicted memory and time of every (C, K) on ``batches`` (pure). ``memory[s]`` is
    stage s's fit; ``p2p_s`` the seconds of one point-to-point transfer. A K above the
    most chunks any sample has behaves as that many and is skipped."""
    out = []
    for c in chunk_sizes:
        plans = [plan_chunkflow_step(b, dp_size=dp_size, chunk_size=c, cost_model=cost_model) for b in batches]
        most = max((r.num_chunks for p in plans for rows in p.rows_per_rank for r in rows if r.dependent),
                   default=1)
        for k in sorted(set(min(k, most) for k in ks)):
            mem, times, bubbles = 0.0, [], []
            for p in plans:
                step, bubble = 0.0, 0.0
                for rows in p.rows_per_rank:
                    rows = [r for r in rows if len(r)]
                    if not rows:
                        continue
                    pp = build_pipeline_plan(rows, num_stages, k)
                    for s in range(num_stages):
                        mem = max(mem, (1 + MEMORY_MARGIN) * memory[s].peak(pp.actions(s), rows,
                                                                            offload_kv=offload_kv))
                    costs = [estimate_cost(r, cost_model=cost_model) for r in rows]
                    tl = simulate(pp, [time.forward(x) for x in costs], [time.backward(x) for x in costs],
                                  p2p_latency=p2p_s)
                    if tl.makespan >= step:
                        step, bubble = tl.makespan, tl.bubble_fraction
                times.append(step)
                bubbles.append(bubble)
            out.append(Candidate(c, k, mem, float(np.mean(times)), float(np.mean(bubbles))))
    return out


def choose(candidates: Sequence[Candidate], budget_bytes: float) -> tuple[Candidate, list[Candidate]]:
    """(the fastest candidate that fits, the others that fit by time); raises
    ``ConfigError`` naming the smallest memory needed when none fits."""
    if not candidates:
        raise ValueError("no (C, K) candidates")
    fitting = sorted((c for c in candidates if c.fits(budget_bytes)), key=lambda c: (c.time_s, c.memory_bytes))
    if not fitting:
        least = min(candidates, key=lambda c: (c.memory_bytes, c.time_s))
        raise ConfigError(
            f"train.memory_budget_mb={budget_bytes / MIB:.0f} fits no (chunk_size, k): the smallest "
            f"predicted memory is {math.ceil(least.memory_bytes / MIB)} MiB (chunk_size={least.chunk_size}, "
            f"k={least.k}); raise train.memory_budget_mb to at least {math.ceil(least.memory_bytes / MIB)}, "
            f"add pipeline stages, or enable chunkflow.offload_kv")
    return fitting[0], fitting[1:]


def format_table(best: Candidate, others: Sequence[Candidate], budget_bytes: float, *, num_over: int = 0,
                 rows: int = 5) -> str:
    lines = [f"chunkflow auto: chunk_size={best.chunk_size} k={best.k}, predicted {best.memory_bytes / MIB:.0f} MiB "
             f"of {budget_bytes / MIB:.0f} MiB, {best.time_s:.3g} s/step (bubble {100 * best.bubble:.0f}%)",
             f"  {'C':>7} {'K':>3} {'memory MiB':>11} {'step s':>9} {'vs best':>8} {'bubble':>7}"]
    for c in [best, *others[: rows - 1]]:
        lines.append(f"  {c.chunk_size:>7} {c.k:>3} {c.memory_bytes / MIB:>11.0f} {c.time_s:>9.3g} "
                     f"{c.time_s / best.time_s:>7.2f}x {100 * c.bubble:>6.0f}%")
    if num_over:
        lines.append(f"  ({num_over} more candidates are predicted over the budget)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- on the real model
def resolve_budget(cfg: Config, ctx: Any, trainable_params: int) -> float:
    """Bytes a step may use per rank: ``train.memory_budget_mb``, or on GPU the free
    device memory minus Adam's moments (8 B per trainable parameter, / DP with the
    distributed optimizer) and max(2 GiB, 10% of the device); the minimum over ranks."""
    if cfg.train.memory_budget_mb > 0:
        return cfg.train.memory_budget_mb * MIB
    if ctx.device.type != "cuda":
        raise ConfigError("chunkflow.chunk_size/k = auto on CPU needs train.memory_budget_mb (MiB a step may "
                          "use beyond weights and optimizer state, e.g. train.memory_budget_mb=512)")
    import torch  # pragma: no cover - GPU only

    free, total = torch.cuda.mem_get_info(ctx.device)
    moments = 8 * trainable_params / (ctx.dp_size if cfg.train.distributed_optimizer else 1)
    budget = free - moments - max(GPU_MARGIN_MIN_BYTES, GPU_MARGIN_FRACTION * total)
    return float(min(_gather(ctx, budget)))


def _gather(ctx: Any, value: Any) -> list:
    import torch.distributed as dist

    if not dist.is_initialized() or ctx.world_size == 1:
        return [value]
    from chunkflow.parallel import comm

    return comm.all_gather_object(value)


def _line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope), both clamped at >= 0."""
    if len(set(x)) < 2:
        return 0.0, max(0.0, float(np.mean(y)) / max(float(np.mean(x)), 1e-12))
    slope, base = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    if base < 0:  # through the origin instead
        return 0.0, max(0.0, float(np.dot(x, y) / np.dot(x, x)))
    return float(base), max(0.0, float(slope))


def _fit_time(points: Sequence[tuple[int, float, float]]) -> tuple[float, float]:
    """(seconds per chunk, seconds per cost unit) through the fastest chunk of each length:
    timing noise on a shared machine only adds time, so the minimum is the estimate."""
    fastest: dict[int, tuple[float, float]] = {}
    for n, cost, t in points:
        if n not in fastest or t < fastest[n][1]:
            fastest[n] = (cost, t)
    costs, times = zip(*fastest.values())
    return _line(costs, times)


def profile_stage(cfg: Config, model: Any, ctx: Any, chunk_size: int, *,
                  cost_model: CostModel) -> tuple[StageMemory, dict]:
    """Measure this rank's stage: a long sample of 3 chunks of C1, 2 chunks of C2 = 2 C1,
    3 chunks of C1 again, and one standalone chunk of C2 followed by three tiny ones, with
    K = 1 (one graph of the long sample alive). Every rank of the run
    must call it (the pipeline communicates). Returns this stage's memory fit and the
    (tokens, cost, seconds) of its forwards and backwards."""
    import torch

    from chunkflow.train.build import build_schedule

    c1, c2 = chunk_size, 2 * chunk_size
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, schedule="chunkflow"),
                                  chunkflow=dataclasses.replace(cfg.chunkflow, chunk_size=c1, k=1, mode="chunkflow"))
    schedule = build_schedule(run_cfg, model, ctx)
    schedule.measure_memory = True
    rng = _rng_state(ctx.device)
    measured, points = [], {"forward": [], "backward": []}
    try:
        # The last run: one standalone chunk of C2, then TINY-token chunks that time the
        # fixed cost of a chunk (launches, framework) the per-cost fit cannot see.
        for c, n in ((c1, 3), (c2, 2), (c1, 3), (c2, 1)):
            rows = chunk_rows([n * c], c) + (chunk_rows([TINY], TINY) * 3 if n == 1 else [])
            model.zero_grad_buffer()
            result = schedule.run(rows)
            measured.append((c, n, result.extra))
            for iv in schedule.last_timeline:
                kind = "backward" if iv["kind"] == "backward" else "forward"
                row = rows[iv["mb"]]
                points[kind].append((len(row), estimate_cost(row, cost_model=cost_model), iv["end"] - iv["start"]))
    finally:
        model.zero_grad_buffer()
        _set_rng_state(rng, ctx.device)
    mc = getattr(model, "module", model).config
    value_bytes = torch.tensor([], dtype=mc.params_dtype).element_size()
    seq_div = ctx.tp_size if mc.sequence_parallel else 1
    inp = 0.0 if ctx.is_first_stage else mc.hidden_size * value_bytes / seq_div
    points["memory"] = [{"chunk_size": c, "chunks": n, **{k: v for k, v in e.items() if k in _MEASURED}}
                        for c, n, e in measured]
    return fit_memory(c1, measured[0][2], measured[1][2], measured[3][2], input_per_token=inp), points


_MEASURED = ("saved_activation_peak_bytes", "saved_kv_peak_bytes", "kv_state_peak_bytes")


def fit_memory(c1: int, e1: dict, e2: dict, standalone: dict, *, input_per_token: float) -> StageMemory:
    """The stage's memory fit from the profile's measured peaks (pure): ``e1`` one long
    sample of 3 dependent chunks of C1, ``e2`` of 2 chunks of C2 = 2 C1, ``standalone``
    one packed standalone row of C2 (plus three TINY rows), all with K = 1."""
    c2 = 2 * c1
    a0, a1 = _line([c1, c2], [e1["saved_activation_peak_bytes"], e2["saved_activation_peak_bytes"]])
    # A packed standalone row saves its own K/V inside its graph and sees no prefix: its
    # own slope, through the dependent fit's intercept (the TINY rows that may be alive
    # beside it are charged to it: a few tokens of over-estimate).
    packed = max(0.0, (standalone["saved_activation_peak_bytes"] - a0) / c2)
    # K/V store: a sample's K/V and gradient buffers are both sized for all its tokens
    # (3 C1, then 4 C1), so only their sum per token is seen; it is charged as s_kv.
    s_kv = max(e1["kv_state_peak_bytes"] / (3 * c1), e2["kv_state_peak_bytes"] / (4 * c1))
    s_grad = 0.0
    q = max(e1["saved_kv_peak_bytes"] / (3 * c1), e2["saved_kv_peak_bytes"] / (2 * c2))
    return StageMemory(a0, a1, q, s_kv, s_grad, input_per_token, packed)


def _rng_state(device: Any) -> tuple:
    import torch

    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    tracker = None
    if device.type == "cuda":  # pragma: no cover - GPU only
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker().get_states()
    return torch.get_rng_state(), cuda, tracker


def _set_rng_state(state: tuple, device: Any) -> None:
    import torch

    torch.set_rng_state(state[0])
    if state[1] is not None:  # pragma: no cover - GPU only
        torch.cuda.set_rng_state(state[1], device)
    if state[2] is not None:  # pragma: no cover - GPU only
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state[2])


def autotune(cfg: Config, model: Any, ctx: Any, samples: Sequence[Sample], *,
             log: Callable[[str], None] = print, trainable_params: int = 0) -> tuple[Config, dict]:
    """``cfg`` with ``chunkflow.chunk_size`` and ``k`` resolved (numbers from the config
    kept), and a report (budget, fits, every candidate). Every rank must call it."""
    from chunkflow.data.loader import GlobalBatchLoader
    from chunkflow.train.build import row_pad_multiple

    budget = resolve_budget(cfg, ctx, trainable_params)
    pad = row_pad_multiple(cfg)
    sizes, ks = candidate_grid(cfg, pad)
    cost_model = CostModel.from_model_config(cfg.model)
    # Profile where the choice is made: the candidate nearest max_seq_len / 8 (at least
    # 128); a per-cost fit from much smaller chunks overrates large ones on a CPU.
    c1 = min(sizes, key=lambda c: abs(math.log2(c) - math.log2(max(128, cfg.data.max_seq_len // 8))))
    c1 = max(pad, min(c1, max(64, cfg.data.max_seq_len // 2)) // pad * pad)
    mem, points = profile_stage(cfg, model, ctx, c1, cost_model=cost_model)
    gathered = _gather(ctx, (ctx.pp_rank, mem, points))
    memory = [StageMemory(*(max(getattr(m, f.name) for s, m, _ in gathered if s == stage)
                            for f in dataclasses.fields(StageMemory)))
              for stage in range(ctx.pp_size)]
    # Stages run the same chunks; the simulator takes one time per chunk: the slowest
    # stage's (the fit with the largest time for a C1 chunk).
    per_stage: dict[tuple[int, str], list] = {}
    for s, _, p in gathered:
        for kind in ("forward", "backward"):
            per_stage.setdefault((s, kind), []).extend(p[kind])
    slow = {kind: max((_fit_time(pts) for (_, kd), pts in per_stage.items() if kd == kind and pts),
                      key=lambda bt: bt[0] + bt[1] * c1) for kind in ("forward", "backward")}
    time = StageTime(*slow["forward"], *slow["backward"])
    d = cfg.data
    loader = GlobalBatchLoader(samples, global_batch_size=d.global_batch_size, seed=d.seed, shuffle=d.shuffle)
    batches = [next(loader) for _ in range(min(PLANNED_BATCHES, loader.batches_per_epoch))]
    candidates = evaluate(batches, chunk_sizes=sizes, ks=ks, dp_size=ctx.dp_size, num_stages=ctx.pp_size,
                          memory=memory, time=time, cost_model=cost_model, offload_kv=cfg.chunkflow.offload_kv)
    best, others = choose(candidates, budget)
    over = sum(1 for c in candidates if not c.fits(budget))
    log(format_table(best, others, budget, num_over=over))
    resolved = dataclasses.replace(cfg, chunkflow=dataclasses.replace(cfg.chunkflow, chunk_size=best.chunk_size,
                                                                      k=best.k))
    report = {"budget_bytes": budget, "profile_chunk_size": c1, "memory": [dataclasses.asdict(m) for m in memory],
              "time": dataclasses.asdict(time),
              "profile_peaks": {s: p["memory"] for s, _, p in gathered}, "chosen": dataclasses.asdict(best),
              "candidates": [dataclasses.asdict(c) for c in candidates]}
    return resolved, report
