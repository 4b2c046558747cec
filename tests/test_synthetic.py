"""Synthetic data: determinism, the long-tailed length histogram, and the recall task."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from chunkflow.config.loader import ConfigError
from chunkflow.config.schema import SyntheticConfig
from chunkflow.data.synthetic import (
    BOS,
    KEY,
    PAD,
    QUERY,
    SyntheticVocab,
    band_bounds,
    make_synthetic,
    recall_mask,
    synthetic_lengths,
)

VOCAB = 512


def make(num_samples: int = 512, max_seq_len: int = 1024, seed: int = 0, **kw):
    cfg = SyntheticConfig(num_samples=num_samples, **kw)
    return make_synthetic(cfg, max_seq_len=max_seq_len, vocab_size=VOCAB, seed=seed)


def raw_tokens(sample) -> np.ndarray:
    return np.concatenate([sample.input_ids[:1], sample.labels])


def test_deterministic_by_seed() -> None:
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    assert len(a) == len(b) == 512
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.labels, y.labels)
    assert [len(x) for x in a] != [len(x) for x in c]
    same_len = [(x, y) for x, y in zip(a, c) if len(x) == len(y)]
    assert not all(np.array_equal(x.input_ids, y.input_ids) for x, y in same_len)
    assert [s.sample_id for s in a] == list(range(512))
    # the content depends on the seed too, not only through the lengths
    d, e = make(num_samples=20, max_seq_len=8, min_len=8, seed=1), make(
        num_samples=20, max_seq_len=8, min_len=8, seed=2
    )
    assert {len(x) for x in d + e} == {8}
    assert any(not np.array_equal(x.input_ids, y.input_ids) for x, y in zip(d, e))


def test_lengths_match_synthetic_lengths() -> None:
    cfg = SyntheticConfig(num_samples=300)
    lengths = synthetic_lengths(cfg, max_seq_len=2048, seed=9)
    samples = make_synthetic(cfg, max_seq_len=2048, vocab_size=VOCAB, seed=9)
    assert lengths.dtype == np.int64
    assert lengths.tolist() == [len(s) for s in samples]


def test_band_bounds() -> None:
    assert band_bounds(1024, 8) == [(8, 32), (33, 128), (129, 1024)]
    assert band_bounds(4096, 8) == [(8, 128), (129, 512), (513, 4096)]
    assert band_bounds(64, 8) == [(8, 8), (8, 8), (9, 64)]  # empty bands collapse
    with pytest.raises(ConfigError, match="min_len"):
        band_bounds(16, 17)


@pytest.mark.parametrize("max_seq_len", [1024, 4096])
@pytest.mark.parametrize("seed", [0, 1])
def test_length_histogram_matches_fractions(max_seq_len: int, seed: int) -> None:
    cfg = SyntheticConfig(num_samples=5000)
    lengths = synthetic_lengths(cfg, max_seq_len=max_seq_len, seed=seed)
    n = len(lengths)
    assert n == cfg.num_samples
    assert lengths.min() >= cfg.min_len and lengths.max() <= max_seq_len
    bands = {
        "short": (lengths <= max_seq_len // 32, cfg.short_fraction),
        "medium": ((lengths > max_seq_len // 32) & (lengths <= max_seq_len // 8),
                   cfg.medium_fraction),
        "long": (lengths > max_seq_len // 8, cfg.long_fraction),
        "at max": (lengths == max_seq_len, cfg.max_len_fraction),
    }
    for name, (in_band, p) in bands.items():
        tolerance = 4 * math.sqrt(n * p * (1 - p)) + 1  # 4 binomial sigma
        assert abs(int(in_band.sum()) - n * p) <= tolerance, (name, int(in_band.sum()), n * p)
    # lengths spread over each band rather than sitting at one value
    for lo, hi in band_bounds(max_seq_len, cfg.min_len):
        in_band = lengths[(lengths >= lo) & (lengths < hi)]
        assert len(np.unique(in_band)) > min(10, (hi - lo) // 2)


@pytest.mark.parametrize("num_samples", [99, 100, 200, 301, 777, 2048])
def test_samples_at_max(num_samples: int) -> None:
    """Documented rule: floor(n * max_len_fraction + 1/2) samples sit at max_seq_len, so at
    least one once n >= 1 / (2 * max_len_fraction) = 100 for the default 0.005."""
    for seed in range(3):
        lengths = synthetic_lengths(
            SyntheticConfig(num_samples=num_samples), max_seq_len=512, seed=seed
        )
        assert (lengths == 512).sum() == int(num_samples * 0.005 + 0.5)
        assert (lengths.max() == 512) == (num_samples >= 100)


def test_order_is_shuffled() -> None:
    lengths = synthetic_lengths(SyntheticConfig(num_samples=2000), max_seq_len=1024, seed=0)
    long_at = np.flatnonzero(lengths > 1024 // 8)
    assert 0.3 < long_at.mean() / len(lengths) < 0.7  # not bunched at either end
    assert (np.diff(lengths) < 0).any() and (np.diff(lengths) > 0).any()


def test_no_sample_at_max_when_fraction_is_zero() -> None:
    cfg = SyntheticConfig(num_samples=3000, max_len_fraction=0.0)
    lengths = synthetic_lengths(cfg, max_seq_len=256, seed=0)
    assert lengths.max() < 256 and (lengths > 256 // 8).sum() == 60


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="sum to 1"):
        synthetic_lengths(SyntheticConfig(short_fraction=0.5), max_seq_len=64, seed=0)
    with pytest.raises(ConfigError, match="max_len_fraction"):
        synthetic_lengths(SyntheticConfig(max_len_fraction=0.1), max_seq_len=64, seed=0)
    with pytest.raises(ConfigError, match=r"data\.synthetic\.min_len=4"):
        make(min_len=4)
    with pytest.raises(ConfigError, match="vocab_size"):
        make_synthetic(SyntheticConfig(), max_seq_len=64, vocab_size=8, seed=0)


def pairs_of(raw: np.ndarray) -> dict[int, int]:
    """The KEY k v pairs after BOS."""
    pairs = {}
    i = 1
    while raw[i] == KEY:
        pairs[int(raw[i + 1])] = int(raw[i + 2])
        i += 3
    return pairs


@pytest.mark.parametrize("max_seq_len", [256, 4096])
def test_recall_answer_is_the_value_stated_at_the_start(max_seq_len: int) -> None:
    samples = make(num_samples=300, max_seq_len=max_seq_len, seed=5)
    vocab = SyntheticVocab.for_vocab(VOCAB)
    num_multi_pair = 0
    for sample in samples:
        raw = raw_tokens(sample)
        L = len(sample)
        assert raw[0] == BOS and raw.min() > PAD and raw.max() < VOCAB
        assert sample.loss_mask.dtype == np.float32 and sample.loss_mask.min() == 1.0
        np.testing.assert_array_equal(sample.labels[:-1], sample.input_ids[1:])
        pairs = pairs_of(raw)
        assert pairs and all(vocab.key_lo <= k < vocab.value_lo for k in pairs)
        assert all(vocab.value_lo <= v < vocab.filler_lo for v in pairs.values())
        num_multi_pair += len(pairs) > 1

        answers = np.flatnonzero(recall_mask(sample.input_ids))
        queried = [int(sample.input_ids[t]) for t in answers]
        assert sorted(queried) == sorted(pairs)  # every key queried exactly once
        for t in answers:
            assert sample.labels[t] == pairs[int(sample.input_ids[t])]
            # the value appears nowhere between its pair and its query
            start = 1 + 3 * len(pairs)
            assert sample.labels[t] not in raw[start : t + 1]
        assert answers[-1] == L - 1  # the last query ends the sample
        # queries lie in the second half of the filler: far from the pairs
        assert answers[0] >= 2 + 3 * len(pairs) + (L - 6 * len(pairs)) // 2

        filler = raw >= vocab.filler_lo
        follows = filler[:-1] & filler[1:]
        step = (raw[1:][follows] - raw[:-1][follows]) % vocab.num_filler
        assert np.all(step == 1)  # the filler counts up by one
    if max_seq_len == 4096:
        assert num_multi_pair > 0


def test_recall_mask_positions() -> None:
    ids = np.array([BOS, KEY, 10, 200, 300, QUERY, 10, 301])
    assert np.flatnonzero(recall_mask(ids)).tolist() == [6]


def test_load_samples_makes_synthetic_data_when_path_is_empty() -> None:
    from chunkflow.config.schema import DataConfig
    from chunkflow.data.dataset import load_samples

    cfg = DataConfig(max_seq_len=512, seed=11)
    cfg.synthetic.num_samples = 400
    samples, description = load_samples(cfg, vocab_size=VOCAB)
    expected = synthetic_lengths(cfg.synthetic, max_seq_len=512, seed=11)
    assert [len(s) for s in samples] == expected.tolist()
    assert [s.sample_id for s in samples] == list(range(400))
    assert description.startswith("synthetic (seed 11): 400 samples")
    assert f"{int(expected.sum()):,} tokens" in description
    assert "2 at max" in description  # floor(400 * 0.005 + 0.5)
