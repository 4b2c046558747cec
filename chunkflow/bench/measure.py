"""What the benchmark measures besides time: memory, and the FLOPs spent on recompute.

Memory, per rank and per step
-----------------------------
* **activation bytes** (the budgeted quantity, deterministic for a batch and schedule):
  the peak of bytes autograd saves for backward (:class:`SavedTensorMeter`, parameters
  excluded), plus for ChunkFlow what its schedule holds outside autograd: the K/V state
  store (stored K/V and their gradients) and, with a pipeline, each stage's cached
  inputs of chunks forwarded without a graph (:func:`input_cache_peak_bytes`). The parts
  are summed peak by peak, an upper bound: ChunkFlow is never under-counted.
* **process memory** (:class:`chunkflow.train.metrics.PeakMemory`, the project's one
  peak-memory reader): on GPU the peak allocated device memory; on CPU the peak resident
  set size during the step, read from ``VmHWM`` after resetting it and returning free
  heap pages to the OS (``reset(trim=True)``) just before the step, so one side's freed
  memory does not show up as the next side's. Includes weights, gradients and transient
  buffers (logits).

Recompute FLOPs (the FLOP formula of :mod:`chunkflow.data.flops`)
------------------------------------------------------------------
Extra forward work a schedule does beyond forward + backward, per global batch, with
``pairs`` the causal (query, key) pairs (:func:`~chunkflow.data.flops.causal_pairs`)::

    megatron  none       0
              selective  core attention forward: 4 L h * sum over samples of pairs(len)
              full       every transformer layer forward (not embedding / output layer)
    chunkflow            each Recompute(chunk) of the K-bounded plan: the chunk's whole
                         forward, its attention over its K/V prefix P included:
                         pairs(c, P) = c P + c (c + 1) / 2 for a chunk of c tokens

reported as a share of the step's model training FLOPs (3 x forward), so full recompute
shows ~0.3 and ChunkFlow shows the forward of the first N - K chunks of long samples.
"""

from __future__ import annotations

from typing import Sequence

from chunkflow.config.schema import ModelConfig
from chunkflow.data.flops import attention_flops_per_pair, causal_pairs, forward_flops, step_pairs
from chunkflow.data.plan import StepPlan
from chunkflow.data.types import PackedRow
from chunkflow.scheduling.plan import Forward, Recompute, plan_single_stage

__all__ = [
    "megatron_recompute_flops",
    "chunkflow_recompute_flops",
    "input_cache_peak_bytes",
]


def megatron_recompute_flops(m: ModelConfig, plan: StepPlan, recompute: str, *,
                             layers_per_stage: int = 0) -> float:
    """Extra forward FLOPs of megatron's activation recompute over one global batch.

    ``recompute``: none | selective | full | block:n (the first n of the
    ``layers_per_stage`` layers of every stage: n / layers_per_stage of full's FLOPs).
    """
    if recompute == "none":
        return 0.0
    pairs = step_pairs(num_tokens=plan.num_tokens, sum_sq_seqlens=plan.sum_sq_seqlens)
    if recompute == "selective":  # recompute_modules=["core_attn"]
        return attention_flops_per_pair(m) * pairs
    full = forward_flops(m, num_tokens=plan.num_tokens, num_pairs=pairs, output_layer=False)
    if recompute == "full":  # every layer, uniform, one layer per checkpoint
        return full
    if recompute.startswith("block:"):
        n = int(recompute.split(":", 1)[1])
        if not 0 < n <= layers_per_stage:
            raise ValueError(f"{recompute}: needs 1 <= n <= layers_per_stage={layers_per_stage}")
        return full * n / layers_per_stage
    raise ValueError(f"unknown recompute setting {recompute!r}")


def _row_pairs(row: PackedRow) -> int:
    """Causal pairs of a row: a dependent chunk against its prefix, else each sample."""
    if row.dependent:
        return causal_pairs(len(row), int(row.position_ids[0]))
    return sum(causal_pairs(int(n)) for n in row.seqlens)


def chunkflow_recompute_flops(m: ModelConfig, plan: StepPlan, k: int) -> float:
    """Extra forward FLOPs of ChunkFlow's ``Recompute`` actions over one global batch.

    Every pipeline stage recomputes the same chunks (its own layers), so the PP=1 plan of
    each data-parallel rank names them all.
    """
    total = 0.0
    for rows in plan.rows_per_rank:
        for act in plan_single_stage(rows, k) if rows else []:
            if isinstance(act, Recompute):
                row = rows[act.mb]
                total += forward_flops(m, num_tokens=len(row), num_pairs=_row_pairs(row))
    return total


def input_cache_peak_bytes(actions: Sequence[object], rows: Sequence[PackedRow], *, first_stage: bool,
                           hidden: int, bytes_per_value: int, seq_div: int = 1) -> int:
    """Peak bytes of a pipeline stage's recompute input cache (stage > 0 keeps the received
    ``(tokens / seq_div, 1, hidden)`` input of each no-graph Forward until its Recompute;
    the first stage recomputes from token ids it holds anyway)."""
    if first_stage:
        return 0
    current = peak = 0
    for act in actions:
        if isinstance(act, Forward) and not act.keep_graph:
            current += len(rows[act.mb]) // seq_div * hidden * bytes_per_value
            peak = max(peak, current)
        elif isinstance(act, Recompute):
            current -= len(rows[act.mb]) // seq_div * hidden * bytes_per_value
    return peak
