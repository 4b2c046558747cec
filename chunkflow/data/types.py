"""The two data types every stage of chunkflow passes around.

A :class:`Sample` is one training example after tokenisation, already shifted for
next-token prediction: a raw document ``d_0 d_1 ... d_n`` becomes

    input_ids  = d_0 d_1 ... d_{n-1}        (length L = n)
    labels     = d_1 d_2 ... d_n
    loss_mask  = 1 where labels[t] is trained on (e.g. assistant turns), else 0

so every position has a real label and slicing the three arrays together keeps them
aligned. ``len(sample)`` is L, the number of positions the model runs.

A :class:`PackedRow` is what the model executes in one forward: one row of at most
``capacity`` tokens holding either several whole samples (a Megatron micro-batch or a
ChunkFlow *standalone* chunk) or one piece of a long sample (a ChunkFlow *dependent*
chunk). Example, samples a (3 tokens) and b (2 tokens) packed into one row::

    input_ids     a0 a1 a2 b0 b1
    position_ids   0  1  2  0  1          restart per sample
    cu_seqlens    [0, 3, 5]               sample boundaries
    sample_ids    [a, b]

Dependent chunk j (of N) of a long sample s with chunk size C holds tokens
[jC, min((j+1)C, L)) and position ids jC, jC+1, ...; its cu_seqlens is [0, len].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Sample", "PackedRow"]


@dataclass(frozen=True, eq=False)
class Sample:
    """One shifted training example (see module docstring)."""

    sample_id: int  # global index in the dataset order; stable across runs
    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64
    loss_mask: np.ndarray  # (L,) float32, 1.0 = trained on

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


@dataclass(eq=False)
class PackedRow:
    """One row of packed tokens run by one forward pass (see module docstring).

    For a dependent chunk ``num_chunks > 1`` (or ``dependent`` is True),
    ``sample_ids == [s]`` and ``chunk_index`` is j. For a packed row of whole samples
    ``chunk_index == 0`` and ``num_chunks == 1``.
    """

    input_ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64
    loss_mask: np.ndarray  # (T,) float32
    position_ids: np.ndarray  # (T,) int64
    cu_seqlens: np.ndarray  # (num_samples + 1,) int32, [0, ..., T]
    sample_ids: list[int] = field(default_factory=list)
    chunk_index: int = 0
    num_chunks: int = 1
    dependent: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def seqlens(self) -> np.ndarray:
        return np.diff(self.cu_seqlens)
