"""The Megatron baseline: packed (THD) micro-batches through megatron-core's own schedule.

``get_forward_backward_func()`` picks "no pipelining" for PP=1 and the stock 1F1B for
PP>1. Micro-batch lengths differ, so ``variable_seq_lengths`` is on and megatron sends
shapes ahead of activations. The per-token loss returns ``(loss_sum, num_tokens, ...)``;
megatron's ``finalize_model_grads`` all-reduces the token count over data-parallel ranks
and scales the gradients by its inverse, so the gradient is that of
``sum(per-token losses) / loss tokens in the global batch``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel import schedules as _schedules

from chunkflow.data.types import PackedRow
from chunkflow.train.batch import RowTensors, row_to_tensors
from chunkflow.train.loss import token_losses

__all__ = ["StepResult", "masked_loss", "MegatronSchedule"]


@dataclass
class StepResult:
    loss_sum: float  # sum of per-token losses on this rank (last stage), 0 elsewhere
    num_loss_tokens: int  # loss tokens this rank computed the loss of (last stage)
    busy_s: float  # seconds this rank spent in forward/backward compute
    wall_s: float


def masked_loss(loss_mask: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """megatron per-token loss: (sum of masked losses, number of loss tokens, report)."""
    losses = output.reshape(-1)
    losses = losses.to(torch.promote_types(losses.dtype, torch.float32))  # fp64 stays fp64
    mask = loss_mask.reshape(-1).to(losses.dtype)
    loss_sum = (losses * mask).sum()
    num = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num.detach().to(loss_sum.dtype)])
    return loss_sum, num, {"lm loss": report}


def forward_row(model: torch.nn.Module, b: RowTensors) -> torch.Tensor:
    """Per-token losses of one micro-batch (last stage) or its hidden states."""
    return token_losses(model, b)


@contextlib.contextmanager
def _timed_backward(busy: list[float]):
    """Time megatron's ``backward_step`` calls (compute only; p2p waits are outside it).

    The stock schedules look ``backward_step`` up in their module at call time, so
    swapping the module attribute for the duration of one step instruments exactly
    the backward compute without touching the schedule itself.
    """
    original = _schedules.backward_step

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            busy[0] += time.perf_counter() - t0

    _schedules.backward_step = timed
    try:
        yield
    finally:
        _schedules.backward_step = original


class MegatronSchedule:
    """Runs one step's micro-batches with megatron-core's stock forward-backward function."""

    name = "megatron"

    def __init__(self, model: Any, device: torch.device):
        self.model = model
        self.device = device
        self.forward_backward = get_forward_backward_func()

    def run(self, rows: Sequence[PackedRow]) -> StepResult:
        tensors = [row_to_tensors(r, self.device) for r in rows]
        busy = [0.0]

        def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
            b = next(data_iterator)
            t0 = time.perf_counter()
            out = forward_row(model, b)
            busy[0] += time.perf_counter() - t0
            return out, partial(masked_loss, b.loss_mask)

        t0 = time.perf_counter()
        with _timed_backward(busy):
            losses = self.forward_backward(
                forward_step_func=forward_step,
                data_iterator=iter(tensors),
                model=[self.model],
                num_microbatches=len(tensors),
                seq_length=max(len(r) for r in rows),
                micro_batch_size=1,
                forward_only=False,
            )
        wall = time.perf_counter() - t0
        loss_sum, num = 0.0, 0
        for item in losses or []:
            report = item["lm loss"]
            loss_sum += float(report[0])
            num += int(report[1])
        return StepResult(loss_sum=loss_sum, num_loss_tokens=num, busy_s=busy[0], wall_s=wall)
