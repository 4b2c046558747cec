"""SpaCO: which chunks of a long sample are back-propagated, and by how much they count.

SeCO (docs/seco_spaco.md) runs every chunk of a long sample forward (K/V into the state store),
then back-propagates every chunk in descending order: exact gradients. SpaCO forwards
all chunks the same way but back-propagates only a random subset S of the k chunks and
compensates for the rest. Pure: no torch, no process group.

Where the gradient goes (one long sample of k chunks, loss L = sum_j L_j)::

    chunk:        0          1          2          3
    loss:         L_0        L_1        L_2        L_3
    K/V leaf:     KV_0  <--  KV_1  <--  KV_2  <--  KV_3      (<-- = attended to by later chunks)

The full gradient is a sum over *chains*: a loss L_{j0}, back-propagated through chunk
j0's graph, handed to the K/V leaf of an earlier chunk j1 < j0, through chunk j1's graph,
... to chunk jq, whose graph yields the parameter-gradient term. A chain with q hand-offs
(q "hops") visits q + 1 chunks and is computed only if all of them are in S (an
unselected chunk is never rebuilt, so the gradient arriving at its K/V is dropped).

Compensation, with factor c = k / t (``Selection.loss_factor`` = ``hop_factor`` = c):

* the loss of a selected chunk is scaled by c (its backward is seeded with c, not 1);
* each hand-off is scaled by c: when a selected chunk's graph adds the gradient its K/V
  slice accumulated from later chunks (``state._ChunkAttention``), it multiplies it by c.
  Every chunk boundary a chain crosses multiplies once more, so a q-hop chain carries
  c^(q+1) (c for its loss, c^q for its hops: the paper's "(k/t)^p" per chain).

Expectation of a q-hop chain's weight, with chain chunks j0 > ... > jq:

* ``bernoulli``: each chunk is selected independently with probability p = t/k, so
  E[c^(q+1) * prod_i 1{ji in S}] = (1/p)^(q+1) * p^(q+1) = 1. Unbiased, every q.
* ``without_replacement`` (exactly t chunks, the paper's code):
  P(q+1 given chunks all in S) = prod_{r=0..q} (t-r)/(k-r), so
  E[weight] = prod_{r=1..q} (1 - r/t) / (1 - r/k)  (< 1 for q >= 1: biased low;
  e.g. 0.88 for one hop at k=128, t=8; 0 once q >= t). Loss terms (q = 0) are unbiased.
* a cap ``max_factor`` < k/t replaces c by the cap: every q-hop term is then scaled by
  (cap * t/k)^(q+1) in expectation, i.e. biased low by design.

Selections are a pure function of (seed, step, sample id): every tensor-parallel rank
draws the same chunks, and a resumed run draws what the uninterrupted run would have.
Standalone chunks (short samples) are not sampled: they are always back-propagated.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

__all__ = ["SAMPLERS", "Selection", "SpaCOSampler", "FixedSelection", "expected_chain_weight",
           "num_budget_chunks"]

SAMPLERS = ("bernoulli", "without_replacement")


@dataclass(frozen=True)
class Selection:
    """The chunks of one long sample to back-propagate, and the compensation factors."""

    chunks: frozenset  # chunk indices in S
    loss_factor: float = 1.0  # seed of a selected chunk's backward (its loss x this)
    hop_factor: float = 1.0  # x this on every K/V-gradient hand-off into a selected chunk


def num_budget_chunks(budget: float, num_chunks: int) -> float:
    """t for a sample of ``num_chunks`` chunks: ``budget`` chunks if >= 1, else a fraction.

    For a fraction the result may be non-integral (Bernoulli needs only p = t/k);
    ``without_replacement`` rounds it (at least 1 chunk).
    """
    if budget <= 0:
        raise ValueError(f"SpaCO budget must be positive, got {budget}")
    if budget >= 1:
        if not float(budget).is_integer():
            raise ValueError(f"SpaCO budget {budget} >= 1 is a chunk count and must be a whole number")
        return float(min(int(budget), num_chunks))
    return budget * num_chunks


def _key(sample: Hashable) -> int:
    if isinstance(sample, (int, np.integer)) and sample >= 0:
        return int(sample)
    return zlib.crc32(repr(sample).encode())


@dataclass(frozen=True)
class SpaCOSampler:
    """Draws a :class:`Selection` per (sample, step); see the module docstring.

    ``budget``: t as a chunk count (>= 1) or a fraction of k (in (0, 1)).
    ``max_factor``: cap on c = k/t (0 = none, the unbiased default).
    """

    budget: float
    sampler: str = "bernoulli"
    max_factor: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"SpaCO sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        num_budget_chunks(self.budget, 1)  # validates
        if self.max_factor and self.max_factor < 1:
            raise ValueError(f"SpaCO max_factor={self.max_factor} must be 0 (no cap) or >= 1")

    def _factor(self, p: float) -> float:
        c = 1.0 / p
        return min(c, self.max_factor) if self.max_factor else c

    def select(self, sample: Hashable, num_chunks: int, step: int) -> Selection:
        k = int(num_chunks)
        t = num_budget_chunks(self.budget, k)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(step), _key(sample), k])
        if self.sampler == "bernoulli":
            p = min(t / k, 1.0)
            chosen = np.flatnonzero(rng.random(k) < p) if p < 1 else np.arange(k)
        else:
            n = max(1, min(k, int(round(t))))
            p = n / k
            chosen = np.sort(rng.choice(k, size=n, replace=False))
        c = self._factor(p)
        return Selection(frozenset(int(j) for j in chosen), c, c)


@dataclass(frozen=True)
class FixedSelection:
    """A sampler stand-in that always returns the same chunks and factors (tests, tools)."""

    chunks: Sequence[int]
    loss_factor: float = 1.0
    hop_factor: float = 1.0

    def select(self, sample: Hashable, num_chunks: int, step: int) -> Selection:
        chosen = frozenset(j for j in self.chunks if 0 <= j < num_chunks)
        return Selection(chosen, self.loss_factor, self.hop_factor)


def expected_chain_weight(q: int, k: int, t: float, sampler: str, max_factor: float = 0.0) -> float:
    """E[weight of one q-hop chain] under ``sampler`` (1.0 = unbiased); module docstring."""
    if sampler == "bernoulli":
        p = min(t / k, 1.0)
        c = min(1 / p, max_factor) if max_factor else 1 / p
        return (c * p) ** (q + 1)
    if sampler != "without_replacement":
        raise ValueError(f"unknown sampler {sampler!r}")
    n = max(1, min(k, int(round(t))))
    c = min(k / n, max_factor) if max_factor else k / n
    # P(q+1 fixed chunks all chosen) = C(k-q-1, n-q-1) / C(k, n)
    prob = math.comb(k - q - 1, n - q - 1) / math.comb(k, n) if q + 1 <= n else 0.0
    return c ** (q + 1) * prob
