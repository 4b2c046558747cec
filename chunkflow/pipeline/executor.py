"""The one executor of ChunkFlow's action table, for any number of pipeline stages.

:func:`~chunkflow.pipeline.plan.build_pipeline_plan` decides, per stage, the order of
forwards, recomputes, backwards and frees (one stage is the degenerate pipeline: no
communication, the PP=1 order of ``chunkflow.scheduling.plan``). :class:`ChunkExecutor`
runs one stage's table and is the only place where these concerns are implemented:

* **chunk context**: every forward, recompute and backward of a dependent chunk runs with
  its K/V state context and RoPE offset (``chunkflow.scheduling.state``); the context
  stays set during backward, where megatron's activation recompute re-reads it;
* **recompute**: ``Forward(mb, keep_graph=False)`` keeps only the stage's input (and the
  K/V in the store); ``Recompute(mb)`` rebuilds the graph from that input, replaying the
  random state of the first forward so dropout (e.g. LoRA's) draws the same masks;
* **loss**: the last stage applies the loss function, then megatron's ``grad_scale_func``
  (fp16 loss scaling) and SpaCO's compensation factor before ``backward``;
* **SpaCO**: ``sampler.select(sample, num_chunks, step)`` chooses the chunks of each long
  sample to back-propagate; every stage draws the same choice (seeded by step and
  sample), so the stages' tables stay matched;
* **communication**: a ``Comm`` step posts its sends and receives together
  (``batch_isend_irecv``, buffers placed by ``chunkflow.parallel.comm``) and waits for
  none of them: a received tensor is waited for right before the compute that reads it,
  sends one ``Comm`` later. A ``Comm`` of receives alone is posted before the compute
  ahead of it (megatron's ``overlap_p2p_comm``), so its data arrives during that compute;
  no op moves past another, so every channel keeps the plan's order (NCCL-safe) and
  ``check_progress``'s deadlock proof still holds (waits only come later);
* **gradient reduction**: every backward but the stage's last one that reaches the
  parameters runs under ``config.no_sync_func``; with megatron DDP's
  ``overlap_grad_reduce`` each bucket's reduction starts during that last backward;
* **timing** (:class:`~chunkflow.scheduling.step.SpanTimer`) and memory figures.

Two front ends share it: :class:`ChunkFlowSchedule` (the trainer's ``run(rows)``) and
:class:`StateAwarePipelineSchedule`, a forward-backward function with the keyword
signature of megatron-core's ``forward_backward_pipelining_without_interleaving``::

    fb = StateAwarePipelineSchedule(k=2)
    losses = fb(forward_step_func=forward_step, data_iterator=it, model=[model],
                num_microbatches=n, seq_length=c, micro_batch_size=1)

Its one extra contract: every item the data iterator yields carries its chunk as a
:class:`~chunkflow.data.types.PackedRow` (``item["row"]`` or ``item.row``), because the
schedule must know, before running anything, which micro-batches are chunks of one long
sample.

Loss handling follows megatron: ``loss_func`` returns ``(loss, num_tokens, report)``
(per-token loss: summed, gradients divided by the global token count in
``finalize_model_grads``) or ``(loss, report)`` (divided by ``num_microbatches``).
Nothing on the hot path reads a value back to the host: token counts accumulate as a
device tensor and losses stay in the reports until the step ends.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
import torch.distributed as dist

from chunkflow.data.types import PackedRow
from chunkflow.model.batch import RowTensors, row_to_tensors
from chunkflow.model.loss import masked_loss, token_losses
from chunkflow.pipeline import p2p
from chunkflow.pipeline.plan import Comm, PipelinePlan, build_pipeline_plan
from chunkflow.scheduling.memory import SavedTensorMeter
from chunkflow.scheduling.plan import Backward, Forward, Free, Recompute
from chunkflow.scheduling.rng import replayed_rng, rng_state
from chunkflow.scheduling.spaco import Selection
from chunkflow.scheduling.state import ChunkContext, StateStore, chunk_context
from chunkflow.scheduling.step import SpanTimer, StepResult

__all__ = ["ChunkExecutor", "ChunkFlowSchedule", "StateAwarePipelineSchedule", "row_of"]

# forward_fn(mb) -> (output, loss_func): megatron's forward_step_func for one micro-batch.
ForwardFn = Callable[[int], tuple[torch.Tensor, Callable]]


def row_of(item: Any) -> PackedRow:
    """The chunk a data-iterator item carries (``item["row"]`` or ``item.row``)."""
    row = item.get("row") if isinstance(item, dict) else getattr(item, "row", None)
    if not isinstance(row, PackedRow):
        raise TypeError("StateAwarePipelineSchedule needs every micro-batch item to carry its "
                        "chunk as item['row'] (a chunkflow PackedRow)")
    return row


def _rope_offset(row: PackedRow) -> int:
    """Dependent chunk j starts at absolute position j*C; packed rows restart per sample."""
    return int(row.position_ids[0]) if row.dependent and len(row) else 0


@dataclass
class _Outcome:
    reports: list  # loss_func reports of this stage (last stage only)
    num_tokens: torch.Tensor  # loss tokens counted by loss_func, on the device (int)
    busy_s: float
    wall_s: float
    timeline: list[dict]
    plan: PipelinePlan
    selection: dict[Hashable, Selection]
    kv_state_peak_bytes: int
    meter: Optional[SavedTensorMeter]


class ChunkExecutor:
    """Runs one stage's table of :func:`build_pipeline_plan` on megatron-core.

    ``group``: the pipeline group (None = one stage). ``config``: megatron's
    ``TransformerConfig`` of the model (loss scaling, per-token loss, finalize hook,
    hidden size, sequence parallelism). ``pad_multiple``: every row's tokens are padded
    to a multiple of it (``chunkflow.model.batch``), so receive buffers use that length.
    """

    def __init__(self, k: int, *, config: Any, device: torch.device, group: Any = None,
                 sampler: Any = None, tp_size: int = 1, pad_multiple: int = 1,
                 offload_kv: bool = False):
        self.k, self.config, self.device, self.group = k, config, device, group
        self.offload_kv = offload_kv
        self.store: Optional[StateStore] = None  # the last run's (memory figures)
        self.sampler = sampler
        self.stage = dist.get_rank(group) if group is not None else 0
        self.num_stages = dist.get_world_size(group) if group is not None else 1
        self.first, self.last = self.stage == 0, self.stage == self.num_stages - 1
        self.dtype = config.pipeline_dtype or config.params_dtype
        self.seq_div = tp_size if config.sequence_parallel else 1
        self.pad_multiple = pad_multiple
        # Post receives ahead of the compute before them and wait for sends later (False:
        # every Comm waits for all its ops at once; kept to measure the difference).
        self.overlap_p2p = True

    # ------------------------------------------------------------------ planning
    def select(self, rows: Sequence[PackedRow], step: int) -> dict[Hashable, Selection]:
        """SpaCO: the chunks of each long sample to back-propagate (empty without a sampler)."""
        if self.sampler is None:
            return {}
        return {row.sample_ids[0]: self.sampler.select(row.sample_ids[0], row.num_chunks, step)
                for row in rows if row.dependent and row.chunk_index == 0}

    def plan(self, rows: Sequence[PackedRow], selection: dict) -> PipelinePlan:
        backprop = {s: sel.chunks for s, sel in selection.items()} if self.sampler is not None else None
        return build_pipeline_plan(rows, self.num_stages, self.k, backprop)

    # ------------------------------------------------------------------ helpers
    def _padded(self, n: int) -> int:
        m = self.pad_multiple
        return -(-n // m) * m

    def _shape(self, row: PackedRow) -> tuple[int, int, int]:
        return (self._padded(len(row)) // self.seq_div, 1, self.config.hidden_size)

    def _post(self, comm: Comm, rows: Sequence[PackedRow], outbox: dict, inbox: dict) -> p2p.Posted:
        return p2p.post(comm, outbox, inbox, group=self.group, device=self.device, dtype=self.dtype,
                    shape=lambda mb: self._shape(rows[mb]))

    def _context(self, row: PackedRow, store: StateStore, hop: float) -> Optional[ChunkContext]:
        if not row.dependent:
            return None
        start = _rope_offset(row)  # chunk j starts at token j*C of its sample
        size = start // row.chunk_index if row.chunk_index else len(row)
        return ChunkContext(store=store, sample=row.sample_ids[0], chunk=row.chunk_index,
                            num_chunks=row.num_chunks, grad_scale=hop, start=start, block=size,
                            capacity=(row.num_chunks - 1) * size + self._padded(size))

    # ------------------------------------------------------------------ one step
    def run(self, model: Any, rows: Sequence[PackedRow], forward_fn: ForwardFn, *, step: int = 0,
            measure_memory: bool = False) -> _Outcome:
        """Forward and backward every micro-batch of ``rows`` on this stage, then finalize
        gradients with ``config.finalize_model_grads_func`` (if set)."""
        module = getattr(model, "module", model)
        selection = self.select(rows, step)
        plan = self.plan(rows, selection)
        hop = {s: sel.hop_factor for s, sel in selection.items()}
        seed = {s: sel.loss_factor for s, sel in selection.items()}
        steps = plan.stages[self.stage]
        recomputed = {st.action.mb for st in steps if isinstance(st.action, Recompute)}
        cfg = self.config
        store = self.store = StateStore(offload=self.offload_kv)
        timer = SpanTimer(self.device)
        meter = SavedTensorMeter(exclude=module) if measure_memory else None
        reports: list = []
        num_tokens = torch.zeros((), dtype=torch.int, device=self.device)
        inbox: dict = {}
        outbox: dict = {}
        cached: dict[int, tuple[Optional[torch.Tensor], tuple]] = {}  # no-graph forwards to rebuild
        live: dict[int, tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        peak_state = 0

        def factor(row: PackedRow, table: dict) -> float:
            return table.get(row.sample_ids[0], 1.0) if row.dependent else 1.0

        def forward(mb: int, inp: Optional[torch.Tensor], grad: bool, record: bool) -> torch.Tensor:
            nonlocal num_tokens
            row = rows[mb]
            if len(row) == 0:  # an equalising empty row: nothing to run
                shape = () if self.last else self._shape(row)
                return torch.zeros(shape, dtype=self.dtype, device=self.device, requires_grad=grad)
            if inp is not None:
                module.set_input_tensor([inp])
            ctx = self._context(row, store, factor(row, hop))
            with chunk_context(ctx, _rope_offset(row)), torch.set_grad_enabled(grad):
                output, loss_func = forward_fn(mb)
                if not self.last:
                    return output
                outs = loss_func(output)
            if len(outs) == 3:
                loss, count, report = outs
                if not cfg.calculate_per_token_loss:
                    loss = loss / count
            else:
                (loss, report), count = outs, None
            if not cfg.calculate_per_token_loss:
                loss = loss / len(rows)
            if record:
                reports.append(report)
                if count is not None:
                    num_tokens = num_tokens + count.to(device=self.device, dtype=torch.int)
            return loss

        # Gradient reduction (megatron's DDP, overlap_grad_reduce): the buckets' all-reduce
        # (or reduce-scatter) may start only in this stage's last backward that reaches the
        # parameters; every earlier backward runs under ``no_sync``, as in megatron's 1F1B.
        last_bw = max((i for i, st in enumerate(steps)
                       if isinstance(st.action, Backward) and len(rows[st.action.mb])), default=-1)
        no_sync = contextlib.ExitStack()
        if cfg.no_sync_func is not None:
            no_sync.enter_context(cfg.no_sync_func())
        early: set[int] = set()  # Comm steps posted ahead of the compute before them
        sends: list[p2p.Posted] = []  # posted batches whose sends are not yet waited for

        def post(i: int) -> None:
            comm = steps[i].action
            posted = self._post(comm, rows, outbox, inbox)
            if not self.overlap_p2p:
                posted.wait_all()
            elif any(op.op == "send" for op in comm.ops):
                # Sends posted one Comm ago have long been received: wait for them now
                # (bounds the buffers kept alive to two batches). Deferring the waits
                # keeps the table deadlock-free: pipeline.plan.check_progress proves it
                # even with rendezvous sends waited at their own Comm.
                for old in sends:
                    old.wait_all()
                sends[:] = [posted]

        def next_comm(i: int) -> Optional[int]:
            """Index of the Comm between compute step i and the next compute, if any."""
            for j in range(i + 1, len(steps)):
                if isinstance(steps[j].action, Comm):
                    return j
                if not isinstance(steps[j].action, Free):
                    return None
            return None

        with meter if meter is not None else contextlib.nullcontext(), no_sync:
            for i, st in enumerate(steps):
                act = st.action
                if isinstance(act, Comm):
                    if i not in early:
                        post(i)
                    continue
                if isinstance(act, Free):
                    store.free(act.sample)
                    continue
                if self.overlap_p2p:
                    # Receives for the next compute go out before this one runs (megatron's
                    # overlap_p2p_comm): only a Comm of receives alone can move ahead of
                    # this compute, so every channel's op order is unchanged.
                    j = next_comm(i)
                    if j is not None and all(op.op == "recv" for op in steps[j].action.ops):
                        post(j)
                        early.add(j)
                if i == last_bw:
                    no_sync.close()  # this backward starts the gradient reduction
                mb = act.mb
                # Wait for this step's input before its span opens: time spent waiting for
                # a peer is idle (bubble or communication), not compute.
                received = None
                if isinstance(act, Forward) and not self.first:
                    received = p2p.received(inbox, self.device, ("activation", mb))
                elif isinstance(act, Backward) and not self.last:
                    received = p2p.received(inbox, self.device, ("grad", mb))
                t0 = timer.start()
                if isinstance(act, (Forward, Recompute)):
                    keep = isinstance(act, Recompute) or act.keep_graph
                    if isinstance(act, Forward):
                        inp = received
                        rng = None
                        if mb in recomputed:  # rebuilt later: keep its input and random state
                            cached[mb] = (store.stash(inp), rng_state(self.device))
                    else:
                        stashed, rng = cached.pop(mb)
                        inp = store.unstash(stashed)
                    if inp is not None and keep:
                        inp = inp.detach().requires_grad_(True)
                    with replayed_rng(rng, self.device):
                        out = forward(mb, inp, keep, record=isinstance(act, Forward))
                    if isinstance(act, Forward) and not self.last:
                        outbox[("activation", mb)] = out.detach()
                    if keep:
                        live[mb] = (inp, out)
                else:  # Backward
                    row = rows[mb]
                    inp, out = live.pop(mb)
                    grad = received
                    if self.last:
                        if cfg.grad_scale_func is not None:
                            out = cfg.grad_scale_func(out)
                        f = factor(row, seed)
                        if f != 1.0:
                            out = out * f
                    with chunk_context(self._context(row, store, factor(row, hop)), _rope_offset(row)):
                        if out.requires_grad:
                            torch.autograd.backward(out, grad_tensors=grad)
                    if not self.first:
                        outbox[("grad", mb)] = inp.grad if inp.grad is not None else torch.zeros_like(inp)
                timer.stop(t0, kind=type(act).__name__.lower(), mb=mb,
                           graph=not isinstance(act, Forward) or act.keep_graph)
                peak_state = max(peak_state, store.nbytes())
        for old in sends:
            old.wait_all()
        assert not live and not outbox and not cached and not inbox, "the plan left work undone on this stage"
        if last_bw < 0 and _overlaps_grad_reduce(model):
            model.start_grad_sync()  # no backward reached the parameters: start it here
        if cfg.finalize_model_grads_func is not None:
            cfg.finalize_model_grads_func([model], num_tokens if cfg.calculate_per_token_loss else None)
        busy, wall, timeline = timer.finish()
        return _Outcome(reports, num_tokens, busy, wall, timeline, plan, selection, peak_state, meter)

    def run_forward_only(self, model: Any, rows: Sequence[PackedRow], forward_fn: ForwardFn) -> _Outcome:
        """Evaluation: every chunk forward once, in order, without graphs."""
        module = getattr(model, "module", model)
        store = self.store = StateStore(offload=self.offload_kv)
        timer = SpanTimer(self.device)
        reports: list = []
        for mb, row in enumerate(rows):
            inp = None
            if not self.first:
                inp = torch.empty(self._shape(row), dtype=self.dtype, device=self.device)
                dist.recv(inp, dist.get_global_rank(self.group, self.stage - 1), group=self.group)
                module.set_input_tensor([inp])
            t0 = timer.start()
            with chunk_context(self._context(row, store, 1.0), _rope_offset(row)), torch.no_grad():
                output, loss_func = forward_fn(mb)
                if self.last:
                    outs = loss_func(output)
                    reports.append(outs[-1])
            timer.stop(t0, kind="forward", mb=mb, graph=False)
            if not self.last:
                dist.send(output.contiguous(), dist.get_global_rank(self.group, self.stage + 1), group=self.group)
            if row.dependent and row.chunk_index == row.num_chunks - 1:
                store.free(row.sample_ids[0])
        busy, wall, timeline = timer.finish()
        plan = build_pipeline_plan(rows, self.num_stages, self.k)
        zero = torch.zeros((), dtype=torch.int, device=self.device)
        return _Outcome(reports, zero, busy, wall, timeline, plan, {}, 0, None)


def _overlaps_grad_reduce(model: Any) -> bool:
    ddp_config = getattr(model, "ddp_config", None)
    return bool(getattr(ddp_config, "overlap_grad_reduce", False))


def _sum_reports(reports: list) -> tuple[float, int]:
    """(loss sum, loss tokens) from ``{"lm loss": [sum, count]}`` reports: one host read."""
    if not reports:
        return 0.0, 0
    total = torch.stack([r["lm loss"] for r in reports]).sum(dim=0).tolist()
    return float(total[0]), int(round(total[1]))


class ChunkFlowSchedule:
    """``run(rows)`` for ``train.schedule: chunkflow``, any layout (PP = 1 included).

    ``sampler`` (SpaCO): any object with ``select(sample, num_chunks, step) ->
    Selection``; ``step`` (set by the trainer before each ``run``) keys its draws.
    """

    name = "chunkflow"

    def __init__(self, model: Any, ctx: Any, k: int, *, sampler: Any = None,
                 measure_memory: bool = False, pad_multiple: int = 1, offload_kv: bool = False):
        from megatron.core.utils import get_model_config

        self.model, self.ctx = model, ctx
        self.executor = ChunkExecutor(
            k, config=get_model_config(model), device=ctx.device,
            group=ctx.pp_group if ctx.pp_size > 1 else None, sampler=sampler,
            tp_size=ctx.tp_size, pad_multiple=pad_multiple, offload_kv=offload_kv)
        self.measure_memory = measure_memory
        self.pad_multiple = pad_multiple
        self.step = 0
        self.last: Optional[_Outcome] = None

    @property
    def k(self) -> int:
        return self.executor.k

    @property
    def sampler(self) -> Any:
        return self.executor.sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:
        self.executor.sampler = value

    @property
    def last_timeline(self) -> list[dict]:
        return self.last.timeline if self.last is not None else []

    @property
    def last_actions(self) -> list:
        return self.last.plan.actions(self.executor.stage) if self.last is not None else []

    @property
    def last_selection(self) -> dict:
        return self.last.selection if self.last is not None else {}

    def run(self, rows: Sequence[PackedRow]) -> StepResult:
        device, pad = self.ctx.device, self.pad_multiple
        cache: dict[int, RowTensors] = {}

        def forward_fn(mb: int) -> tuple[torch.Tensor, Callable]:
            b = cache.get(mb)
            if b is None:
                b = cache[mb] = row_to_tensors(rows[mb], device, packed=not rows[mb].dependent,
                                               pad_multiple=pad)
            return token_losses(self.model, b), partial(masked_loss, b.loss_mask)

        out = self.executor.run(self.model, rows, forward_fn, step=self.step,
                                measure_memory=self.measure_memory)
        self.last = out
        loss_sum, num = _sum_reports(out.reports)
        extra: dict[str, Any] = {"kv_state_peak_bytes": out.kv_state_peak_bytes}
        extra.update({f"kv_{k}": v for k, v in self.executor.store.memory().items()})
        if self.executor.sampler is not None:
            extra["spaco_chunks"] = sum(1 for r in rows if r.dependent)
            extra["spaco_backprop_chunks"] = sum(len(sel.chunks) for sel in out.selection.values())
        if out.meter is not None:
            extra["saved_activation_peak_bytes"] = out.meter.peak_bytes
            extra["saved_kv_peak_bytes"] = out.meter.peak_kv_bytes
        return StepResult(loss_sum=loss_sum, num_loss_tokens=num, busy_s=out.busy_s,
                          wall_s=out.wall_s, extra=extra)


def _unwrap(x: Any) -> Any:
    if isinstance(x, list):
        if len(x) != 1:
            raise ValueError("the state-aware schedule does not support virtual pipeline chunks")
        return x[0]
    return x


class StateAwarePipelineSchedule:
    """Megatron-compatible forward-backward function running ChunkFlow's schedule."""

    def __init__(self, k: int, *, pp_group: Any = None, sampler: Any = None, pad_multiple: int = 1,
                 offload_kv: bool = False):
        self.k, self.pp_group, self.sampler, self.pad_multiple = k, pp_group, sampler, pad_multiple
        self.offload_kv = offload_kv  # chunkflow.offload_kv: K/V state in host memory
        self.step = 0
        self.last: Optional[_Outcome] = None

    @property
    def last_plan(self) -> Optional[PipelinePlan]:
        return self.last.plan if self.last is not None else None

    def __call__(
        self, *, forward_step_func: Callable, data_iterator: Any, model: Any, num_microbatches: int,
        seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int] = None,
        forward_only: bool = False, collect_non_loss_data: bool = False,
        first_val_step: Optional[bool] = None, adjust_tensor_shapes_fn: Optional[Callable] = None,
        p2p_communicator: Any = None, pg_collection: Any = None, force_all_reduce: Optional[bool] = False,
    ) -> list:
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_model_config

        if micro_batch_size != 1:
            raise ValueError("ChunkFlow chunks are micro-batches of one packed row: micro_batch_size=1")
        model = _unwrap(model)
        items = [next(_unwrap(data_iterator)) for _ in range(num_microbatches)]
        rows = [row_of(it) for it in items]
        group = self.pp_group or (pg_collection.pp if pg_collection is not None
                                  else ps.get_pipeline_model_parallel_group())
        if dist.get_world_size(group) == 1:
            group = None
        module = getattr(model, "module", model)
        executor = ChunkExecutor(
            self.k, config=get_model_config(model), device=next(module.parameters()).device,
            group=group, sampler=self.sampler, tp_size=ps.get_tensor_model_parallel_world_size(),
            pad_multiple=self.pad_multiple, offload_kv=self.offload_kv)

        def forward_fn(mb: int) -> tuple[torch.Tensor, Callable]:
            return forward_step_func(iter([items[mb]]), model)

        if forward_only:
            self.last = executor.run_forward_only(model, rows, forward_fn)
        else:
            self.last = executor.run(model, rows, forward_fn, step=self.step)
        return self.last.reports if executor.last else []
