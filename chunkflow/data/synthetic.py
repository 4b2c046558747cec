"""Deterministic, long-tailed synthetic SFT data whose loss needs long-range attention.

**Lengths** (:func:`synthetic_lengths`) follow the long-tailed shape of long-context SFT data (LMSYS-Chat-1M, the Llama-3 report),
with bands relative to ``M = max_seq_len`` (bounds for M = 1024, ``min_len`` = 8)::

    band     fraction (default)   lengths            M = 1024
    short    short_fraction  0.90  [min_len, M/32]    [8, 32]
    medium   medium_fraction 0.08  (M/32, M/8]        [33, 128]
    long     long_fraction   0.02  (M/8, M]           [129, 1024]
      of which exactly at M: max_len_fraction 0.005   1024

**Llama 3's SFT mix** (``distribution: llama3_sft``): the category fractions and mean
lengths (tokens per example) of the SFT data statistics table of "The Llama 3 Herd of
Models" (Meta, 2024, Table 7): 99.89% of examples average under 1K tokens, 0.11% are long
context at ~38K on average. Only means are published, so each category's lengths are
exponential (the maximum-entropy law for a given mean) with that mean / ``length_scale``,
rounded and cut to ``[min_len, max_seq_len]``; counts per category are exact as below::

    category              fraction   mean tokens
    general English        52.66%        974.0
    code                   14.89%        753.3
    multilingual            3.01%        520.5
    exam-like               8.14%        297.8
    reasoning and tools    21.19%        661.6
    long context            0.11%     38,135.6

Counts are exact, not sampled: ``num_samples * fraction`` rounded by largest remainder,
and ``n_max = floor(num_samples * max_len_fraction + 0.5)`` samples (part of the long
band) have length exactly M; so there is at least one sample at M as soon as
``num_samples >= 1 / (2 * max_len_fraction)``. The other lengths are uniform inside their
band (the long band's below M), and the order is a random permutation. If M is so small
that a band is empty (M/32 < min_len), its samples take the length of the band's upper
bound. Length = ``len(Sample)``, the number of positions after shifting.

**Content** (:func:`make_synthetic`) is a key -> value recall task over a locally
predictable filler. Token ids (vocab V >= 16; K = min(32, (V - 4) // 4) keys and as many
values, F = min(64, V - 4 - 2K) filler ids; ids above those are never used)::

    0 PAD (unused)  1 BOS  2 KEY  3 QUERY  [4, 4+K) keys  [4+K, 4+2K) values
    [4+2K, 4+2K+F) filler          V = 512: keys 4..35, values 36..67, filler 68..131

A sample of L positions is a raw sequence of L + 1 tokens. L = 24 (two pairs), V = 512::

    raw  BOS KEY 28 67 KEY 35 62 | 71 72 .. 79 | QUERY 28 67 | 80 81 82 | QUERY 35 62
    idx   0   1   2  3  4   5  6    7       15    16   17 18   19     21    22   23 24
    input_ids = raw[:-1]; labels = raw[1:]; loss_mask = 1 everywhere
    long-range labels (recall_mask): position 17 -> 67 and position 23 -> 62

- ``p = min(32, K, 1 + (L - 6) // 16)`` pairs ``KEY k v`` follow BOS, with distinct
  random keys and distinct random values: 1 or 2 pairs in short samples, 32 in long ones.
- The filler counts up through the filler ids from a random start, wrapping around
  (``f_{i+1} = f_i + 1`` modulo F): a bigram a tiny model picks up within a few dozen
  steps, so the mean loss falls fast.
- Each key is queried exactly once, in random order, as ``QUERY k v``; the queries are
  spread over the second half of the filler and the last one ends the sample. The filler
  count resumes after a query.

Only the value label after ``QUERY k`` (:func:`recall_mask`) needs long range: the value
appears nowhere but in its pair at the start, at least half the sample earlier, so its
loss falls only if attention (and its gradient) reaches back across the whole sample,
e.g. across every chunk boundary of a long sample. All other labels are predictable from
the last few tokens (filler, ``KEY`` after ``BOS``, the count resuming after a query) or
are noise (the pair tokens, which key is queried next). Measured with a 4-layer,
128-hidden decoder, 16 samples per step, M = 1024, V = 512: with the tiny_cpu schedule
(lr 1e-3, cosine to 1e-4 over 40 steps) the mean loss falls from 6.3 to ~3.6 in 40 steps,
from the filler; at a constant lr 1e-3 the recall loss stays near ln K = 3.5 (guessing
among the values) until an induction-style head forms around step 600, then drops to ~1.4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chunkflow.config.loader import ConfigError
from chunkflow.config.schema import SyntheticConfig
from chunkflow.data.types import Sample

__all__ = [
    "SyntheticVocab",
    "synthetic_lengths",
    "llama3_sft_lengths",
    "LLAMA3_SFT",
    "band_bounds",
    "make_synthetic",
    "recall_mask",
    "MIN_RECALL_LEN",
]

PAD, BOS, KEY, QUERY = 0, 1, 2, 3
# (fraction of examples, mean tokens per example): Llama 3 report, SFT data statistics.
LLAMA3_SFT = ((0.5266, 974.0), (0.1489, 753.3), (0.0301, 520.5), (0.0814, 297.8), (0.2119, 661.6),
              (0.0011, 38135.6))
MIN_RECALL_LEN = 6  # BOS KEY k v QUERY k v = 7 raw tokens = 6 positions
MIN_VOCAB = 16
MAX_KEYS = 32  # keys, and as many values: few enough that recall is learnt in ~600 steps
MAX_FILLER = 64  # filler ids: few enough that the counting bigram is learnt fast
MAX_PAIRS = 32
POSITIONS_PER_PAIR = 16


@dataclass(frozen=True)
class SyntheticVocab:
    """Where keys, values and filler live in a vocabulary of ``vocab_size`` ids."""

    vocab_size: int
    num_keys: int  # keys are [key_lo, key_lo + num_keys); values follow, same count

    @staticmethod
    def for_vocab(vocab_size: int) -> "SyntheticVocab":
        if vocab_size < MIN_VOCAB:
            raise ConfigError(
                f"model.vocab_size={vocab_size} is too small for synthetic data; "
                f"use at least {MIN_VOCAB}"
            )
        return SyntheticVocab(vocab_size, min(MAX_KEYS, (vocab_size - 4) // 4))

    @property
    def key_lo(self) -> int:
        return 4

    @property
    def value_lo(self) -> int:
        return 4 + self.num_keys

    @property
    def filler_lo(self) -> int:
        return 4 + 2 * self.num_keys

    @property
    def num_filler(self) -> int:
        return min(MAX_FILLER, self.vocab_size - self.filler_lo)


def _check_fractions(cfg: SyntheticConfig) -> None:
    names = ("short_fraction", "medium_fraction", "long_fraction", "max_len_fraction")
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"data.synthetic.{name}={value} must be in [0, 1]")
    total = cfg.short_fraction + cfg.medium_fraction + cfg.long_fraction
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"data.synthetic.short_fraction + medium_fraction + long_fraction = {total:g}; "
            "they must sum to 1"
        )
    if cfg.max_len_fraction > cfg.long_fraction:
        raise ConfigError(
            f"data.synthetic.max_len_fraction={cfg.max_len_fraction} exceeds "
            f"data.synthetic.long_fraction={cfg.long_fraction}: the samples at max_seq_len "
            "are part of the long band"
        )
    if cfg.num_samples < 1:
        raise ConfigError(f"data.synthetic.num_samples={cfg.num_samples} must be >= 1")


def band_bounds(max_seq_len: int, min_len: int) -> list[tuple[int, int]]:
    """Inclusive ``(lo, hi)`` length bounds of the short, medium and long bands.

    >>> band_bounds(1024, 8)
    [(8, 32), (33, 128), (129, 1024)]
    """
    if not 1 <= min_len <= max_seq_len:
        raise ConfigError(
            f"data.synthetic.min_len={min_len} must be in [1, data.max_seq_len={max_seq_len}]"
        )
    short_hi = min(max(max_seq_len // 32, min_len), max_seq_len)
    medium_hi = min(max(max_seq_len // 8, short_hi), max_seq_len)
    return [
        (min_len, short_hi),
        (min(short_hi + 1, medium_hi), medium_hi),
        (min(medium_hi + 1, max_seq_len), max_seq_len),
    ]


def _band_counts(cfg: SyntheticConfig) -> tuple[list[int], int]:
    """Exact samples per band (largest remainder) and how many long ones sit at max."""
    n = cfg.num_samples
    wanted = np.array([cfg.short_fraction, cfg.medium_fraction, cfg.long_fraction]) * n
    counts = np.floor(wanted).astype(np.int64)
    by_remainder = np.argsort(-(wanted - counts), kind="stable")
    counts[by_remainder[: n - int(counts.sum())]] += 1
    num_at_max = int(np.floor(n * cfg.max_len_fraction + 0.5))
    if num_at_max > counts[2]:  # rounding only: take the missing ones from the biggest band
        extra = num_at_max - int(counts[2])
        counts[int(np.argmax(counts[:2]))] -= extra
        counts[2] += extra
    return [int(c) for c in counts], num_at_max


def _exact_counts(n: int, fractions: list[float]) -> list[int]:
    """``n * fractions`` rounded by largest remainder (they sum to n)."""
    wanted = np.asarray(fractions, dtype=np.float64) / sum(fractions) * n
    counts = np.floor(wanted).astype(np.int64)
    counts[np.argsort(-(wanted - counts), kind="stable")[: n - int(counts.sum())]] += 1
    return [int(c) for c in counts]


def llama3_sft_lengths(cfg: SyntheticConfig, *, max_seq_len: int, seed: int) -> np.ndarray:
    """Lengths of the Llama 3 SFT mix (module docstring), scaled down by ``length_scale``."""
    rng = np.random.default_rng(seed)
    counts = _exact_counts(cfg.num_samples, [f for f, _ in LLAMA3_SFT])
    parts = [rng.exponential(mean / cfg.length_scale, size=c) for (_, mean), c in zip(LLAMA3_SFT, counts)]
    lengths = np.clip(np.rint(np.concatenate(parts)), cfg.min_len, max_seq_len).astype(np.int64)
    return lengths[rng.permutation(len(lengths))]


def synthetic_lengths(cfg: SyntheticConfig, *, max_seq_len: int, seed: int) -> np.ndarray:
    """The ``(num_samples,) int64`` sample lengths :func:`make_synthetic` uses for ``seed``."""
    if cfg.distribution == "llama3_sft":
        return llama3_sft_lengths(cfg, max_seq_len=max_seq_len, seed=seed)
    _check_fractions(cfg)
    bounds = band_bounds(max_seq_len, cfg.min_len)
    counts, num_at_max = _band_counts(cfg)
    rng = np.random.default_rng(seed)
    parts = [rng.integers(lo, hi + 1, size=c) for (lo, hi), c in zip(bounds[:2], counts[:2])]
    long_lo = bounds[2][0]
    long_hi = max_seq_len - 1 if long_lo < max_seq_len else max_seq_len
    parts.append(rng.integers(long_lo, long_hi + 1, size=counts[2] - num_at_max))
    parts.append(np.full(num_at_max, max_seq_len))
    lengths = np.concatenate(parts).astype(np.int64)
    return lengths[rng.permutation(len(lengths))]


def num_pairs(length: int, vocab: SyntheticVocab) -> int:
    """How many key -> value pairs a sample of ``length`` positions holds."""
    return min(MAX_PAIRS, vocab.num_keys, 1 + (length - MIN_RECALL_LEN) // POSITIONS_PER_PAIR)


def _raw_tokens(length: int, vocab: SyntheticVocab, rng: np.random.Generator) -> np.ndarray:
    """The ``(length + 1,)`` raw tokens of one sample (layout in the module docstring)."""
    p = num_pairs(length, vocab)
    keys = vocab.key_lo + rng.permutation(vocab.num_keys)[:p]
    values = vocab.value_lo + rng.permutation(vocab.num_keys)[:p]
    order = rng.permutation(p)
    start = int(rng.integers(0, vocab.num_filler))
    num_filler = length - 6 * p  # raw length + 1 = 1 (BOS) + 3p + filler + 3p

    head = np.stack([np.full(p, KEY), keys, values], axis=1).ravel()  # (3p,)
    queries = np.stack([np.full(p, QUERY), keys[order], values[order]], axis=1)  # (p, 3)
    # Query j comes after `before[j]` filler tokens: evenly over the second half, last at end.
    half = num_filler // 2
    j = np.arange(p)
    before = half + ((j + 1) * (num_filler - half)) // p
    query_pos = (before + 3 * j)[:, None] + np.arange(3)  # (p, 3) positions in the tail
    tail = np.empty(num_filler + 3 * p, dtype=np.int64)
    is_filler = np.ones(len(tail), dtype=bool)
    is_filler[query_pos] = False
    tail[query_pos] = queries
    tail[is_filler] = vocab.filler_lo + (start + np.arange(num_filler)) % vocab.num_filler
    return np.concatenate([[BOS], head, tail]).astype(np.int64)


def make_synthetic(
    cfg: SyntheticConfig, *, max_seq_len: int, vocab_size: int, seed: int
) -> list[Sample]:
    """``cfg.num_samples`` samples, deterministic in ``seed``; sample_id = list index.

    Lengths equal ``synthetic_lengths(cfg, max_seq_len=..., seed=seed)``; the content is
    drawn from a second stream seeded by ``(seed, 1)``.
    """
    if cfg.min_len < MIN_RECALL_LEN:
        raise ConfigError(
            f"data.synthetic.min_len={cfg.min_len} is too short for the recall task; use at "
            f"least {MIN_RECALL_LEN} (BOS KEY k v ... QUERY k v)"
        )
    vocab = SyntheticVocab.for_vocab(vocab_size)
    lengths = synthetic_lengths(cfg, max_seq_len=max_seq_len, seed=seed)
    rng = np.random.default_rng([seed, 1])
    samples = []
    for sample_id, length in enumerate(lengths.tolist()):
        raw = _raw_tokens(length, vocab, rng)
        samples.append(
            Sample(
                sample_id=sample_id,
                input_ids=raw[:-1].copy(),
                labels=raw[1:].copy(),
                loss_mask=np.ones(length, dtype=np.float32),
            )
        )
    return samples


def recall_mask(input_ids: np.ndarray) -> np.ndarray:
    """``(L,) bool``: True where the label is a recalled value (the long-range targets).

    Position t is one when ``input_ids[t-1] == QUERY`` (so ``input_ids[t]`` is the key
    and ``labels[t]`` its value). Use it to report the long-range part of the loss.
    """
    mask = np.zeros(len(input_ids), dtype=bool)
    mask[1:] = np.asarray(input_ids[:-1]) == QUERY
    return mask
