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
from functools import partial
from typing import Any, Sequence

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel import schedules as _schedules

from chunkflow.data.types import PackedRow
from chunkflow.model.batch import RowTensors, row_to_tensors
from chunkflow.model.loss import masked_loss, token_losses
from chunkflow.scheduling.step import SpanTimer, StepResult

__all__ = ["MegatronSchedule"]


@contextlib.contextmanager
def _timed_backward(timer: SpanTimer):
    """Time megatron's ``backward_step`` calls (compute only; p2p waits are outside it).

    The stock schedules look ``backward_step`` up in their module at call time, so
    swapping the module attribute for the duration of one step instruments exactly
    the backward compute without touching the schedule itself.
    """
    original = _schedules.backward_step
    count = [0]  # 1F1B runs the backwards in micro-batch order

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = timer.start()
        try:
            return original(*args, **kwargs)
        finally:
            timer.stop(t0, kind="backward", mb=count[0])
            count[0] += 1

    _schedules.backward_step = timed
    try:
        yield
    finally:
        _schedules.backward_step = original


class MegatronSchedule:
    """Runs one step's micro-batches with megatron-core's stock forward-backward function.

    ``pad_multiple``: rows are padded to a multiple of it (sequence parallelism needs the
    tensor size; see ``chunkflow.model.batch.row_to_tensors``).
    """

    name = "megatron"

    def __init__(self, model: Any, device: torch.device, *, pad_multiple: int = 1):
        self.model = model
        self.device = device
        self.pad_multiple = pad_multiple
        self.forward_backward = get_forward_backward_func()
        self.last_timeline: list[dict] = []  # the last step's compute spans (kind, mb, start, end)

    def run(self, rows: Sequence[PackedRow]) -> StepResult:
        tensors = [row_to_tensors(r, self.device, pad_multiple=self.pad_multiple) for r in rows]
        timer = SpanTimer(self.device)
        forwards = [0]

        def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
            b = next(data_iterator)
            t0 = timer.start()
            out = token_losses(model, b)
            timer.stop(t0, kind="forward", mb=forwards[0])
            forwards[0] += 1
            return out, partial(masked_loss, b.loss_mask)

        with _timed_backward(timer):
            losses = self.forward_backward(
                forward_step_func=forward_step,
                data_iterator=iter(tensors),
                model=[self.model],
                num_microbatches=len(tensors),
                seq_length=max(t.input_ids.shape[1] for t in tensors),
                micro_batch_size=1,
                forward_only=False,
            )
        busy, wall, self.last_timeline = timer.finish()
        reports = [item["lm loss"] for item in losses or []]
        loss_sum, num = 0.0, 0
        if reports:  # one read back to the host per step
            total = torch.stack(reports).sum(dim=0).tolist()
            loss_sum, num = float(total[0]), int(round(total[1]))
        return StepResult(loss_sum=loss_sum, num_loss_tokens=num, busy_s=busy, wall_s=wall)
