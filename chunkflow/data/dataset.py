"""The run's samples: ``data.path`` (a JSONL file, a token store prepared by
``scripts/prepare_data.py``, or Megatron-LM ``.bin``/``.idx`` files) or synthetic data when
it is empty. A JSONL file is read into memory here; a store or Megatron files are
memory-mapped and each sample is built only when the loader asks for it
(:class:`chunkflow.data.store.StoreDataset`). The trainer turns a JSONL ``data.path``
into a cached store first (``chunkflow.train.data_cache``).

    samples, description = load_samples(cfg.data, vocab_size=cfg.model.vocab_size)
    log(description)
    # data/chat.jsonl: 9998 samples, 3,120,447 tokens (1,402,113 with loss), longest 4096; ...
    # synthetic (seed 1234): 2048 samples, 77,446 tokens, lengths 8..1024; short/medium/long ...

``samples[i].sample_id == i`` and the order is the file's (or the generator's): shuffling,
batching and data-parallel assignment belong to the loader, which must not change ids.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from chunkflow.config.schema import DataConfig
from chunkflow.data.reader import DataError, read_jsonl
from chunkflow.data.store import (MegatronTokens, StoreDataset, TokenStore, is_store, megatron_prefix,
                                  tokenizer_identity)
from chunkflow.data.synthetic import band_bounds, make_synthetic
from chunkflow.data.tokenizer import load_local_tokenizer
from chunkflow.data.types import Sample

__all__ = ["load_samples", "open_store", "describe_lengths"]


def load_samples(data_cfg: DataConfig, *, vocab_size: int) -> tuple[Sequence[Sample], str]:
    """Read or generate every sample of the run; return them and a one-line description."""
    if data_cfg.path and (is_store(data_cfg.path) or megatron_prefix(data_cfg.path)):
        dataset = open_store(data_cfg, vocab_size=vocab_size)
        return dataset, dataset.describe()
    if data_cfg.path:
        tokenizer = load_local_tokenizer(data_cfg.tokenizer) if data_cfg.tokenizer else None
        samples, stats = read_jsonl(
            data_cfg.path,
            max_seq_len=data_cfg.max_seq_len,
            vocab_size=vocab_size,
            overlong=data_cfg.overlong,
            tokenizer=tokenizer,
        )
        if not samples:
            raise DataError(f"data.path={data_cfg.path!r} holds no usable sample: "
                            f"{stats.summary()}")
        return samples, stats.summary()
    samples = make_synthetic(
        data_cfg.synthetic,
        max_seq_len=data_cfg.max_seq_len,
        vocab_size=vocab_size,
        seed=data_cfg.seed,
    )
    lengths = np.array([len(s) for s in samples])
    description = f"synthetic (seed {data_cfg.seed}): " + describe_lengths(
        lengths, data_cfg.max_seq_len, data_cfg.synthetic.min_len
    )
    return samples, description


def open_store(data_cfg: DataConfig, *, vocab_size: int) -> StoreDataset:
    """The store or Megatron files at ``data.path``, refused (:class:`DataError`) when the
    store was made with another tokenizer than ``data.tokenizer``, holds a token id
    >= ``vocab_size``, or (``data.overlong=error``) a sample longer than ``max_seq_len``."""
    path = data_cfg.path
    prefix = None if is_store(path) else megatron_prefix(path)
    source = MegatronTokens(prefix) if prefix else TokenStore(path)
    stored = source.index.get("tokenizer")
    if stored and data_cfg.tokenizer:
        mine = tokenizer_identity(data_cfg.tokenizer)
        if mine is None or mine["sha256"] != stored["sha256"]:
            raise DataError(
                f"{path}: the store was prepared with the tokenizer "
                f"{source.index.get('tokenizer_path', '?')!r} ({', '.join(stored['files'])} sha256 "
                f"{stored['sha256'][:12]}), but data.tokenizer={data_cfg.tokenizer!r} differs "
                f"(sha256 {mine['sha256'][:12] if mine else 'none'}); prepare the data again with "
                "this tokenizer, or point data.tokenizer at the one the store was made with")
    return StoreDataset(source, max_seq_len=data_cfg.max_seq_len, vocab_size=vocab_size,
                        overlong=data_cfg.overlong)


def describe_lengths(lengths: np.ndarray, max_seq_len: int, min_len: int = 1) -> str:
    """``"2048 samples, 77,446 tokens, lengths 8..1024; short/medium/long 1843/164/41,
    10 at max"`` with the bands of :func:`chunkflow.data.synthetic.band_bounds`."""
    (_, short_hi), (_, medium_hi), _ = band_bounds(max_seq_len, min(min_len, max_seq_len))
    short = int((lengths <= short_hi).sum())
    medium = int(((lengths > short_hi) & (lengths <= medium_hi)).sum())
    long = len(lengths) - short - medium
    return (
        f"{len(lengths)} samples, {int(lengths.sum()):,} tokens, lengths "
        f"{int(lengths.min())}..{int(lengths.max())}; short/medium/long "
        f"{short}/{medium}/{long}, {int((lengths == max_seq_len).sum())} at max"
    )
