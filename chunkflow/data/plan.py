"""One global batch -> one :class:`StepPlan`: the rows every data-parallel rank runs.

Pure and deterministic: every rank calls the same planner on the same global batch and
gets the same plan, then runs ``plan.rows_per_rank[dp_rank]``. Nothing is communicated,
so every rank also knows the global loss normaliser (``num_loss_tokens``) before backward.

Megatron baseline (``plan_megatron_step``)::

    samples --assign_samples (LPT by sample cost)--> rank r's samples
            --pack_samples(capacity=max_seq_len)--> rank r's rows

ChunkFlow (``plan_chunkflow_step``)::

    samples --build_chunks(chunk_size)--> standalone + dependent chunks
            --assign_chunks (LPT by unit cost; a sample's chunks stay together)--> rows[r]

Example, dp = 2, C = 4, samples a (2), b (3), s (9)::

    rank 0: [s j=0] [s j=1] [s j=2]          cost ~ 9 + alpha * 45
    rank 1: [b b b] [a a]                    cost ~ 5 + alpha * 9

Every rank gets at least one row: if there are fewer units than ranks, multi-sample
standalone chunks are split in two until there are enough (an empty row is added only if
the batch has fewer samples than ranks). With ``equalize=True`` every rank is padded with
empty rows to the same number of rows; ``num_padding_rows`` counts all empty rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from chunkflow.config.schema import SCHEDULES
from chunkflow.data.assignment import CostModel, assign_chunks, assign_samples, chunk_units, estimate_cost
from chunkflow.data.chunking import build_chunks, check_unique_ids
from chunkflow.data.packing import build_row, empty_row, pack_samples
from chunkflow.data.types import PackedRow, Sample

__all__ = ["StepPlan", "plan_megatron_step", "plan_chunkflow_step", "plan_step"]


@dataclass
class StepPlan:
    """What each data-parallel rank runs for one global batch, and the batch's totals."""

    schedule: str  # "megatron" | "chunkflow"
    capacity: int  # row capacity: data.max_seq_len (megatron) or chunkflow.chunk_size
    rows_per_rank: list[list[PackedRow]]  # [dp_rank][micro-batch]
    sample_ids: list[int]  # the global batch, in loader order
    num_samples: int
    num_tokens: int  # whole global batch
    num_loss_tokens: int  # whole global batch: the loss normaliser
    sum_sq_seqlens: int  # sum of L^2 over samples (attention FLOPs ~ this)
    est_cost_per_rank: list[float] = field(default_factory=list)
    num_padding_rows: int = 0  # empty rows (no tokens) in rows_per_rank

    @property
    def dp_size(self) -> int:
        return len(self.rows_per_rank)

    @property
    def imbalance(self) -> float:
        """max / mean estimated cost over ranks (1.0 = perfectly balanced)."""
        mean = sum(self.est_cost_per_rank) / max(len(self.est_cost_per_rank), 1)
        return max(self.est_cost_per_rank) / mean if mean > 0 else 1.0

    def rows(self) -> list[PackedRow]:
        """All non-empty rows, rank by rank."""
        return [row for rank in self.rows_per_rank for row in rank if len(row)]

    @property
    def num_rows(self) -> int:
        return len(self.rows())

    @property
    def num_dependent_rows(self) -> int:
        return sum(1 for row in self.rows() if row.dependent)

    @property
    def num_standalone_rows(self) -> int:
        return self.num_rows - self.num_dependent_rows

    @property
    def fill_rate(self) -> float:
        """Real tokens / (non-empty rows x capacity)."""
        return self.num_tokens / (self.num_rows * self.capacity) if self.num_rows else 0.0

    @property
    def microbatches_per_rank(self) -> list[int]:
        return [len(rows) for rows in self.rows_per_rank]

    def for_rank(self, dp_rank: int) -> list[PackedRow]:
        if not 0 <= dp_rank < self.dp_size:
            raise IndexError(f"dp_rank {dp_rank} is outside this plan's {self.dp_size} ranks")
        return self.rows_per_rank[dp_rank]


def _finish(
    schedule: str,
    capacity: int,
    samples: Sequence[Sample],
    rows_per_rank: list[list[PackedRow]],
    cost_model: Optional[CostModel],
    equalize: bool,
) -> StepPlan:
    for rows in rows_per_rank:  # never leave a rank without a micro-batch
        if not rows:
            rows.append(empty_row())
    if equalize:
        most = max(len(rows) for rows in rows_per_rank)
        for rows in rows_per_rank:
            rows.extend(empty_row() for _ in range(most - len(rows)))
    lengths = [len(s) for s in samples]
    return StepPlan(
        schedule=schedule,
        capacity=capacity,
        rows_per_rank=rows_per_rank,
        sample_ids=[s.sample_id for s in samples],
        num_samples=len(samples),
        num_tokens=sum(lengths),
        num_loss_tokens=sum(s.num_loss_tokens for s in samples),
        sum_sq_seqlens=sum(n * n for n in lengths),
        est_cost_per_rank=[
            sum(estimate_cost(row, cost_model=cost_model) for row in rows) for rows in rows_per_rank
        ],
        num_padding_rows=sum(1 for rows in rows_per_rank for row in rows if len(row) == 0),
    )


def _check_common(samples: Sequence[Sample], dp_size: int) -> None:
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if not samples:
        raise ValueError("cannot plan an empty global batch")
    check_unique_ids(samples)


def plan_megatron_step(
    samples: Sequence[Sample],
    *,
    dp_size: int,
    max_seq_len: int,
    cost_model: Optional[CostModel] = None,
    balance: str = "lpt",
    equalize: bool = False,
) -> StepPlan:
    """Megatron baseline: whole samples to ranks (``balance``), packed into rows of
    ``max_seq_len`` tokens on each rank."""
    _check_common(samples, dp_size)
    per_rank = assign_samples(samples, dp_size, cost_model=cost_model, balance=balance)
    rows = [pack_samples(rank_samples, max_seq_len) for rank_samples in per_rank]
    return _finish("megatron", max_seq_len, samples, rows, cost_model, equalize)


def _split_until(chunks: list[PackedRow], by_id: dict[int, Sample], num_units: int) -> list[PackedRow]:
    """Split multi-sample standalone chunks in two (the most samples first) until the
    chunks form at least ``num_units`` units or no chunk can be split."""
    chunks = list(chunks)
    while len(chunk_units(chunks)) < num_units:
        splittable = [i for i, c in enumerate(chunks) if not c.dependent and len(c.sample_ids) > 1]
        if not splittable:
            break
        i = max(splittable, key=lambda k: (len(chunks[k].sample_ids), len(chunks[k]), -k))
        ids = chunks[i].sample_ids
        half = len(ids) // 2
        parts = [build_row([(by_id[s], 0, len(by_id[s])) for s in part]) for part in (ids[:half], ids[half:])]
        chunks[i : i + 1] = parts
    return chunks


def plan_chunkflow_step(
    samples: Sequence[Sample],
    *,
    dp_size: int,
    chunk_size: int,
    cost_model: Optional[CostModel] = None,
    balance: str = "lpt",
    equalize: bool = False,
) -> StepPlan:
    """ChunkFlow: chunks of at most ``chunk_size`` tokens, balanced over ranks by cost,
    each long sample's dependent chunks consecutive (ascending) on one rank, long
    samples before standalone chunks."""
    _check_common(samples, dp_size)
    chunks = build_chunks(samples, chunk_size)
    # Long samples first on each rank: their no-graph forwards let the pipeline fill
    # while standalone chunks are left to fill the gaps of the recompute/backward tail
    # (simulated makespan of tiny_cpu batch 0 at PP=2, C=256, K=1: 6143 -> 5633).
    chunks = [c for c in chunks if c.dependent] + [c for c in chunks if not c.dependent]
    if len(chunk_units(chunks)) < dp_size:
        chunks = _split_until(chunks, {s.sample_id: s for s in samples}, dp_size)
    rows = assign_chunks(chunks, dp_size, cost_model=cost_model, balance=balance)
    return _finish("chunkflow", chunk_size, samples, rows, cost_model, equalize)


def plan_step(
    samples: Sequence[Sample],
    *,
    schedule: str,
    dp_size: int,
    max_seq_len: int,
    chunk_size: int,
    cost_model: Optional[CostModel] = None,
    balance: str = "lpt",
    equalize: bool = False,
) -> StepPlan:
    """Dispatch on ``schedule`` (one of ``SCHEDULES``)."""
    common = dict(dp_size=dp_size, cost_model=cost_model, balance=balance, equalize=equalize)
    if schedule == "megatron":
        return plan_megatron_step(samples, max_seq_len=max_seq_len, **common)
    if schedule == "chunkflow":
        return plan_chunkflow_step(samples, chunk_size=chunk_size, **common)
    raise ValueError(f"train.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
