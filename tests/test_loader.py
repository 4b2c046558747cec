"""Global batch order and exact resume of the batch and step-plan loaders."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.config import load_config
from chunkflow.data.loader import GlobalBatchLoader, StepPlanLoader
from test_packing import make_sample


def dataset(num_samples: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [make_sample(i, int(n)) for i, n in enumerate(rng.integers(1, 100, num_samples))]


def ids(batch) -> list[int]:
    return [s.sample_id for s in batch]


def plan_key(plan) -> tuple:
    """Everything a rank executes, as comparable values."""
    return (
        plan.num_loss_tokens,
        [
            [(r.sample_ids, r.chunk_index, r.input_ids.tolist(), r.position_ids.tolist(), r.cu_seqlens.tolist())
             for r in rows]
            for rows in plan.rows_per_rank
        ],
    )


def test_epochs_are_permutations_with_the_remainder_dropped():
    loader = GlobalBatchLoader(dataset(10), global_batch_size=3, seed=7)
    assert loader.batches_per_epoch == 3
    epoch0 = [ids(loader.next()) for _ in range(3)]
    epoch1 = [ids(next(loader)) for _ in range(3)]
    for epoch in (epoch0, epoch1):
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 9 and all(len(b) == 3 for b in epoch)  # one sample dropped
    assert epoch0 != epoch1  # a fresh permutation each epoch
    assert flat == loader.epoch_order(1)[:9].tolist()
    again = GlobalBatchLoader(dataset(10), global_batch_size=3, seed=7)
    assert [ids(again.next()) for _ in range(3)] == epoch0  # deterministic in the seed
    other = GlobalBatchLoader(dataset(10), global_batch_size=3, seed=8)
    assert [ids(other.next()) for _ in range(3)] != epoch0


def test_no_shuffle_keeps_dataset_order():
    loader = GlobalBatchLoader(dataset(5), global_batch_size=2, seed=0, shuffle=False)
    assert [ids(loader.next()) for _ in range(3)] == [[0, 1], [2, 3], [0, 1]]


@settings(max_examples=60, deadline=None)
@given(
    num_samples=st.integers(1, 30),
    batch=st.integers(1, 30),
    before=st.integers(0, 12),
    after=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_batch_loader_resumes_exactly(num_samples, batch, before, after, seed):
    batch = min(batch, num_samples)
    data = dataset(num_samples)
    run = GlobalBatchLoader(data, global_batch_size=batch, seed=seed)
    for _ in range(before):
        run.next()
    state = copy.deepcopy(run.state_dict())
    assert all(type(v) in (int, bool) for v in state.values())  # plain Python values
    expected = [ids(run.next()) for _ in range(after)]
    resumed = GlobalBatchLoader(data, global_batch_size=batch, seed=seed)
    resumed.load_state_dict(state)
    assert [ids(resumed.next()) for _ in range(after)] == expected


@pytest.mark.parametrize("schedule", ["chunkflow", "megatron"])
def test_plan_loader_resumes_exactly(schedule):
    cfg = load_config(None, [f"train.schedule={schedule}", "data.global_batch_size=8",
                             "data.max_seq_len=128", "chunkflow.chunk_size=32"])
    data = dataset(30)  # 3 batches per epoch: the resume point crosses an epoch boundary
    run = StepPlanLoader.from_config(cfg, data, dp_size=2)
    for _ in range(2):
        run.next()
    state = copy.deepcopy(run.state_dict())
    expected = [plan_key(run.next()) for _ in range(5)]
    resumed = StepPlanLoader.from_config(cfg, data, dp_size=2)
    resumed.load_state_dict(state)
    assert resumed.step == 2
    got = [plan_key(resumed.next()) for _ in range(5)]
    assert got == expected
    assert resumed.next().schedule == schedule


def test_every_rank_builds_the_same_plans():
    cfg = load_config(None, ["train.schedule=chunkflow", "data.global_batch_size=8",
                             "data.max_seq_len=128", "chunkflow.chunk_size=16"])
    ranks = [StepPlanLoader.from_config(cfg, dataset(40), dp_size=4) for _ in range(2)]
    for _ in range(3):
        a, b = (r.next() for r in ranks)
        assert plan_key(a) == plan_key(b)


def test_bad_state_and_settings():
    loader = GlobalBatchLoader(dataset(10), global_batch_size=2, seed=1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed=1 but this loader has seed=2"):
        GlobalBatchLoader(dataset(10), global_batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        GlobalBatchLoader(dataset(11), global_batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid data loader state"):
        loader.load_state_dict({**state, "index": 99})
    with pytest.raises(ValueError, match="larger than the dataset"):
        GlobalBatchLoader(dataset(3), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="train.schedule='x'"):
        StepPlanLoader(loader, schedule="x", dp_size=1, max_seq_len=8, chunk_size=8)
