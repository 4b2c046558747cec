"""Run the state-aware 1F1B action table (:mod:`chunkflow.pipeline.plan`) on one stage.

Every rank of a pipeline builds the same table from the same rows (the data plan is
identical on every rank), so each receive has a matching send by construction
(``check_progress`` proves the table deadlock-free). This module only executes:

* ``Comm``: post the group's sends and receives with ``batch_isend_irecv`` and wait.
  Activations and gradients have the chunk's shape ``(tokens, 1, hidden)`` (tokens /
  tensor size with sequence parallelism), known on both ends from the row.
* ``Forward(mb, keep_graph)``: first stage from tokens, later stages from the received
  activation; a no-graph forward caches its input for the later ``Recompute``.
* ``Recompute(mb)``: forward again, with a graph, from the cached input (no messages).
* ``Backward(mb)``: the loss (last stage) or the received output gradient; the input's
  gradient is sent by the next ``Comm``.
* ``Free(sample)``: drop the long sample's K/V state on this stage.

Gradients are scaled by 1 / (loss tokens of the global batch) by megatron's
``finalize_model_grads``, as in the Megatron baseline.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads

from chunkflow.data.types import PackedRow
from chunkflow.parallel.distributed import ParallelContext
from chunkflow.pipeline.plan import Comm, build_pipeline_plan
from chunkflow.scheduling.executor import ChunkStepResult, _context, _rope_offset, _tensors
from chunkflow.scheduling.plan import Backward, Forward, Free, Recompute
from chunkflow.scheduling.state import StateStore, chunk_context
from chunkflow.train.megatron_schedule import masked_loss
from chunkflow.train.loss import token_losses

__all__ = ["PipelineChunkFlowSchedule"]


class PipelineChunkFlowSchedule:
    """``run(rows)`` for ``train.schedule: chunkflow`` with PP > 1."""

    name = "chunkflow"

    def __init__(self, model: Any, ctx: ParallelContext, k: int, *, finalize: bool = True):
        self.model, self.ctx, self.k = model, ctx, k
        self.module = getattr(model, "module", model)
        cfg = self.module.config
        self.hidden = cfg.hidden_size
        self.dtype = cfg.pipeline_dtype or cfg.params_dtype
        self.seq_div = ctx.tp_size if cfg.sequence_parallel else 1
        self.finalize = finalize
        self.measure_memory = False
        self.last_plan: Optional[Any] = None
        self.last_timeline: list[dict] = []
        self.last_actions: list = []

    # -------------------------------------------------------------- communication
    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.ctx.pp_group, stage)

    def _shape(self, row: PackedRow) -> tuple[int, int, int]:
        return (len(row) // self.seq_div, 1, self.hidden)

    def _communicate(self, comm: Comm, rows: Sequence[PackedRow], outbox: dict, inbox: dict) -> None:
        ops, received = [], []
        for op in comm.ops:
            peer = self._peer(op.peer)
            if op.op == "send":
                tensor = outbox.pop((op.payload, op.mb))
                ops.append(dist.P2POp(dist.isend, tensor, peer, group=self.ctx.pp_group))
            else:
                tensor = torch.empty(self._shape(rows[op.mb]), dtype=self.dtype, device=self.ctx.device)
                ops.append(dist.P2POp(dist.irecv, tensor, peer, group=self.ctx.pp_group))
                received.append(((op.payload, op.mb), tensor))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        inbox.update(received)

    # -------------------------------------------------------------- compute
    def _forward(self, row: PackedRow, b: Any, inp: Optional[torch.Tensor], store: StateStore,
                 grad: bool) -> torch.Tensor:
        if inp is not None:
            self.module.set_input_tensor([inp])
        with chunk_context(_context(row, store), _rope_offset(row)), torch.set_grad_enabled(grad):
            if len(row) == 0:
                return torch.zeros((), device=self.ctx.device, requires_grad=grad)
            out = token_losses(self.model, b)
            if self.ctx.is_last_stage:
                return masked_loss(b.loss_mask, out)[0]
            return out

    def run(self, rows: Sequence[PackedRow]) -> ChunkStepResult:
        ctx = self.ctx
        plan = build_pipeline_plan(rows, ctx.pp_size, self.k)
        self.last_plan = plan
        steps = plan.stages[ctx.pp_rank]
        self.last_actions = plan.actions(ctx.pp_rank)
        store = StateStore()
        tensors: dict[int, Any] = {}
        inbox: dict[tuple[str, int], torch.Tensor] = {}
        outbox: dict[tuple[str, int], torch.Tensor] = {}
        cached_inputs: dict[int, Optional[torch.Tensor]] = {}
        live: dict[int, tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        timeline: list[dict] = []
        loss_sum, num_tokens, busy, peak_state = 0.0, 0, 0.0, 0
        t_start = time.perf_counter()

        for step in steps:
            act = step.action
            t0 = time.perf_counter()
            if isinstance(act, Comm):
                self._communicate(act, rows, outbox, inbox)
                continue
            kind = type(act).__name__.lower()
            if isinstance(act, (Forward, Recompute)):
                mb, row = act.mb, rows[act.mb]
                b = tensors.setdefault(mb, _tensors(row, ctx.device))
                keep = isinstance(act, Recompute) or act.keep_graph
                if isinstance(act, Forward):
                    inp = None if ctx.is_first_stage else inbox.pop(("activation", mb))
                    if not keep:
                        cached_inputs[mb] = inp  # recompute later runs from this input
                else:
                    inp = cached_inputs.pop(mb)
                if inp is not None and keep:
                    inp = inp.detach().requires_grad_(True)
                out = self._forward(row, b, inp, store, keep)
                if ctx.is_last_stage and isinstance(act, Forward):
                    loss_sum += float(out.detach())
                    num_tokens += b.num_loss_tokens
                elif not ctx.is_last_stage and isinstance(act, Forward):
                    outbox[("activation", mb)] = out.detach()
                if keep:
                    live[mb] = (inp, out)
            elif isinstance(act, Backward):
                mb, row = act.mb, rows[act.mb]
                inp, out = live.pop(mb)
                grad = None if ctx.is_last_stage else inbox.pop(("grad", mb))
                with chunk_context(_context(row, store), _rope_offset(row)):
                    if out.requires_grad:
                        torch.autograd.backward(out, grad_tensors=grad)
                if not ctx.is_first_stage:
                    g = inp.grad if inp is not None and inp.grad is not None else torch.zeros(
                        self._shape(row), dtype=self.dtype, device=ctx.device)
                    outbox[("grad", mb)] = g
                tensors.pop(mb, None)
            elif isinstance(act, Free):
                store.free(act.sample)
                kind = "free"
            end = time.perf_counter()
            if kind != "free":
                busy += end - t0
                timeline.append({"kind": kind, "mb": getattr(act, "mb", None),
                                 "graph": not isinstance(act, Forward) or act.keep_graph,
                                 "start": t0 - t_start, "end": end - t_start})
            peak_state = max(peak_state, store.nbytes())

        assert not live and not outbox, "pipeline plan left work undone"
        if self.finalize:
            finalize_model_grads([self.model], torch.tensor(num_tokens, dtype=torch.int, device=ctx.device))
        wall = time.perf_counter() - t_start
        self.last_timeline = timeline
        return ChunkStepResult(loss_sum=loss_sum, num_loss_tokens=num_tokens, busy_s=busy, wall_s=wall,
                               extra={"kv_state_peak_bytes": peak_state})
