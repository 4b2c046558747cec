"""A JSONL ``data.path`` becomes a token store on the first run; every rank then maps it.

    data_cfg = resolve_data(cfg, ctx, log=print)   # data.path -> the cached store

The store lives in ``<data.cache_dir>/<key>`` (default ``<train.output_dir>/data_cache``),
where ``key`` hashes the input's path, size and modification time, the tokenizer's
identity and the store version: a later run, or a resumed one, finds it and prepares
nothing; a changed input or tokenizer gets a new directory. Rank 0 prepares (in
``data.prepare_workers`` processes); the other ranks wait by polling for the store's
index, so a long preparation is not cut short by the process-group timeout. If rank 0
fails (a bad line), it leaves ``<key>.failed`` with its message and every rank stops
with it. With several nodes the cache directory must be on a file system they share
(as ``train.output_dir`` already must be for checkpoints).

Other ``data.path`` values (a store, Megatron files, empty for synthetic data) pass
through unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from chunkflow.config.schema import Config, DataConfig
from chunkflow.data.prepare import input_fingerprint, prepare_store
from chunkflow.data.reader import DataError
from chunkflow.data.tokenizer import load_tokenizer
from chunkflow.data.store import STORE_VERSION, is_store, megatron_prefix, tokenizer_identity
from chunkflow.parallel import comm
from chunkflow.parallel.distributed import ParallelContext

__all__ = ["resolve_data", "cache_path"]


def cache_path(cfg: Config) -> Path:
    """The store directory a JSONL ``data.path`` is prepared into (same on every rank)."""
    d = cfg.data
    root = Path(d.cache_dir) if d.cache_dir else Path(cfg.train.output_dir) / "data_cache"
    if not Path(d.path).is_file():
        raise DataError(f"{d.path}: no such file (data.path)")
    if d.tokenizer:
        load_tokenizer(d.tokenizer)  # a missing or broken tokenizer is named by its setting
    ident = tokenizer_identity(d.tokenizer)
    key = json.dumps([input_fingerprint(d.path), ident["sha256"] if ident else None, STORE_VERSION])
    return root / f"{Path(d.path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def resolve_data(cfg: Config, ctx: ParallelContext, *, log: Callable[[str], Any] = print,
                 poll_s: float = 0.5) -> DataConfig:
    """``cfg.data`` with a JSONL ``data.path`` replaced by its prepared store."""
    d = cfg.data
    if not d.path or is_store(d.path) or megatron_prefix(d.path):
        return d
    store = cache_path(cfg)
    failed = store.parent / (store.name + ".failed")
    many = ctx.world_size > 1
    if ctx.rank == 0:
        failed.unlink(missing_ok=True)
    if many:
        comm.barrier()  # no rank reads a stale .failed marker
    if ctx.rank == 0:
        try:
            summary = prepare_store([d.path], out=store, tokenizer=d.tokenizer, workers=d.prepare_workers)
        except BaseException as exc:
            store.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(str(exc))
            raise
        if not summary.up_to_date:  # said after the fact: a failed start prints one line only
            log(f"prepared data.path={d.path} into {store} (later runs reuse it):")
            for line in summary.lines_of_text():
                log(line)
    else:
        while not is_store(store):
            if failed.is_file():
                raise DataError(failed.read_text())  # rank 0's message, word for word
            time.sleep(poll_s)
    return dataclasses.replace(d, path=str(store))
