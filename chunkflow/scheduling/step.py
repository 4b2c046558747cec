"""What a schedule returns for one optimizer step, and how its compute is timed.

Both schedules (megatron's stock one and ChunkFlow's executor) return a
:class:`StepResult`, and both time their compute spans with one :class:`SpanTimer`:

* CPU: ``time.perf_counter`` around each span (the work is synchronous).
* CUDA: a pair of CUDA events per span on the current stream; nothing waits while the
  step runs, and :meth:`SpanTimer.finish` synchronises once at the end of the step and
  reads every span. A host timer alone would measure kernel launches, not compute.

A span is one forward, recompute or backward of one micro-batch; the spans' sum is the
stage's busy time, and ``1 - busy / wall`` its bubble.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["StepResult", "SpanTimer"]


@dataclass
class StepResult:
    loss_sum: float  # sum of per-token losses on this rank (last stage), 0 elsewhere
    num_loss_tokens: int  # loss tokens this rank computed the loss of (last stage)
    busy_s: float  # seconds this rank spent in forward/backward compute
    wall_s: float  # seconds from the step's first to its last compute span (synchronised)
    extra: dict = field(default_factory=dict)  # schedule-specific figures for metrics.jsonl


class SpanTimer:
    """Record compute spans of one step; read them once with :meth:`finish`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._spans: list[tuple[Any, Any, dict]] = []
        self._t0 = self._mark()

    def _mark(self) -> Any:
        if self.cuda:  # pragma: no cover - GPU only
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> Any:
        return self._mark()

    def stop(self, start: Any, **info: Any) -> None:
        """Close the span opened by ``start``; ``info`` (kind, mb, ...) goes to the timeline."""
        self._spans.append((start, self._mark(), info))

    def _seconds(self, a: Any, b: Any) -> float:
        if self.cuda:  # pragma: no cover - GPU only
            return a.elapsed_time(b) / 1000.0
        return b - a

    def finish(self) -> tuple[float, float, list[dict]]:
        """(busy seconds, wall seconds, timeline); synchronises the device once."""
        end = self._mark()
        if self.cuda:  # pragma: no cover - GPU only
            end.synchronize()
        timeline = [{**info, "start": self._seconds(self._t0, a), "end": self._seconds(self._t0, b)}
                    for a, b, info in self._spans]
        busy = sum(t["end"] - t["start"] for t in timeline)
        return busy, self._seconds(self._t0, end), timeline

