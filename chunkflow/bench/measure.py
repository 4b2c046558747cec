"""What the benchmark measures besides time: memory, and the FLOPs spent on recompute.

Memory, per rank and per step
-----------------------------
* **activation bytes** (the budgeted quantity, deterministic for a batch and schedule):
  the peak of bytes autograd saves for backward (:class:`SavedTensorMeter`, parameters
  excluded), plus for ChunkFlow what its schedule holds outside autograd: the K/V state
  store (stored K/V and their gradients) and, with a pipeline, each stage's cached
  inputs of chunks forwarded without a graph (:func:`input_cache_peak_bytes`). The parts
  are summed peak by peak, an upper bound: ChunkFlow is never under-counted.
* **process memory** (:class:`ProcessMemory`): on GPU the peak allocated device memory;
  on CPU the peak resident set size during the step, read from ``VmHWM`` after resetting
  it (``/proc/self/clear_refs``) and returning free heap pages to the OS
  (``malloc_trim``) just before the step, so one side's freed memory does not show up as
  the next side's. Includes weights, gradients and transient buffers (logits).

Recompute FLOPs (model-FLOP convention of :mod:`chunkflow.train.metrics`)
-------------------------------------------------------------------------
Extra forward work a schedule does beyond forward + backward, per global batch::

    megatron  none       0
              selective  core attention forward: L * 2 * h * sum(len^2)
              full       every transformer layer forward (not embedding / output layer)
    chunkflow            each Recompute(chunk) of the K-bounded plan: the chunk's whole
                         forward, attention counted against its prefix P:
                         L * 2 * h * ((P + c)^2 - P^2) for a chunk of c tokens

reported as a share of the step's model training FLOPs (3 x forward), so full recompute
shows ~0.3 and ChunkFlow shows the forward of the first N - K chunks of long samples.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import resource
import sys
from typing import Optional, Sequence

import torch

from chunkflow.config.schema import ModelConfig
from chunkflow.data.plan import StepPlan
from chunkflow.data.types import PackedRow
from chunkflow.scheduling.plan import Forward, Recompute, plan_single_stage

__all__ = [
    "ProcessMemory",
    "forward_flops",
    "megatron_recompute_flops",
    "chunkflow_recompute_flops",
    "input_cache_peak_bytes",
]


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover - exotic platforms
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _libc() if sys.platform.startswith("linux") else None
_HWM = re.compile(r"VmHWM:\s+(\d+)\s+kB")


class ProcessMemory:
    """Peak process memory over a region (see module docstring). ``source`` says how."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = self._pick_source()
        self.before = 0

    def _pick_source(self) -> str:
        if self.device.type == "cuda":  # pragma: no cover - GPU only
            return "cuda_max_memory_allocated"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            with open("/proc/self/status") as f:
                if _HWM.search(f.read()):
                    return "vmhwm"
        except OSError:
            pass
        return "ru_maxrss"  # not resettable: a process-lifetime peak

    def current(self) -> int:
        if self.device.type == "cuda":  # pragma: no cover - GPU only
            return int(torch.cuda.memory_allocated(self.device))
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # pragma: no cover - no procfs
            return self.peak()

    def start(self) -> None:
        """Reset the peak to the current usage (call right before the measured region)."""
        if self.device.type == "cuda":  # pragma: no cover - GPU only
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source == "vmhwm":
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.before = self.current()

    def peak(self) -> int:
        if self.device.type == "cuda":  # pragma: no cover - GPU only
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source == "vmhwm":
            with open("/proc/self/status") as f:
                return int(_HWM.search(f.read()).group(1)) * 1024
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)


def _per_layer(m: ModelConfig) -> int:
    h, d = m.hidden_size, m.hidden_size // m.num_attention_heads
    return h * (h + 2 * m.num_query_groups * d) + h * h + 3 * h * m.ffn_hidden_size


def forward_flops(m: ModelConfig, *, num_tokens: int, attention_sq: float, output_layer: bool = True) -> float:
    """Forward FLOPs of ``num_tokens`` tokens whose causal attention spans ``attention_sq``
    (sum of len^2 for whole samples; (P + c)^2 - P^2 for a chunk after a prefix P)."""
    dense = m.num_layers * _per_layer(m) + (m.hidden_size * m.vocab_size if output_layer else 0)
    return 2.0 * num_tokens * dense + 2.0 * m.num_layers * m.hidden_size * float(attention_sq)


def megatron_recompute_flops(m: ModelConfig, plan: StepPlan, recompute: str) -> float:
    """Extra forward FLOPs of megatron's activation recompute over one global batch."""
    if recompute == "none":
        return 0.0
    attention = 2.0 * m.num_layers * m.hidden_size * float(plan.sum_sq_seqlens)
    if recompute == "selective":  # recompute_modules=["core_attn"]
        return attention
    if recompute == "full":  # every layer, uniform, one layer per checkpoint
        return forward_flops(m, num_tokens=plan.num_tokens, attention_sq=plan.sum_sq_seqlens, output_layer=False)
    raise ValueError(f"unknown recompute setting {recompute!r}")


def _chunk_attention_sq(row: PackedRow) -> float:
    if row.dependent:
        prefix, c = int(row.position_ids[0]), len(row)
        return float((prefix + c) ** 2 - prefix**2)
    return float(sum(int(n) ** 2 for n in row.seqlens))


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
                total += forward_flops(m, num_tokens=len(row), attention_sq=_chunk_attention_sq(row))
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
