"""Execute a ChunkFlow step on one pipeline stage set (PP=1): the state-aware schedule.

The order of operations comes from the pure plan (:mod:`chunkflow.scheduling.plan`);
this module only runs it: each action is a forward (with or without a graph), a
recompute (forward with graph of a chunk whose first forward kept none), a backward,
or freeing a long sample's K/V state.

Loss and gradients: each chunk's loss is the *sum* of its per-token losses; after the
last backward, megatron's ``finalize_model_grads`` all-reduces the number of loss
tokens over data-parallel ranks and scales gradients by its inverse, exactly as in the
Megatron baseline, so the gradient is that of the global per-token mean.

SeCO is this executor with K = 1. SpaCO passes a ``sampler``
(:mod:`chunkflow.scheduling.spaco`): per long sample it picks the chunks to
back-propagate; a picked chunk's backward is seeded with ``loss_factor`` and its
context multiplies the K/V gradient it receives from later chunks by ``hop_factor``.
The reported loss is always the exact one (every chunk runs forward); the normaliser is
still all loss tokens of the global batch.

Random state: a chunk rebuilt by ``Recompute`` replays the RNG state of its first
forward, so dropout (e.g. LoRA's) draws the same masks in both passes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Optional, Sequence

import torch
from megatron.core.distributed import finalize_model_grads

from chunkflow.data.types import PackedRow
from chunkflow.scheduling.memory import SavedTensorMeter
from chunkflow.scheduling.plan import Backward, Forward, Free, Recompute, plan_single_stage
from chunkflow.scheduling.spaco import Selection
from chunkflow.scheduling.state import ChunkContext, StateStore, chunk_context
from chunkflow.train.batch import RowTensors, row_to_tensors
from chunkflow.train.megatron_schedule import StepResult, forward_row, masked_loss

__all__ = ["ChunkFlowSchedule", "ChunkStepResult", "run_chunk_forward"]


@dataclass
class ChunkStepResult(StepResult):
    extra: dict = field(default_factory=dict)


def _context(row: PackedRow, store: StateStore, grad_scale: float = 1.0) -> Optional[ChunkContext]:
    if not row.dependent:
        return None
    return ChunkContext(store=store, sample=row.sample_ids[0], chunk=row.chunk_index,
                        num_chunks=row.num_chunks, grad_scale=grad_scale)


def _tensors(row: PackedRow, device: torch.device) -> RowTensors:
    # Dependent chunks run unpacked (sbhd, batch 1) so the hook sees one sequence;
    # standalone chunks run as THD packs with per-sample causal attention.
    return row_to_tensors(row, device, packed=not row.dependent)


def _rope_offset(row: PackedRow) -> int:
    """Dependent chunk j starts at absolute position j*C; packed rows restart per sample."""
    return int(row.position_ids[0]) if row.dependent and len(row) else 0


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(state: Optional[tuple], device: torch.device) -> Iterator[None]:
    """Run with the RNG state ``state`` (from :func:`_rng_state`), then restore the current one."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def run_chunk_forward(model: Any, row: PackedRow, b: RowTensors, store: StateStore,
                      *, grad: bool, grad_scale: float = 1.0) -> torch.Tensor:
    """Forward one chunk; returns the sum of its per-token losses (a graph if ``grad``)."""
    if len(row) == 0:  # an equalising empty row: nothing to run
        return torch.zeros((), dtype=torch.float32, device=b.input_ids.device, requires_grad=grad)
    with chunk_context(_context(row, store, grad_scale), _rope_offset(row)), torch.set_grad_enabled(grad):
        losses = forward_row(model, b)
        return masked_loss(b.loss_mask, losses)[0]


class ChunkFlowSchedule:
    """``run(rows)`` for ``train.schedule: chunkflow`` with PP=1 (any TP and DP size).

    ``sampler`` (SpaCO): any object with ``select(sample, num_chunks, step) ->
    Selection``; ``step`` (set by the trainer before each ``run``) keys its draws.
    """

    name = "chunkflow"

    def __init__(self, model: Any, device: torch.device, k: int, *, measure_memory: bool = False,
                 finalize: bool = True, sampler: Any = None):
        self.model, self.device, self.k = model, device, k
        self.measure_memory = measure_memory
        self.finalize = finalize
        self.sampler = sampler
        self.step = 0
        self.last_actions: list = []
        self.last_selection: dict[Hashable, Selection] = {}

    def _select(self, rows: Sequence[PackedRow]) -> dict[Hashable, Selection]:
        if self.sampler is None:
            return {}
        return {row.sample_ids[0]: self.sampler.select(row.sample_ids[0], row.num_chunks, self.step)
                for row in rows if row.dependent and row.chunk_index == 0}

    def run(self, rows: Sequence[PackedRow]) -> ChunkStepResult:
        selection = self._select(rows)
        self.last_selection = selection
        backprop = {s: sel.chunks for s, sel in selection.items()} if self.sampler is not None else None
        actions = plan_single_stage(rows, self.k, backprop)
        self.last_actions = actions
        hop = {s: sel.hop_factor for s, sel in selection.items()}
        seed = {s: sel.loss_factor for s, sel in selection.items()}

        def scale_of(row: PackedRow, table: dict) -> float:
            return table.get(row.sample_ids[0], 1.0) if row.dependent else 1.0

        recomputed = {a.mb for a in actions if isinstance(a, Recompute)}
        rng: dict[int, tuple] = {}
        store = StateStore()
        tensors: dict[int, RowTensors] = {}
        live: dict[int, torch.Tensor] = {}
        meter = SavedTensorMeter(exclude=self.model) if self.measure_memory else None
        loss_sum, num_tokens, busy = 0.0, 0, 0.0
        peak_state = 0
        t_start = time.perf_counter()
        with (meter if meter is not None else _null()):
            for act in actions:
                t0 = time.perf_counter()
                if isinstance(act, (Forward, Recompute)):
                    mb = act.mb
                    row = rows[mb]
                    if mb not in tensors:
                        tensors[mb] = _tensors(row, self.device)
                    b = tensors[mb]
                    keep = isinstance(act, Recompute) or act.keep_graph
                    if isinstance(act, Forward) and mb in recomputed:
                        rng[mb] = _rng_state(self.device)
                    with _replayed_rng(rng.pop(mb, None) if isinstance(act, Recompute) else None, self.device):
                        loss = run_chunk_forward(self.model, row, b, store, grad=keep,
                                                 grad_scale=scale_of(row, hop))
                    if isinstance(act, Forward):  # count each chunk's loss once
                        loss_sum += float(loss.detach())
                        num_tokens += b.num_loss_tokens
                    if keep:
                        live[mb] = loss
                elif isinstance(act, Backward):
                    row = rows[act.mb]
                    loss = live.pop(act.mb)
                    factor = scale_of(row, seed)
                    with chunk_context(_context(row, store, scale_of(row, hop)), _rope_offset(row)):
                        (loss if factor == 1.0 else loss * factor).backward()
                    tensors.pop(act.mb, None)
                elif isinstance(act, Free):
                    store.free(act.sample)
                peak_state = max(peak_state, store.nbytes())
                busy += time.perf_counter() - t0
        assert not live, f"plan left graphs alive for micro-batches {sorted(live)}"
        if self.finalize:
            finalize_model_grads([self.model], torch.tensor(num_tokens, dtype=torch.int))
        wall = time.perf_counter() - t_start
        extra = {"kv_state_peak_bytes": peak_state}
        if self.sampler is not None:
            extra["spaco_chunks"] = sum(1 for r in rows if r.dependent)
            extra["spaco_backprop_chunks"] = sum(len(sel.chunks) for sel in selection.values())
        if meter is not None:
            extra["saved_activation_peak_bytes"] = meter.peak_bytes
            extra["saved_kv_peak_bytes"] = meter.peak_kv_bytes
        return ChunkStepResult(loss_sum=loss_sum, num_loss_tokens=num_tokens, busy_s=busy,
                               wall_s=wall, extra=extra)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
