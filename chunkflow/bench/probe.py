"""Which memory probes to run where an out-of-memory error cannot be recovered.

A probe that runs out of device memory is caught on the rank that raised it
(:func:`chunkflow.bench.driver.guarded`). With one process that is the whole story; with
more, the other ranks may be waiting for the failed one in a p2p transfer or a collective
and stay there until the process group's timeout. On such layouts (a device other than
the CPU, more than one process) the benchmark probes *safely*:

- candidates run in order of growing memory: Megatron's ``full``, ``block:L-1`` ..
  ``block:1``, ``selective``, ``none``; ChunkFlow's (C, K) with C, then K, ascending;
- a candidate is not run when it keeps everything a candidate already over budget keeps
  (:func:`keeps_all_of`): its peak cannot be lower;
- a Megatron candidate is not run when an upper bound on its device peak
  (:func:`predicted_mem_peak`) is above the memory the ranks have.

``bench.safe_probes: auto`` turns this on exactly there; ``always`` / ``never`` force it.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["saved_levels", "keeps_all_of", "chunkflow_keeps_all_of", "predicted_mem_peak",
           "probes_unrecoverable", "device_capacity_bytes"]

INPUT_ONLY, ALL_BUT_CORE_ATTENTION, EVERYTHING = 0, 1, 2


def saved_levels(name: str, layers: int) -> tuple[int, ...]:
    """What each of a stage's ``layers`` keeps for backward under recompute ``name``:
    ``INPUT_ONLY`` (recomputed), ``ALL_BUT_CORE_ATTENTION`` (selective) or ``EVERYTHING``."""
    if name == "full":
        return (INPUT_ONLY,) * layers
    if name == "selective":
        return (ALL_BUT_CORE_ATTENTION,) * layers
    if name == "none":
        return (EVERYTHING,) * layers
    if name.startswith("block:"):
        n = int(name.split(":", 1)[1])  # the first n layers of the stage are recomputed
        return (INPUT_ONLY,) * n + (EVERYTHING,) * (layers - n)
    raise ValueError(f"unknown recompute candidate {name!r}")


def keeps_all_of(a: str, b: str, layers: int) -> bool:
    """Whether Megatron candidate ``a`` keeps, in every layer, at least what ``b`` keeps
    (so ``a``'s activation peak is at least ``b``'s on the same batches)."""
    return all(x >= y for x, y in zip(saved_levels(a, layers), saved_levels(b, layers)))


def chunkflow_keeps_all_of(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether ChunkFlow point ``a = (C, K)`` holds at least what ``b`` holds: chunks at
    least as long, and at least as many of a long sample's chunks alive at once."""
    return a[0] >= b[0] and a[1] >= b[1]


def _fully_saved(name: str, layers: int) -> int:
    """Layers keeping everything (selective counted as none: it keeps less than none)."""
    return sum(1 for level in saved_levels(name, layers) if level != INPUT_ONLY)


def predicted_mem_peak(name: str, measured: dict[str, tuple[int, int]], layers: int,
                       in_flight: int) -> Optional[int]:
    """An upper bound on Megatron candidate ``name``'s device peak from the candidates
    measured so far (``measured[name] = (activation peak, device peak)``, max over ranks).

    Along ``full`` -> ``block:L-1`` -> .. -> ``none`` each step keeps one more layer's
    activations for every micro-batch in flight (at most ``in_flight``: 1F1B keeps up to
    PP per stage). One layer's activations for one micro-batch are at most ``full``'s
    activation peak, which holds them while that layer is recomputed. So the bound is the
    highest measured point below ``name`` plus, per layer more, ``in_flight`` times that.
    A bound, not a fit: measured growth is not linear (on the long-tail benchmark the
    step block:1 -> none grew twice as much as full -> block:1). None: ``full`` not measured.
    """
    if "full" not in measured:
        return None
    target = _fully_saved(name, layers)
    below = [(_fully_saved(n, layers), mem) for n, (_, mem) in measured.items()
             if n != "selective" and _fully_saved(n, layers) <= target]
    base_layers, base_mem = max(below)
    per_layer = measured["full"][0] * max(in_flight, 1)
    return int(base_mem + per_layer * (target - base_layers))


def probes_unrecoverable(device: torch.device, world_size: int) -> bool:
    """Whether an out-of-memory error in one rank's probe could strand the others."""
    return device.type != "cpu" and world_size > 1


def device_capacity_bytes(device: torch.device, margin: float = 0.1) -> Optional[int]:
    """Device bytes this process may reach: what it holds now plus the device's free memory,
    less ``margin`` of the device's total (allocator fragmentation, other kernels' workspace).
    None on the CPU (no device limit to predict against)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)  # pragma: no cover - GPU only
    return int(torch.cuda.memory_allocated(device) + free - margin * total)  # pragma: no cover
