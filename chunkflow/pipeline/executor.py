"""Run the state-aware 1F1B action table (:mod:`chunkflow.pipeline.plan`) on megatron-core.

:class:`StateAwarePipelineSchedule` is a forward-backward function with the keyword
signature of megatron-core's ``forward_backward_pipelining_without_interleaving``, so a
Megatron-LM style loop can call it where it called ``get_forward_backward_func()``'s
result::

    fb = StateAwarePipelineSchedule(k=2)
    losses = fb(forward_step_func=forward_step, data_iterator=it, model=[model],
                num_microbatches=n, seq_length=c, micro_batch_size=1)

The one extra contract: every item the data iterator yields carries its chunk as a
:class:`~chunkflow.data.types.PackedRow` (``item["row"]`` or ``item.row``), because the
schedule must know, before running anything, which micro-batches are chunks of one long
sample. ``forward_step_func(data_iterator, model)`` is called with an iterator over that
single item (again for a recompute) and builds the model inputs from it (see
``chunkflow.train.batch.row_to_tensors``: dependent chunks run unpacked, batch 1); the
schedule wraps each call in the chunk's context (K/V prefix store, RoPE offset).

Every rank of a pipeline builds the same table from the same rows, so every receive has a
matching send (``check_progress`` proves the table deadlock-free). Execution:

* ``Comm``: post the group's sends and receives with ``batch_isend_irecv`` and wait.
  Tensors have the chunk's shape ``(tokens, 1, hidden)`` (tokens / tensor size with
  sequence parallelism), known on both ends from the row.
* ``Forward(mb, keep_graph)``: first stage from tokens, later stages from the received
  activation; a no-graph forward caches its input for the later ``Recompute``.
* ``Recompute(mb)``: forward again with a graph from the cached input (no messages).
* ``Backward(mb)``: the loss (last stage) or the received output gradient; the input's
  gradient goes out with the next ``Comm``.
* ``Free(sample)``: drop the long sample's K/V state on this stage.

Loss handling follows megatron: ``loss_func`` returns ``(loss, num_tokens, report)``
(per-token loss: summed, gradients divided by the global token count in
``finalize_model_grads``) or ``(loss, report)`` (divided by ``num_microbatches``).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from chunkflow.data.types import PackedRow
from chunkflow.parallel.distributed import ParallelContext
from chunkflow.pipeline.plan import Comm, build_pipeline_plan
from chunkflow.scheduling.executor import ChunkStepResult, _context, _rope_offset, _tensors
from chunkflow.scheduling.plan import Backward, Forward, Free, Recompute
from chunkflow.scheduling.state import StateStore, chunk_context
from chunkflow.train.loss import token_losses
from chunkflow.train.megatron_schedule import masked_loss

__all__ = ["StateAwarePipelineSchedule", "PipelineChunkFlowSchedule", "row_of"]


def row_of(item: Any) -> PackedRow:
    """The chunk a data-iterator item carries (``item["row"]`` or ``item.row``)."""
    row = item.get("row") if isinstance(item, dict) else getattr(item, "row", None)
    if not isinstance(row, PackedRow):
        raise TypeError("StateAwarePipelineSchedule needs every micro-batch item to carry its "
                        "chunk as item['row'] (a chunkflow PackedRow)")
    return row


def _unwrap(x: Any) -> Any:
    if isinstance(x, list):
        assert len(x) == 1, "the state-aware schedule does not support virtual pipeline chunks"
        return x[0]
    return x


class StateAwarePipelineSchedule:
    """Megatron-compatible forward-backward function running ChunkFlow's schedule."""

    def __init__(self, k: int, *, pp_group: Any = None):
        self.k = k
        self.pp_group = pp_group
        self.last_plan: Optional[Any] = None
        self.last_timeline: list[dict] = []
        self.busy_s = 0.0
        self.wall_s = 0.0
        self.kv_state_peak_bytes = 0

    def __call__(
        self, *, forward_step_func: Callable, data_iterator: Any, model: Any, num_microbatches: int,
        seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int] = None,
        forward_only: bool = False, collect_non_loss_data: bool = False,
        first_val_step: Optional[bool] = None, adjust_tensor_shapes_fn: Optional[Callable] = None,
        p2p_communicator: Any = None, pg_collection: Any = None, force_all_reduce: Optional[bool] = False,
    ) -> list:
        if micro_batch_size != 1:
            raise ValueError("ChunkFlow chunks are micro-batches of one packed row: micro_batch_size=1")
        model = _unwrap(model)
        data_iterator = _unwrap(data_iterator)
        items = [next(data_iterator) for _ in range(num_microbatches)]
        run = _Run(self, forward_step_func, model, items, num_microbatches, pg_collection)
        store = run.forward_only() if forward_only else run.forward_backward()
        if not forward_only and run.config.finalize_model_grads_func is not None:
            tokens = torch.tensor(run.num_tokens, dtype=torch.int, device=run.device)
            extra = {"force_all_reduce": True} if force_all_reduce else {}
            run.config.finalize_model_grads_func(
                [model], tokens if run.config.calculate_per_token_loss else None, **extra
            )
        self.wall_s = time.perf_counter() - run.t_start
        return store


class _Run:
    """State of one call: the stage's position, buffers, and the compute steps."""

    def __init__(self, owner: StateAwarePipelineSchedule, forward_step_func: Callable, model: Any,
                 items: list, num_microbatches: int, pg_collection: Any):
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_model_config

        self.owner, self.step_fn, self.model, self.items = owner, forward_step_func, model, items
        self.rows = [row_of(it) for it in items]
        self.config = get_model_config(model)
        self.group = owner.pp_group or (pg_collection.pp if pg_collection is not None
                                        else ps.get_pipeline_model_parallel_group())
        self.stage = dist.get_rank(self.group) if dist.is_initialized() else 0
        self.num_stages = dist.get_world_size(self.group) if dist.is_initialized() else 1
        self.first, self.last = self.stage == 0, self.stage == self.num_stages - 1
        self.module = getattr(model, "module", model)
        self.device = next(self.module.parameters()).device
        self.dtype = self.config.pipeline_dtype or self.config.params_dtype
        tp = ps.get_tensor_model_parallel_world_size()
        self.seq_div = tp if self.config.sequence_parallel else 1
        self.num_microbatches = num_microbatches
        self.store = StateStore()
        self.reports: list = []
        self.num_tokens = 0
        self.t_start = time.perf_counter()

    # ---------------------------------------------------------------- helpers
    def _shape(self, mb: int) -> tuple[int, int, int]:
        return (len(self.rows[mb]) // self.seq_div, 1, self.config.hidden_size)

    def _communicate(self, comm: Comm, outbox: dict, inbox: dict) -> None:
        ops, received = [], []
        for op in comm.ops:
            peer = dist.get_global_rank(self.group, op.peer)
            if op.op == "send":
                ops.append(dist.P2POp(dist.isend, outbox.pop((op.payload, op.mb)), peer, group=self.group))
            else:
                t = torch.empty(self._shape(op.mb), dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, t, peer, group=self.group))
                received.append(((op.payload, op.mb), t))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        inbox.update(received)

    def _forward(self, mb: int, inp: Optional[torch.Tensor], grad: bool, record: bool) -> torch.Tensor:
        """This stage's forward of micro-batch ``mb``: output activation, or the loss."""
        row = self.rows[mb]
        if len(row) == 0:  # an equalising empty row: nothing to run
            return torch.zeros(() if self.last else self._shape(mb), dtype=self.dtype,
                               device=self.device, requires_grad=grad)
        if inp is not None:
            self.module.set_input_tensor([inp])
        with chunk_context(_context(row, self.store), _rope_offset(row)), torch.set_grad_enabled(grad):
            output, loss_func = self.step_fn(iter([self.items[mb]]), self.model)
            if not self.last:
                return output
            outs = loss_func(output)
        if len(outs) == 3:
            loss, num_tokens, report = outs
            if not self.config.calculate_per_token_loss:
                loss = loss / num_tokens
        else:
            (loss, report), num_tokens = outs, None
        if not self.config.calculate_per_token_loss:
            loss = loss / self.num_microbatches
        if record:
            self.reports.append(report)
            self.num_tokens += int(num_tokens) if num_tokens is not None else 0
        return loss

    # ---------------------------------------------------------------- schedules
    def forward_backward(self) -> list:
        plan = build_pipeline_plan(self.rows, self.num_stages, self.owner.k)
        self.owner.last_plan = plan
        inbox: dict = {}
        outbox: dict = {}
        cached: dict[int, Optional[torch.Tensor]] = {}
        live: dict[int, tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        timeline: list[dict] = []
        busy = peak = 0.0
        for step in plan.stages[self.stage]:
            act = step.action
            if isinstance(act, Comm):
                self._communicate(act, outbox, inbox)
                continue
            t0 = time.perf_counter()
            if isinstance(act, Free):
                self.store.free(act.sample)
                continue
            mb = act.mb
            if isinstance(act, (Forward, Recompute)):
                keep = isinstance(act, Recompute) or act.keep_graph
                if isinstance(act, Forward):
                    inp = None if self.first else inbox.pop(("activation", mb))
                    if not keep:
                        cached[mb] = inp  # Recompute runs from this input later
                else:
                    inp = cached.pop(mb)
                if inp is not None and keep:
                    inp = inp.detach().requires_grad_(True)
                out = self._forward(mb, inp, keep, record=isinstance(act, Forward))
                if isinstance(act, Forward) and not self.last:
                    outbox[("activation", mb)] = out.detach()
                if keep:
                    live[mb] = (inp, out)
            else:  # Backward
                row = self.rows[mb]
                inp, out = live.pop(mb)
                grad = None if self.last else inbox.pop(("grad", mb))
                if self.last and self.config.grad_scale_func is not None:
                    out = self.config.grad_scale_func(out)
                with chunk_context(_context(row, self.store), _rope_offset(row)):
                    if out.requires_grad:
                        torch.autograd.backward(out, grad_tensors=grad)
                if not self.first:
                    outbox[("grad", mb)] = inp.grad if inp.grad is not None else torch.zeros_like(inp)
            end = time.perf_counter()
            busy += end - t0
            timeline.append({"kind": type(act).__name__.lower(), "mb": mb,
                             "graph": not isinstance(act, Forward) or act.keep_graph,
                             "start": t0 - self.t_start, "end": end - self.t_start})
            peak = max(peak, self.store.nbytes())
        assert not live and not outbox and not cached, "pipeline plan left work undone"
        self.owner.last_timeline, self.owner.busy_s = timeline, busy
        self.owner.kv_state_peak_bytes = int(peak)
        return self.reports if self.last else []

    def forward_only(self) -> list:
        """Evaluation: every chunk forward once, in order, without graphs."""
        t0 = time.perf_counter()
        for mb in range(len(self.rows)):
            inp = None
            if not self.first:
                inp = torch.empty(self._shape(mb), dtype=self.dtype, device=self.device)
                dist.recv(inp, dist.get_global_rank(self.group, self.stage - 1), group=self.group)
            out = self._forward(mb, inp, grad=False, record=True)
            if not self.last:
                dist.send(out.contiguous(), dist.get_global_rank(self.group, self.stage + 1), group=self.group)
            if self.rows[mb].dependent and self.rows[mb].chunk_index == self.rows[mb].num_chunks - 1:
                self.store.free(self.rows[mb].sample_ids[0])
        self.owner.busy_s = time.perf_counter() - t0
        return self.reports if self.last else []


class PipelineChunkFlowSchedule:
    """The trainer's runner for ``train.schedule: chunkflow`` with PP > 1: ``run(rows)``."""

    name = "chunkflow"

    def __init__(self, model: Any, ctx: ParallelContext, k: int):
        self.model, self.ctx = model, ctx
        self.fb = StateAwarePipelineSchedule(k, pp_group=ctx.pp_group)
        self.measure_memory = False

    @property
    def last_timeline(self) -> list[dict]:
        return self.fb.last_timeline

    @property
    def last_actions(self) -> list:
        plan = self.fb.last_plan
        return plan.actions(self.ctx.pp_rank) if plan is not None else []

    def run(self, rows: Sequence[PackedRow]) -> ChunkStepResult:
        device = self.ctx.device
        cache: dict[int, Any] = {}

        def forward_step(data_iterator: Iterator, model: Any) -> tuple[torch.Tensor, Callable]:
            item = next(data_iterator)
            b = cache.get(item["mb"])
            if b is None:
                b = cache[item["mb"]] = _tensors(item["row"], device)
            return token_losses(model, b), partial(masked_loss, b.loss_mask)

        items = [{"row": r, "mb": i} for i, r in enumerate(rows)]
        reports = self.fb(forward_step_func=forward_step, data_iterator=iter(items), model=[self.model],
                          num_microbatches=len(rows), seq_length=max(len(r) for r in rows),
                          micro_batch_size=1)
        loss_sum = sum(float(r["lm loss"][0]) for r in reports)
        num = sum(int(r["lm loss"][1]) for r in reports)
        return ChunkStepResult(loss_sum=loss_sum, num_loss_tokens=num, busy_s=self.fb.busy_s,
                               wall_s=self.fb.wall_s,
                               extra={"kv_state_peak_bytes": self.fb.kv_state_peak_bytes})
