"""ChunkFlow chunk construction (docs/chunkflow.md): one global batch -> uniform chunks.

Pure: no process group, no torch. With chunk size C, a global batch becomes

* for every sample with L > C: N = ceil(L / C) **dependent** chunks, chunk j holding
  tokens [jC, min((j+1)C, L)) with position ids jC, jC+1, ...; chunk j later attends to
  the K/V of chunks 0..j-1 of the same sample (the executor's business, not ours);
* all samples with L <= C bin-packed into as few **standalone** chunks of capacity C as
  the packer finds (``packing.pack_lengths``: first-fit-decreasing or better), each
  sample attending only to itself, position ids restarting at 0.

Example, C = 4, samples a (2 tokens), b (3), c (1), s (9); FFD places b, a, c::

    standalone  b0 b1 b2 c0       pos 0 1 2 0      cu [0, 3, 4]  ids [b, c]
                a0 a1             pos 0 1          cu [0, 2]     ids [a]
    dependent   s0 s1 s2 s3       pos 0 1 2 3      cu [0, 4]     ids [s]  j=0 N=3
                s4 s5 s6 s7       pos 4 5 6 7      cu [0, 4]     ids [s]  j=1 N=3
                s8                pos 8            cu [0, 1]     ids [s]  j=2 N=3

A sample of exactly C tokens is one standalone chunk (N = 1); C + 1 tokens give two
dependent chunks of C and 1 tokens. A dependent chunk never holds anything but its own
sample's tokens. Output order: standalone chunks first (packer order), then each long
sample's dependent chunks in ascending j, long samples in batch order.
"""

from __future__ import annotations

from typing import Sequence

from chunkflow.data.packing import build_row, pack_samples
from chunkflow.data.types import PackedRow, Sample

__all__ = ["num_chunks", "split_sample", "build_chunks", "check_unique_ids"]


def num_chunks(length: int, chunk_size: int) -> int:
    """How many chunks a sample of ``length`` tokens occupies on its own: ceil(L / C)."""
    return -(-length // chunk_size)


def split_sample(sample: Sample, chunk_size: int) -> list[PackedRow]:
    """The N = ceil(L / C) dependent chunks of one long sample (L > C), in order."""
    length = len(sample)
    if length <= chunk_size:
        raise ValueError(
            f"sample {sample.sample_id} has {length} <= chunk_size={chunk_size} tokens; "
            "it is packed into a standalone chunk, not split"
        )
    n = num_chunks(length, chunk_size)
    return [
        build_row(
            [(sample, j * chunk_size, min((j + 1) * chunk_size, length))],
            chunk_index=j,
            num_chunks=n,
            dependent=True,
        )
        for j in range(n)
    ]


def check_unique_ids(samples: Sequence[Sample]) -> None:
    """Chunks and plans name samples by id, so a batch must not repeat one."""
    seen: set[int] = set()
    for s in samples:
        if s.sample_id in seen:
            raise ValueError(
                f"sample id {s.sample_id} appears twice in one global batch; sample ids "
                "must be unique within a batch (they key dependent chunks and K/V state)"
            )
        seen.add(s.sample_id)


def build_chunks(samples: Sequence[Sample], chunk_size: int) -> list[PackedRow]:
    """Turn one global batch into standalone and dependent chunks of <= ``chunk_size``.

    Deterministic for a given batch and chunk size (see the module docstring for the
    layout and order). Raises ``ValueError`` for a non-positive chunk size, an empty
    sample, or a sample id repeated within the batch.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunkflow.chunk_size={chunk_size} is invalid: use a positive integer")
    check_unique_ids(samples)
    short = [s for s in samples if len(s) <= chunk_size]
    long = [s for s in samples if len(s) > chunk_size]
    chunks = pack_samples(short, chunk_size)
    for s in long:
        chunks.extend(split_sample(s, chunk_size))
    return chunks
