"""Per-step metrics: FLOPs, MFU, peak memory, synchronised step time, ``metrics.jsonl``.

FLOPs come from :mod:`chunkflow.data.flops`, the project's one FLOP formula (model
FLOPs, causal attention counted as half of full attention as Megatron counts it,
recompute not counted). Every key the trainer writes is described in docs/metrics.md.

Per step, every rank contributes one row of :data:`RANK_STATS` (its busy and wall time
of the forward-backward, its synchronised step time, its peak memory) to a single
all-gather; the logging rank turns the gathered table into the record:

    step_time_s              max over ranks of the synchronised step time
    tokens_per_s             global-batch tokens / step_time_s           (cluster)
    tokens_per_s_per_gpu     tokens_per_s / world size                   (per GPU)
    mfu                      model FLOP/s per GPU / peak dense FLOP/s of the device
    peak_mem_*_bytes         max over ranks of this step's peak
    bubble_fraction          1 - mean over ranks of busy / wall          (not clamped)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from chunkflow.config.schema import ModelConfig
from chunkflow.data.flops import step_pairs, training_flops

__all__ = [
    "step_flops",
    "PEAK_TFLOPS",
    "device_peak_tflops",
    "resolve_peak_tflops",
    "mfu",
    "PeakMemory",
    "device_clock",
    "RANK_STATS",
    "gather_rank_stats",
    "throughput_metrics",
    "MetricsWriter",
]


def step_flops(m: ModelConfig, *, num_tokens: int, sum_sq_seqlens: int) -> float:
    """Training FLOPs of one step over whole samples with sum(len) = ``num_tokens`` and
    sum(len^2) = ``sum_sq_seqlens`` (:func:`chunkflow.data.flops.training_flops`)."""
    pairs = step_pairs(num_tokens=num_tokens, sum_sq_seqlens=sum_sq_seqlens)
    return training_flops(m, num_tokens=num_tokens, num_pairs=pairs)


# ---------------------------------------------------------------------------- MFU
# Peak dense (no 2:4 sparsity) bf16/fp16 tensor-core TFLOP/s per device, from the vendors'
# data sheets (which quote the sparse figure, twice these). First pattern that matches
# torch.cuda.get_device_name wins, so a specific name precedes its family.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989.0),
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),  # SXM and PCIe
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),  # not A10G, which differs
    (r"\bMI300X\b", 1307.0),
)


def device_peak_tflops(name: str) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of a device named ``name`` (None if not in the table)."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return tflops
    return None


def resolve_peak_tflops(override: float, device: torch.device) -> tuple[Optional[float], str]:
    """(peak TFLOP/s, where it came from): ``train.peak_tflops`` if > 0, else the table
    entry of this CUDA device; None on CPU or for a device the table does not know."""
    if override > 0:
        return float(override), "train.peak_tflops"
    if device.type != "cuda":
        return None, f"no peak for device type {device.type}; set train.peak_tflops"
    name = torch.cuda.get_device_name(device)  # pragma: no cover - GPU only
    peak = device_peak_tflops(name)  # pragma: no cover - GPU only
    return peak, (name if peak else f"{name} is not in PEAK_TFLOPS; set train.peak_tflops")  # pragma: no cover


def mfu(tflops_per_s_per_gpu: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved model TFLOP/s per GPU / the device's peak."""
    if not peak_tflops or peak_tflops <= 0:
        return None
    return tflops_per_s_per_gpu / peak_tflops


# ---------------------------------------------------------------------------- memory
def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover - exotic platforms
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _libc() if sys.platform.startswith("linux") else None
_HWM = re.compile(r"VmHWM:\s+(\d+)\s+kB")


class PeakMemory:
    """The one peak-memory reader (trainer, benchmark, scripts/memory_profile.py).

    ``source`` says what is read:

    * ``cuda``: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the
      device, reset by :meth:`reset` (``torch.cuda.reset_peak_memory_stats``).
    * ``vmhwm`` (Linux CPU): the process's resident-set high-water mark ``VmHWM``, reset
      by writing 5 to ``/proc/self/clear_refs``; with ``trim=True`` free heap pages are
      first returned to the OS (``malloc_trim``) so earlier freed memory does not count.
    * ``ru_maxrss`` (other CPUs): the process's lifetime peak RSS; it cannot be reset.

    On CPU there is no allocator cache: allocated and reserved are the same RSS figure.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.source = self._pick_source()
        self.before = 0  # current usage at the last reset

    @property
    def resettable(self) -> bool:
        return self.source != "ru_maxrss"

    def _pick_source(self) -> str:
        if self.device.type == "cuda":  # pragma: no cover - GPU only
            return "cuda"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            with open("/proc/self/status") as f:
                if _HWM.search(f.read()):
                    return "vmhwm"
        except OSError:
            pass
        return "ru_maxrss"

    def current(self) -> int:
        """Bytes in use now (allocated on GPU, resident set on CPU)."""
        if self.source == "cuda":  # pragma: no cover - GPU only
            return int(torch.cuda.memory_allocated(self.device))
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # pragma: no cover - no procfs
            return self.peak_allocated()

    def reset(self, *, trim: bool = False) -> None:
        """Start a new peak at the current usage (no-op for ``ru_maxrss``)."""
        if self.source == "cuda":  # pragma: no cover - GPU only
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source == "vmhwm":
            if trim and _LIBC is not None:
                _LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.before = self.current()

    def peak_allocated(self) -> int:
        """Peak bytes since :meth:`reset`: tensors on GPU, resident set on CPU."""
        if self.source == "cuda":  # pragma: no cover - GPU only
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source == "vmhwm":
            with open("/proc/self/status") as f:
                return int(_HWM.search(f.read()).group(1)) * 1024
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def peak_reserved(self) -> int:
        """Peak bytes held by the caching allocator on GPU; the RSS peak on CPU."""
        if self.source == "cuda":  # pragma: no cover - GPU only
            return int(torch.cuda.max_memory_reserved(self.device))
        return self.peak_allocated()


# ---------------------------------------------------------------------------- time
def device_clock(device: torch.device) -> float:
    """Host seconds after the device has finished all queued work (one synchronise on
    GPU): a difference of two readings is the time the device took, not the launches."""
    if device.type == "cuda":  # pragma: no cover - GPU only
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ---------------------------------------------------------------------------- gather
# One row per rank, in this order, gathered once per step.
RANK_STATS = ("pp_rank", "busy_s", "wall_s", "step_time_s", "peak_mem_allocated_bytes",
              "peak_mem_reserved_bytes")


def gather_rank_stats(ctx: Any, values: dict[str, float]) -> list[dict[str, float]]:
    """All-gather this rank's :data:`RANK_STATS` over the whole job: one collective of a
    ``(len(RANK_STATS),)`` float64 tensor on ``ctx.device``, one read back to the host.
    Byte counts are exact in float64 (below 2^53). Returns one dict per rank."""
    row = torch.tensor([float(values[k]) for k in RANK_STATS], dtype=torch.float64, device=ctx.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from chunkflow.parallel import comm

        table = torch.stack(comm.all_gather(row))
    else:
        table = row.unsqueeze(0)
    return [dict(zip(RANK_STATS, r)) for r in table.tolist()]


def throughput_metrics(
    stats: Sequence[dict[str, float]], *, num_tokens: int, flops: float, num_stages: int,
    peak_tflops: Optional[float],
) -> dict[str, Any]:
    """The timing, throughput, MFU, memory and bubble keys of a record from the per-rank
    stats of :func:`gather_rank_stats` (every rank is one GPU; docs/metrics.md)."""
    world = len(stats)
    step_time = max(s["step_time_s"] for s in stats)
    busy = [s["busy_s"] / s["wall_s"] if s["wall_s"] > 0 else 0.0 for s in stats]
    per_stage = []
    for stage in range(num_stages):
        mine = [b for b, s in zip(busy, stats) if int(s["pp_rank"]) == stage]
        per_stage.append(sum(mine) / len(mine) if mine else None)
    tokens_per_s = num_tokens / step_time if step_time > 0 else 0.0
    tflops_per_s = flops / step_time / 1e12 if step_time > 0 else 0.0
    peak_alloc = int(max(s["peak_mem_allocated_bytes"] for s in stats))
    return {
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / world,
        "tflops_per_s": tflops_per_s,
        "tflops_per_s_per_gpu": tflops_per_s / world,
        "mfu": mfu(tflops_per_s / world, peak_tflops),
        "peak_mem_bytes": peak_alloc,
        "peak_mem_allocated_bytes": peak_alloc,
        "peak_mem_reserved_bytes": int(max(s["peak_mem_reserved_bytes"] for s in stats)),
        "bubble_fraction": 1.0 - sum(busy) / world,
        "stage_busy_fraction": per_stage,
        "busy_fraction_max": max(busy),
        "world_size": world,
    }


# ---------------------------------------------------------------------------- writer
class MetricsWriter:
    """Appends one JSON object per step to ``<dir>/metrics.jsonl`` (on the logging rank)."""

    def __init__(self, output_dir: str | Path, enabled: bool, *, resume_step: Optional[int] = None):
        """A fresh file, or (``resume_step``) the existing one without the records of steps
        after it, which the resumed run writes again: no step appears twice."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step is not None and self.path.is_file():
                for line in self.path.read_text().splitlines():
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line)
                    except ValueError:  # a torn last line of a killed run
                        continue
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
