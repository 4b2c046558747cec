"""A JSONL ``data.path`` becomes a token store on the first run; every rank then maps it.

    data_cfg = resolve_data(cfg, ctx, log=print)   # data.path -> the cached store

The store lives in ``<data.cache_dir>/<name>-<key>``; the default ``data.cache_dir`` is
``.chunkflow_data_cache`` next to ``train.output_dir`` (``runs/.chunkflow_data_cache``
for ``runs/tiny_cpu``), outside the run's own directory, so runs sharing a parent share
the cache and a failed run leaves its output directory as it was. ``key`` hashes the
input's path, size and modification time, the tokenizer's identity and the store
version: a later run, or a resumed one, finds the store and prepares nothing; a changed
input or tokenizer gets a new directory. Old ones are not deleted (a run resumed with the
old tokenizer still needs its store); when a new one is prepared, the others made from
the same input file are listed with their size, to delete by hand.

Rank 0 prepares (in ``data.prepare_workers`` processes) while the other ranks poll the
launcher's key-value store (the one ``torch.distributed`` was initialised with) for its
outcome, so a long preparation is not cut short by the process-group timeout; if rank 0
fails (a bad line), every rank stops with rank 0's message. With several nodes the cache
directory must be on a file system they share, as ``train.output_dir`` already must be.

Other ``data.path`` values (a store, Megatron files, empty for synthetic data) pass
through unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from chunkflow.config.schema import Config, DataConfig
from chunkflow.data.prepare import input_fingerprint, prepare_store
from chunkflow.data.reader import DataError
from chunkflow.data.store import STORE_VERSION, is_store, megatron_prefix, tokenizer_identity
from chunkflow.data.tokenizer import load_tokenizer

__all__ = ["resolve_data", "load_run_samples", "cache_path", "superseded_stores", "CACHE_NAME"]

CACHE_NAME = ".chunkflow_data_cache"
_calls = 0  # resolve_data calls in this process: one key per call (tests train several times)


def cache_path(cfg: Config) -> Path:
    """The store directory a JSONL ``data.path`` is prepared into (same on every rank)."""
    d = cfg.data
    root = Path(d.cache_dir) if d.cache_dir else Path(cfg.train.output_dir).resolve().parent / CACHE_NAME
    if not Path(d.path).is_file():
        raise DataError(f"{d.path}: no such file (data.path)")
    if d.tokenizer:
        load_tokenizer(d.tokenizer)  # a missing or broken tokenizer is named by its setting
    ident = tokenizer_identity(d.tokenizer)
    key = json.dumps([input_fingerprint(d.path), ident["sha256"] if ident else None, STORE_VERSION])
    return root / f"{Path(d.path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def load_run_samples(cfg: Config, ctx: Optional[Any] = None, *,
                     log: Callable[[str], Any] = print) -> tuple[Any, str]:
    """``(samples, description)`` as a run reads them: a JSONL ``data.path`` through the
    cache (prepared once, then memory-mapped), anything else as it is. For tools that are
    not training (``ctx`` None: one process)."""
    from types import SimpleNamespace

    from chunkflow.data.dataset import load_samples

    data = resolve_data(cfg, ctx or SimpleNamespace(rank=0, world_size=1), log=log)
    return load_samples(data, vocab_size=cfg.model.vocab_size)


def superseded_stores(store: Path, source: str) -> list[Path]:
    """Other stores in ``store``'s cache directory prepared from the same input file."""
    want = str(Path(source).resolve())
    found = []
    for other in sorted(store.parent.glob(f"{Path(source).stem}-*")):
        if other == store or not is_store(other):
            continue
        try:
            inputs = json.loads((other / "index.json").read_text()).get("inputs", [])
        except (OSError, ValueError):
            continue
        if any(rec.get("path") == want for rec in inputs):
            found.append(other)
    return found


def _launcher_store(world_size: int) -> Any:
    if world_size <= 1:
        return None
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store() if dist.is_initialized() else None


def resolve_data(cfg: Config, ctx: Any, *, log: Callable[[str], Any] = print, poll_s: float = 0.5,
                 kv: Optional[Any] = None) -> DataConfig:
    """``cfg.data`` with a JSONL ``data.path`` replaced by its prepared store. ``ctx``
    needs ``rank`` and ``world_size``; ``kv`` (``set``/``check``/``get``, default the
    launcher's store) carries rank 0's outcome to the others."""
    global _calls
    d = cfg.data
    if not d.path or is_store(d.path) or megatron_prefix(d.path):
        return d
    store = cache_path(cfg)
    _calls += 1
    key = f"chunkflow/data_cache/{_calls}/{store.name}"
    kv = kv if kv is not None else _launcher_store(ctx.world_size)
    if ctx.rank == 0:
        try:
            summary = prepare_store([d.path], out=store, tokenizer=d.tokenizer, workers=d.prepare_workers)
        except BaseException as exc:
            if kv is not None:
                kv.set(key, "error:" + str(exc))
            raise
        if kv is not None:
            kv.set(key, "ok")
        if not summary.up_to_date:  # said after the fact: a failed start prints one line only
            log(f"prepared data.path={d.path} into {store} (later runs reuse it):")
            for line in summary.lines_of_text():
                log(line)
            older = superseded_stores(store, d.path)
            if older:
                size = sum(f.stat().st_size for o in older for f in o.rglob("*") if f.is_file())
                log(f"{len(older)} older cache(s) of {d.path} ({size / 2**20:.1f} MiB; an earlier input "
                    f"or tokenizer), kept for runs that still use them: " + ", ".join(str(o) for o in older))
    else:
        while not (kv is None and is_store(store)):
            if kv is not None and kv.check([key]):
                outcome = kv.get(key).decode()
                if outcome != "ok":
                    raise DataError(outcome[len("error:"):])  # rank 0's message, word for word
                break
            time.sleep(poll_s)
    return dataclasses.replace(d, path=str(store))
