"""ChunkFlow chunk construction (docs/chunkflow.md) and the chunk-size validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.config import ConfigError, load_config
from chunkflow.data.chunking import build_chunks, num_chunks, split_sample
from test_packing import make_sample, reference_ffd_bins


def check_chunks(chunks, samples, chunk_size):
    """The invariants of the issue, checked token by token."""
    by_id = {s.sample_id: s for s in samples}
    pieces: dict[int, list] = {sid: [] for sid in by_id}  # sid -> [(chunk_index, start, end)]
    for row in chunks:
        assert 0 < len(row) <= chunk_size
        assert row.cu_seqlens.tolist()[0] == 0 and row.cu_seqlens[-1] == len(row)
        if row.dependent:  # only its own sample, positions jC..
            assert len(row.sample_ids) == 1 and row.num_chunks > 1
            s = by_id[row.sample_ids[0]]
            start = row.chunk_index * chunk_size
            assert row.num_chunks == num_chunks(len(s), chunk_size)
            assert row.cu_seqlens.tolist() == [0, len(row)]
            pieces[s.sample_id].append((row.chunk_index, start, start + len(row), row, 0))
        else:
            assert row.chunk_index == 0 and row.num_chunks == 1
            for sid, a, b in zip(row.sample_ids, row.cu_seqlens[:-1], row.cu_seqlens[1:]):
                assert b - a == len(by_id[sid]) <= chunk_size  # whole short samples only
                pieces[sid].append((0, 0, b - a, row, a))
    for sid, got in pieces.items():
        s = by_id[sid]
        got.sort(key=lambda p: p[0])
        assert [p[0] for p in got] == list(range(len(got)))  # each chunk index once
        assert got[0][1] == 0 and got[-1][2] == len(s)  # complete
        assert all(p[2] == q[1] for p, q in zip(got, got[1:]))  # contiguous
        assert len(got) == (1 if len(s) <= chunk_size else -(-len(s) // chunk_size))
        for _, start, end, row, off in got:  # every token, label, mask and position id
            n = end - start
            np.testing.assert_array_equal(row.input_ids[off : off + n], s.input_ids[start:end])
            np.testing.assert_array_equal(row.labels[off : off + n], s.labels[start:end])
            np.testing.assert_array_equal(row.loss_mask[off : off + n], s.loss_mask[start:end])
            np.testing.assert_array_equal(row.position_ids[off : off + n], np.arange(start, end))
    assert sum(len(r) for r in chunks) == sum(len(s) for s in samples)  # nothing duplicated


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=40),
    chunk_size=st.integers(1, 64),
)
def test_chunks_keep_every_token_once_in_order(lengths, chunk_size):
    samples = [make_sample(10 + i, n) for i, n in enumerate(lengths)]
    chunks = build_chunks(samples, chunk_size)
    check_chunks(chunks, samples, chunk_size)
    short = [n for n in lengths if n <= chunk_size]
    num_standalone = sum(1 for c in chunks if not c.dependent)
    assert num_standalone <= reference_ffd_bins(short, chunk_size)
    # Deterministic, and dependent chunks consecutive in ascending order.
    again = build_chunks(samples, chunk_size)
    assert [(c.sample_ids, c.chunk_index) for c in again] == [(c.sample_ids, c.chunk_index) for c in chunks]
    dep = [(c.sample_ids[0], c.chunk_index) for c in chunks if c.dependent]
    assert dep == sorted(dep, key=lambda t: ([s.sample_id for s in samples].index(t[0]), t[1]))


def test_boundary_lengths():
    c = 8
    (exact,) = build_chunks([make_sample(0, c)], c)
    assert not exact.dependent and exact.num_chunks == 1 and exact.position_ids.tolist() == list(range(c))
    first, second = build_chunks([make_sample(1, c + 1)], c)
    assert first.dependent and second.dependent
    assert (len(first), len(second)) == (c, 1)
    assert (first.chunk_index, second.chunk_index, first.num_chunks) == (0, 1, 2)
    assert second.position_ids.tolist() == [c]
    assert second.labels.tolist() == [1_000_000 + c + 1]


def test_docstring_example():
    samples = [make_sample(1, 2), make_sample(2, 3), make_sample(3, 1), make_sample(4, 9)]
    chunks = build_chunks(samples, 4)
    assert [(c.sample_ids, c.dependent, c.chunk_index) for c in chunks] == [
        ([2, 3], False, 0), ([1], False, 0), ([4], True, 0), ([4], True, 1), ([4], True, 2),
    ]
    assert chunks[0].position_ids.tolist() == [0, 1, 2, 0]
    assert chunks[3].position_ids.tolist() == [4, 5, 6, 7]


def test_bad_input():
    with pytest.raises(ValueError, match="chunk_size=0"):
        build_chunks([make_sample(0, 3)], 0)
    with pytest.raises(ValueError, match="sample id 5 appears twice"):
        build_chunks([make_sample(5, 3), make_sample(5, 4)], 4)
    with pytest.raises(ValueError, match="standalone"):
        split_sample(make_sample(0, 4), 4)


@pytest.mark.parametrize(
    "overrides, valid",
    [
        (["chunkflow.chunk_size=0"], "positive integer no larger than data.max_seq_len=1024"),
        (["chunkflow.chunk_size=-8"], "positive integer"),
        (["chunkflow.chunk_size=2048"], "no larger than data.max_seq_len=1024"),
        (["parallel.tensor=2", "parallel.sequence_parallel=true", "chunkflow.chunk_size=255"],
         "positive multiple of 2 (data.pad_to_multiple=1, parallel.tensor=2 with sequence parallelism)"),
    ],
)
def test_config_rejects_bad_chunk_size(overrides, valid):
    with pytest.raises(ConfigError, match="chunkflow.chunk_size") as err:
        load_config(None, overrides)
    assert valid in str(err.value)


def test_config_accepts_good_chunk_sizes():
    assert load_config(None, ["chunkflow.chunk_size=1024"]).chunkflow.chunk_size == 1024
    cfg = load_config(None, ["parallel.tensor=2", "parallel.sequence_parallel=true", "chunkflow.chunk_size=256"])
    assert cfg.chunkflow.chunk_size == 256
