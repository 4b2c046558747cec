"""Bin-packing of whole samples into rows, and the one helper that builds every row.

Two users share this module:

* the Megatron baseline packs each data-parallel rank's samples into rows of at most
  ``data.max_seq_len`` tokens (:func:`pack_samples`);
* ChunkFlow packs the samples no longer than the chunk size into *standalone chunks* of
  at most ``chunkflow.chunk_size`` tokens (``chunking.build_chunks`` calls
  :func:`pack_samples` too).

Every row, packed or dependent, is made by :func:`build_row` from a list of *pieces*
``(sample, start, end)``: the tokens ``[start, end)`` of one sample. Position ids are
the token offsets inside the sample, so a whole sample restarts at 0 and a dependent
piece of a long sample continues at ``start``::

    pieces        (a, 0, 3)   (b, 0, 2)          (s, 8, 12)   # chunk 2 of s, C = 4
    input_ids     a0 a1 a2    b0 b1              s8 s9 s10 s11
    position_ids   0  1  2     0  1               8  9  10  11
    cu_seqlens    [0, 3, 5]                      [0, 4]
    sample_ids    [a.id, b.id]                   [s.id]

The packer (:func:`pack_lengths`) is first-fit-decreasing (FFD): lengths sorted longest
first (ties by key, i.e. sample id), each placed into the first open bin with room, a new
bin opened when none has room. The ChunkFlow recipe phrases it as "try n = ceil(sum / C),
n + 1, ... bins with first-fit-decreasing and stop at the first fit"; that search ends at
exactly the FFD bin count (first-fit into n pre-opened bins behaves like plain FFD until
plain FFD would open bin n + 1), so we run FFD once. When FFD is above the lower bound
``max(ceil(sum / C), #items longer than C / 2)`` we also try best-fit-decreasing and keep
whichever needs fewer bins, so the result is never worse than FFD.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np

from chunkflow.data.types import PackedRow, Sample

__all__ = [
    "Piece",
    "build_row",
    "empty_row",
    "bin_lower_bound",
    "first_fit_decreasing",
    "best_fit_decreasing",
    "pack_lengths",
    "pack_samples",
]

Piece = tuple[Sample, int, int]  # (sample, start, end): tokens [start, end) of the sample


def build_row(
    pieces: Sequence[Piece],
    *,
    chunk_index: int = 0,
    num_chunks: int = 1,
    dependent: bool = False,
) -> PackedRow:
    """Concatenate ``pieces`` into one :class:`PackedRow` (see the module docstring).

    Each piece contributes one ``cu_seqlens`` segment and its sample id; position ids run
    ``start .. end - 1`` of that sample. No piece may be empty. A one-piece row holds
    views of the sample's arrays (no copy): treat rows as read-only.
    """
    if not pieces:
        return empty_row()
    for s, start, end in pieces:
        if not 0 <= start < end <= len(s):
            raise ValueError(
                f"piece [{start}, {end}) of sample {s.sample_id} (length {len(s)}) is empty "
                "or out of range"
            )
    lengths = [end - start for _, start, end in pieces]
    cu_seqlens = np.asarray([0, *itertools.accumulate(lengths)], dtype=np.int32)
    if len(pieces) == 1:
        s, start, end = pieces[0]
        input_ids, labels, loss_mask = s.input_ids[start:end], s.labels[start:end], s.loss_mask[start:end]
        position_ids = np.arange(start, end, dtype=np.int64)
    else:
        input_ids = np.concatenate([s.input_ids[a:b] for s, a, b in pieces])
        labels = np.concatenate([s.labels[a:b] for s, a, b in pieces])
        loss_mask = np.concatenate([s.loss_mask[a:b] for s, a, b in pieces])
        # One arange over the row, shifted per piece by (start - row offset of the piece).
        shift = np.asarray([a for _, a, _ in pieces], dtype=np.int64) - cu_seqlens[:-1]
        position_ids = np.arange(int(cu_seqlens[-1]), dtype=np.int64) + np.repeat(shift, lengths)
    return PackedRow(
        input_ids=input_ids.astype(np.int64, copy=False),
        labels=labels.astype(np.int64, copy=False),
        loss_mask=loss_mask.astype(np.float32, copy=False),
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        sample_ids=[s.sample_id for s, _, _ in pieces],
        chunk_index=chunk_index,
        num_chunks=num_chunks,
        dependent=dependent,
    )


def empty_row() -> PackedRow:
    """A row with no tokens: a micro-batch with nothing to do (``cu_seqlens == [0]``)."""
    return PackedRow(
        input_ids=np.zeros(0, dtype=np.int64),
        labels=np.zeros(0, dtype=np.int64),
        loss_mask=np.zeros(0, dtype=np.float32),
        position_ids=np.zeros(0, dtype=np.int64),
        cu_seqlens=np.zeros(1, dtype=np.int32),
    )


def bin_lower_bound(lengths: Sequence[int], capacity: int) -> int:
    """No packing uses fewer bins than ``max(ceil(sum / capacity), #lengths > capacity/2)``."""
    total = int(sum(lengths))
    num_big = sum(1 for n in lengths if 2 * n > capacity)
    return max(-(-total // capacity), num_big)


def _decreasing_order(lengths: Sequence[int], keys: Optional[Sequence[int]]) -> list[int]:
    keys = range(len(lengths)) if keys is None else keys
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], keys[i], i))


def _fit_decreasing(lengths, capacity, keys, best: bool) -> list[list[int]]:
    order = _decreasing_order(lengths, keys)
    room = np.empty(len(lengths), dtype=np.int64)  # room[b] = free tokens in bin b
    bins: list[list[int]] = []
    for i in order:
        size = lengths[i]
        k = len(bins)
        fits = room[:k] >= size
        if best and k:
            slack = np.where(fits, room[:k] - size, capacity + 1)
            b = int(slack.argmin())
            found = bool(fits[b])
        else:
            b = int(fits.argmax()) if k else 0
            found = bool(k and fits[b])
        if not found:
            b = k
            bins.append([])
            room[b] = capacity
        bins[b].append(i)
        room[b] -= size
    return bins


def _check_lengths(lengths: Sequence[int], capacity: int) -> None:
    if capacity <= 0:
        raise ValueError(f"bin capacity must be positive, got {capacity}")
    for n in lengths:
        if not 0 < n <= capacity:
            raise ValueError(f"cannot pack an item of length {n} into bins of capacity {capacity}")


def first_fit_decreasing(
    lengths: Sequence[int], capacity: int, keys: Optional[Sequence[int]] = None
) -> list[list[int]]:
    """Plain FFD: bins (lists of item indices, in placement order), in opening order."""
    _check_lengths(lengths, capacity)
    return _fit_decreasing(lengths, capacity, keys, best=False)


def best_fit_decreasing(
    lengths: Sequence[int], capacity: int, keys: Optional[Sequence[int]] = None
) -> list[list[int]]:
    """Best-fit-decreasing: each item goes to the open bin it leaves with least room."""
    _check_lengths(lengths, capacity)
    return _fit_decreasing(lengths, capacity, keys, best=True)


def pack_lengths(
    lengths: Sequence[int], capacity: int, keys: Optional[Sequence[int]] = None
) -> list[list[int]]:
    """Pack items into few bins of ``capacity``; never more bins than FFD (module doc).

    Returns lists of item indices, one per bin. ``keys`` (e.g. sample ids) break ties
    between equal lengths, which makes the result independent of the input order for
    distinct keys. Deterministic.
    """
    lengths = [int(n) for n in lengths]
    _check_lengths(lengths, capacity)
    bins = _fit_decreasing(lengths, capacity, keys, best=False)
    if len(bins) > bin_lower_bound(lengths, capacity):
        alt = _fit_decreasing(lengths, capacity, keys, best=True)
        if len(alt) < len(bins):
            bins = alt
    return bins


def pack_samples(samples: Sequence[Sample], capacity: int) -> list[PackedRow]:
    """Bin-pack whole samples into rows of at most ``capacity`` tokens (THD micro-batches).

    Rows come out in bin-opening order (the first holds the longest sample); inside a row
    samples are in placement order (longest first, ties by sample id). Every sample
    appears in exactly one row with position ids restarting at 0::

        samples 7 (5 tokens), 3 (2 tokens), 9 (4 tokens); capacity 6
        FFD order 7, 9, 3:  row 0  [7]       cu_seqlens [0, 5]     positions 0..4
                            row 1  [9, 3]    cu_seqlens [0, 4, 6]  positions 0..3 0 1
    """
    for s in samples:
        if len(s) == 0:
            raise ValueError(f"sample {s.sample_id} has no tokens; drop it before packing")
        if len(s) > capacity:
            raise ValueError(
                f"sample {s.sample_id} has {len(s)} tokens, more than the row capacity "
                f"{capacity}; raise data.max_seq_len or set data.overlong=truncate|drop"
            )
    bins = pack_lengths([len(s) for s in samples], capacity, [s.sample_id for s in samples])
    return [build_row([(samples[i], 0, len(samples[i])) for i in b]) for b in bins]
