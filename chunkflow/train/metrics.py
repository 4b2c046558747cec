"""Per-step metrics: model FLOPs, peak memory, and the ``metrics.jsonl`` writer.

FLOP convention (model FLOPs: recompute is *not* counted, so a run that recomputes
shows a lower ``tflops_per_s`` for the same work)::

    per real token, forward:  2 * (L * (h*(h + 2*g*d) + h*h + 3*h*f) + h*V)
    attention, forward:       L * 2 * h * sum_i(len_i^2)    (QK^T and AV, causal halved)
    training = 3 x forward   (backward = 2 x forward)

with L layers, hidden h, ffn f, g query groups of head dim d, vocab V and len_i the
length of each sample in the step (a dependent chunk's attention over its prefix is
counted as part of its sample, so chunked and unchunked runs count the same FLOPs).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from chunkflow.config.schema import ModelConfig

__all__ = ["step_flops", "peak_memory_bytes", "MetricsWriter"]


def step_flops(m: ModelConfig, *, num_tokens: int, sum_sq_seqlens: int) -> float:
    """Training FLOPs of one step over ``num_tokens`` real tokens (see module docstring)."""
    h, f, layers, vocab = m.hidden_size, m.ffn_hidden_size, m.num_layers, m.vocab_size
    d = h // m.num_attention_heads
    per_layer = h * (h + 2 * m.num_query_groups * d) + h * h + 3 * h * f
    dense = 2.0 * num_tokens * (layers * per_layer + h * vocab)
    attention = 2.0 * layers * h * float(sum_sq_seqlens)
    return 3.0 * (dense + attention)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":  # pragma: no cover - GPU only
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class MetricsWriter:
    """Appends one JSON object per step to ``<dir>/metrics.jsonl`` (on the logging rank)."""

    def __init__(self, output_dir: str | Path, enabled: bool, *, append: bool = False):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
