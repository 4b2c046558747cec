"""The PP=1 state-aware order (docs/chunkflow.md, chunkflow.scheduling.plan)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.data.chunking import build_chunks
from chunkflow.scheduling.plan import (
    Backward,
    ChunkRef,
    Forward,
    Free,
    Recompute,
    describe_rows,
    format_actions,
    live_activations_per_sample,
    max_live_activations,
    plan_single_stage,
    validate_actions,
)
from test_packing import make_sample


def long_sample(key, n: int) -> list[ChunkRef]:
    return [ChunkRef(key, j, n) for j in range(n)]


def written_rule(n: int, k: int, first_mb: int = 0) -> list:
    """§2.2 transcribed literally, for one sample of N chunks at micro-batches first_mb.."""
    mb = [first_mb + j for j in range(n)]
    if n <= k:
        return [Forward(m, True) for m in mb] + [Backward(m) for m in reversed(mb)] + [Free("s")]
    out = [Forward(mb[j], j >= n - k) for j in range(n)]
    out += [Backward(mb[j]) for j in range(n - 1, n - k - 1, -1)]
    for j in range(n - k - 1, -1, -1):
        out += [Recompute(mb[j]), Backward(mb[j])]
    return out + [Free("s")]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 12))
def test_one_long_sample_follows_the_rule(n, k):
    chunks = long_sample("s", n)
    actions = plan_single_stage(chunks, k)
    assert actions == written_rule(n, k)
    validate_actions(actions, chunks, k)
    assert max_live_activations(actions) == min(n, k)
    recomputed = [a.mb for a in actions if isinstance(a, Recompute)]
    assert recomputed == list(range(max(n - k, 0) - 1, -1, -1))  # descending, j < N-K only


units = st.lists(st.one_of(st.just(0), st.integers(1, 9)), min_size=1, max_size=12)


def chunks_of(unit_sizes: list[int]) -> list[ChunkRef]:
    """0 = a standalone chunk, n >= 1 = a long sample of n dependent chunks."""
    out: list[ChunkRef] = []
    for i, n in enumerate(unit_sizes):
        out += [ChunkRef()] if n == 0 else long_sample(f"s{i}", n)
    return out


@settings(max_examples=300, deadline=None)
@given(unit_sizes=units, k=st.integers(1, 6))
def test_mixed_rows_run_unit_by_unit(unit_sizes, k):
    chunks = chunks_of(unit_sizes)
    actions = plan_single_stage(chunks, k)
    validate_actions(actions, chunks, k)
    assert max_live_activations(actions) <= max(1, k)
    assert all(v <= k for v in live_activations_per_sample(actions, chunks).values())
    # standalone chunks: forward then backward right away (one live activation)
    for i, a in enumerate(actions):
        if isinstance(a, Forward) and not chunks[a.mb].dependent:
            assert actions[i + 1] == Backward(a.mb)
    # every long sample is freed exactly once, right after its chunk 0's backward
    frees = [i for i, a in enumerate(actions) if isinstance(a, Free)]
    assert len(frees) == sum(1 for n in unit_sizes if n > 0)
    for i in frees:
        b = actions[i - 1]
        assert isinstance(b, Backward) and chunks[b.mb].chunk_index == 0
        assert chunks[b.mb].sample == actions[i].sample
    # extra compute: one forward of the first N-K chunks of long samples only
    assert sum(isinstance(a, Recompute) for a in actions) == sum(max(n - k, 0) for n in unit_sizes)


def test_validator_catches_broken_orders():
    chunks = long_sample("s", 3)
    good = plan_single_stage(chunks, 1)
    validate_actions(good, chunks, 1)
    swapped = list(good)
    i = swapped.index(Recompute(1))
    swapped[i : i + 4] = [Recompute(0), Backward(0), Recompute(1), Backward(1)]  # ascending backward
    with pytest.raises(AssertionError):
        validate_actions(swapped, chunks, 1)
    gap = list(good)
    gap.insert(gap.index(Recompute(1)) + 1, Forward(99))
    with pytest.raises(AssertionError):
        validate_actions(gap, chunks, 1)  # recompute not immediately before its backward
    with pytest.raises(AssertionError):
        validate_actions(plan_single_stage(chunks, 3), chunks, 1)  # 3 graphs alive for K=1


def test_rows_from_the_data_layer():
    samples = [make_sample(0, 5), make_sample(1, 17), make_sample(2, 3), make_sample(3, 9)]
    rows = build_chunks(samples, 8)  # standalone [0 2] [...], then 1 -> 3 chunks, 3 -> 2 chunks
    refs = describe_rows(rows)
    assert [(r.sample, r.chunk_index, r.num_chunks) for r in refs if r.dependent] == [
        (1, 0, 3), (1, 1, 3), (1, 2, 3), (3, 0, 2), (3, 1, 2)]
    assert plan_single_stage(rows, 2) == plan_single_stage(refs, 2)
    validate_actions(plan_single_stage(rows, 2), refs, 2)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="K must be"):
        plan_single_stage([ChunkRef()], 0)
    with pytest.raises(ValueError, match="not consecutive"):
        plan_single_stage([ChunkRef("s", 0, 2), ChunkRef(), ChunkRef("s", 1, 2)], 1)
    with pytest.raises(ValueError, match="ascending"):
        plan_single_stage([ChunkRef("s", 1, 2), ChunkRef("s", 0, 2)], 1)
    with pytest.raises(ValueError, match="ascending"):
        plan_single_stage([ChunkRef("s", 0, 3), ChunkRef("s", 1, 3)], 1)  # a chunk missing


def test_printed_table():
    chunks = [ChunkRef()] + long_sample("s", 3) + [ChunkRef()]
    text = format_actions(plan_single_stage(chunks, 1), chunks)
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[1].split()[3:] == ["F-", "R", "B", "x"]
    assert lines[3].split()[3:] == ["F+", "B"]
