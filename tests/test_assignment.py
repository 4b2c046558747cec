"""Cost model, data-parallel assignment and step plans."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.config.schema import ModelConfig
from chunkflow.data.assignment import (
    CostModel,
    assign_chunks,
    assign_samples,
    causal_pairs,
    estimate_cost,
    lpt_assign,
    round_robin_assign,
    sample_cost,
)
from chunkflow.data.chunking import build_chunks, split_sample
from chunkflow.data.packing import build_row, empty_row
from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step, plan_step
from test_packing import make_sample

ALPHA = CostModel(linear=1.0, attention=0.01)


def long_tailed_batch(seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(16, 256, 120), rng.integers(1024, 4097, 8)])
    rng.shuffle(lengths)
    return [make_sample(i, int(n)) for i, n in enumerate(lengths)]


def test_cost_of_packed_and_dependent_rows():
    a, b, s = make_sample(0, 3), make_sample(1, 2), make_sample(2, 10)
    packed = build_row([(a, 0, 3), (b, 0, 2)])
    assert estimate_cost(packed, cost_model=ALPHA) == pytest.approx(5 + 0.01 * (6 + 3))
    c = 4
    chunks = split_sample(s, c)
    # Chunk j of C tokens: C * jC prefix pairs + C (C + 1) / 2 causal pairs ~ C^2 (j + 1/2).
    assert estimate_cost(chunks[1], cost_model=ALPHA) == pytest.approx(4 + 0.01 * (16 + 10))
    assert estimate_cost(chunks[2], cost_model=ALPHA) == pytest.approx(2 + 0.01 * (2 * 8 + 3))
    # Splitting a sample neither creates nor loses work.
    total = sum(estimate_cost(r, cost_model=ALPHA) for r in chunks)
    assert total == pytest.approx(sample_cost(10, ALPHA)) == pytest.approx(10 + 0.01 * causal_pairs(10))
    assert estimate_cost(empty_row()) == 0.0


def test_cost_model_constants():
    assert CostModel.for_hidden_size(128).attention == pytest.approx(1 / 768)
    assert CostModel() == CostModel.for_hidden_size(4096)
    # h=4, f=8, MHA, one layer, no LM head: per token 2(2*16 + 2*16 + 3*32) = 320, per pair 16.
    m = CostModel.from_dims(hidden_size=4, ffn_hidden_size=8, num_attention_heads=2, num_query_groups=2)
    assert m.attention == pytest.approx(16 / 320)
    tiny = CostModel.from_model_config(ModelConfig())
    assert 0 < tiny.attention < 1 / 128
    with pytest.raises(ValueError, match="hidden_size"):
        CostModel.for_hidden_size(0)


def test_lpt_and_round_robin():
    assert lpt_assign([5, 4, 3, 3, 3], 2) == [0, 1, 1, 0, 1]  # loads 8, 10: greedy, not optimal
    assert round_robin_assign(5, 2) == [0, 1, 0, 1, 0]
    assert lpt_assign([1.0, 1.0], 2, keys=[9, 3]) == [1, 0]  # tie: smaller key first
    with pytest.raises(ValueError, match="data-parallel size"):
        lpt_assign([1.0], 0)


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 200), min_size=1, max_size=40),
    chunk_size=st.integers(4, 48),
    dp=st.integers(1, 6),
    balance=st.sampled_from(["lpt", "round_robin"]),
)
def test_assignment_keeps_dependent_chunks_together_in_order(lengths, chunk_size, dp, balance):
    samples = [make_sample(i, n) for i, n in enumerate(lengths)]
    chunks = build_chunks(samples, chunk_size)
    ranks = assign_chunks(chunks, dp, cost_model=ALPHA, balance=balance)
    assert sorted(id(r) for rows in ranks for r in rows) == sorted(id(c) for c in chunks)
    for rows in ranks:
        seen = [(i, r.sample_ids[0], r.chunk_index, r.num_chunks) for i, r in enumerate(rows) if r.dependent]
        for sid in {t[1] for t in seen}:
            mine = [t for t in seen if t[1] == sid]
            assert [t[2] for t in mine] == list(range(mine[0][3]))  # all chunks, ascending
            assert [t[0] for t in mine] == list(range(mine[0][0], mine[0][0] + len(mine)))  # consecutive
    again = assign_chunks(chunks, dp, cost_model=ALPHA, balance=balance)
    assert [[id(r) for r in rows] for rows in again] == [[id(r) for r in rows] for rows in ranks]


@pytest.mark.parametrize("schedule", ["chunkflow", "megatron"])
def test_lpt_beats_round_robin_on_long_tailed_batch(schedule):
    samples = long_tailed_batch()
    kw = dict(schedule=schedule, dp_size=4, chunk_size=512, max_seq_len=4096,
              cost_model=CostModel.for_hidden_size(128))
    lpt = plan_step(samples, balance="lpt", **kw)
    rr = plan_step(samples, balance="round_robin", **kw)
    assert lpt.imbalance < 1.05
    assert rr.imbalance > 1.15
    assert sum(lpt.est_cost_per_rank) == pytest.approx(sum(rr.est_cost_per_rank))


def test_assign_samples_is_deterministic_and_complete():
    samples = long_tailed_batch(1)
    a = assign_samples(samples, 3, cost_model=ALPHA)
    b = assign_samples(samples, 3, cost_model=ALPHA)
    assert [[s.sample_id for s in r] for r in a] == [[s.sample_id for s in r] for r in b]
    assert sorted(s.sample_id for r in a for s in r) == list(range(len(samples)))


@pytest.mark.parametrize("schedule", ["chunkflow", "megatron"])
def test_step_plan_totals(schedule):
    samples = long_tailed_batch(2)
    plan = plan_step(samples, schedule=schedule, dp_size=3, chunk_size=256, max_seq_len=4096)
    assert plan.schedule == schedule and plan.dp_size == 3
    assert plan.num_samples == len(samples)
    assert plan.num_tokens == sum(len(s) for s in samples) == sum(len(r) for r in plan.rows())
    assert plan.num_loss_tokens == int(sum(s.loss_mask.sum() for s in samples))
    assert plan.num_loss_tokens == sum(r.num_loss_tokens for r in plan.rows())
    assert plan.sum_sq_seqlens == sum(len(s) ** 2 for s in samples)
    assert plan.imbalance == pytest.approx(max(plan.est_cost_per_rank) / np.mean(plan.est_cost_per_rank))
    assert plan.num_padding_rows == 0 and all(plan.microbatches_per_rank)
    assert plan.fill_rate == pytest.approx(plan.num_tokens / (plan.num_rows * plan.capacity))
    assert max(len(r) for r in plan.rows()) <= plan.capacity
    assert plan.for_rank(2) is plan.rows_per_rank[2]
    with pytest.raises(IndexError, match="dp_rank 3"):
        plan.for_rank(3)


@pytest.mark.parametrize("schedule", ["chunkflow", "megatron"])
def test_equalize_pads_with_counted_empty_rows(schedule):
    samples = long_tailed_batch(3)
    kw = dict(schedule=schedule, dp_size=4, chunk_size=256, max_seq_len=4096)
    plain = plan_step(samples, **kw)
    even = plan_step(samples, equalize=True, **kw)
    counts = plain.microbatches_per_rank
    assert len(set(even.microbatches_per_rank)) == 1
    assert even.num_padding_rows == sum(max(counts) - n for n in counts)
    assert even.num_rows == plain.num_rows and even.est_cost_per_rank == plain.est_cost_per_rank


def test_every_rank_gets_work_when_units_are_few():
    # Four tiny samples fit in one standalone chunk; with dp=4 the chunk is split up.
    samples = [make_sample(i, 3) for i in range(4)]
    plan = plan_chunkflow_step(samples, dp_size=4, chunk_size=64)
    assert plan.microbatches_per_rank == [1, 1, 1, 1] and plan.num_padding_rows == 0
    assert sorted(r.sample_ids[0] for r in plan.rows()) == [0, 1, 2, 3]
    # Fewer samples than ranks: padding is unavoidable, and counted.
    plan = plan_chunkflow_step(samples[:2], dp_size=4, chunk_size=64)
    assert plan.num_padding_rows == 2 and plan.microbatches_per_rank == [1, 1, 1, 1]
    plan = plan_megatron_step(samples[:2], dp_size=4, max_seq_len=64)
    assert plan.num_padding_rows == 2


def test_plan_bad_input():
    with pytest.raises(ValueError, match="dp_size"):
        plan_chunkflow_step([make_sample(0, 4)], dp_size=0, chunk_size=4)
    with pytest.raises(ValueError, match="empty global batch"):
        plan_megatron_step([], dp_size=1, max_seq_len=4)
    with pytest.raises(ValueError, match="train.schedule='pipe'"):
        plan_step([make_sample(0, 4)], schedule="pipe", dp_size=1, chunk_size=4, max_seq_len=4)
    with pytest.raises(ValueError, match="balance='random'"):
        plan_chunkflow_step([make_sample(0, 4)], dp_size=1, chunk_size=4, balance="random")
