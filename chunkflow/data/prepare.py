"""Tokenize JSONL files once into a token store (layout in ``chunkflow.data.store``).

    summary = prepare_store(["chat.jsonl"], out="data/chat_store", tokenizer="qwen/", workers=2)
    summary.up_to_date   # True when out already held this exact preparation: nothing done

Lines are read by this process in batches of ``batch_lines``; worker processes encode a
batch each (:func:`encode_line`, the one place a line becomes tokens) and the results are
written in input order whatever the number of workers, so ``workers=1`` and ``workers=8``
write byte-identical files. At most ``2 * workers`` batches are in flight, so memory does
not grow with the input.

Atomic: everything is written into ``.<out name>.partial-<pid>`` next to ``out``, the index
last, and the directory is renamed to ``out`` only when complete; a run that fails or is
interrupted leaves no ``out`` that looks complete (a killed run leaves the partial
directory behind; it is never read). A store is up to date when its index records the same
inputs (path, size, modification time, or failing that the same content hash), the same
tokenizer identity and the same store version; then nothing is rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from chunkflow.data.formats import RecordEncoder
from chunkflow.data.reader import DataError, _decode
from chunkflow.data.store import (FILES, INDEX, STORE_FORMAT, STORE_VERSION, TOKEN_DTYPE,
                                  file_sha256, is_store, tokenizer_identity)

__all__ = ["PrepareSummary", "prepare_store", "encode_line", "input_fingerprint", "store_is_current",
           "length_histogram"]

AUTO_BYTES_PER_WORKER = 8 << 20  # workers=0 starts one worker per this much input, up to the cores
TOKEN_LIMIT = int(np.iinfo(TOKEN_DTYPE).max) + 1  # ids must fit the store's uint32


@dataclass
class PrepareSummary:
    out: str
    up_to_date: bool = False  # the store already held this preparation; nothing was done
    samples: int = 0
    tokens: int = 0  # raw tokens (d_0 .. d_n) summed over samples
    loss_tokens: int = 0  # target[1:] summed: the positions trained on
    lines: int = 0
    blank: int = 0  # blank lines skipped (the only lines not stored)
    max_len: int = 0
    max_token_id: int = -1
    histogram: list[tuple[int, int, int]] = field(default_factory=list)  # (lo, hi, count)
    seconds: float = 0.0
    bytes: int = 0  # store size on disk

    def lines_of_text(self) -> list[str]:
        if self.up_to_date:
            return [f"{self.out}: up to date ({self.samples:,} samples, {self.tokens:,} tokens); "
                    "nothing to do"]
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        text = [f"{self.out}: {self.samples:,} samples, {self.tokens:,} tokens ({self.loss_tokens:,} "
                f"with loss), longest {self.max_len}, max token id {self.max_token_id}",
                f"  {self.lines:,} lines read; dropped: {self.blank:,} blank lines (nothing else is "
                "dropped here: data.max_seq_len and data.overlong apply when training opens the store)",
                f"  {self.seconds:.1f} s, {rate:,.0f} tokens/s, {self.bytes:,} bytes "
                f"({self.bytes / max(self.tokens, 1):.2f} bytes/token)",
                "  sample length (tokens)   samples"]
        text += [f"    {lo:>8}..{hi:<8}  {count:>10,}" for lo, hi, count in self.histogram]
        return text


def encode_line(line: str, where: str, encoder: RecordEncoder) -> tuple[np.ndarray, np.ndarray]:
    """THE call site turning one JSONL line into raw tokens ``(n,) int64`` and target
    ``(n,) bool`` for the store: the record formats and chat templates of
    :class:`~chunkflow.data.formats.RecordEncoder`, and ids in the store's range (the
    model's vocabulary is checked when the store is opened for training)."""
    tokens, target = encoder.encode(line, where)
    outside = (tokens < 0) | (tokens >= TOKEN_LIMIT)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise DataError(f"{where}: token id {int(tokens[i])} at position {i} is outside [0, 2**32): "
                        "token ids are >= 0 and must fit in 32 bits")
    return tokens, target


def input_fingerprint(path: str | Path) -> dict[str, Any]:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def store_is_current(out: str | Path, inputs: Sequence[str | Path], tokenizer: str) -> bool:
    """True when ``out`` is a complete store of exactly these inputs and tokenizer."""
    if not is_store(out):
        return False
    try:
        index = json.loads((Path(out) / INDEX).read_text())
    except (OSError, ValueError):
        return False
    if (index.get("format"), index.get("version")) != (STORE_FORMAT, STORE_VERSION):
        return False
    if index.get("tokenizer") != tokenizer_identity(tokenizer):
        return False
    recorded = index.get("inputs", [])
    if len(recorded) != len(inputs):
        return False
    for rec, path in zip(recorded, inputs):
        now = input_fingerprint(path)
        if rec["path"] != now["path"]:
            return False
        if (rec["size"], rec["mtime_ns"]) != (now["size"], now["mtime_ns"]):
            if rec["size"] != now["size"] or rec.get("sha256") != file_sha256(path):
                return False
    return True


# ----------------------------------------------------------------- worker side
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: str) -> None:
    _WORKER["encoder"] = RecordEncoder.from_path(tokenizer or None)


def _encode_batch(job: tuple[str, int, list[bytes]]) -> dict[str, Any]:
    """Encode consecutive lines of one file; blank lines are counted, not stored."""
    path, first_line, raws = job
    encoder = _WORKER["encoder"]
    tokens, target, lengths, lines = [], [], [], []
    blank, max_id, max_where, loss = 0, -1, "", 0
    for k, raw in enumerate(raws):
        where = f"{path}:{first_line + k}"
        line = _decode(raw, where)
        if not line.strip():
            blank += 1
            continue
        ids, tgt = encode_line(line, where, encoder)
        top = int(ids.max())
        if top > max_id:
            max_id, max_where = top, f"{where}: token id {top} at position {int(ids.argmax())}"
        loss += int(tgt[1:].sum())
        tokens.append(ids.astype(TOKEN_DTYPE))
        target.append(tgt.astype(np.uint8))
        lengths.append(len(ids))
        lines.append(first_line + k)
    cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))
    return {"tokens": cat(tokens, TOKEN_DTYPE), "target": cat(target, np.uint8),
            "lengths": np.asarray(lengths, dtype=np.int64), "lines": np.asarray(lines, dtype=np.int64),
            "blank": blank, "loss": loss, "num_lines": len(raws), "max_id": max_id, "max_where": max_where}


def _jobs(paths: Sequence[Path], batch_lines: int) -> Iterator[tuple[int, tuple[str, int, list[bytes]]]]:
    for file_index, path in enumerate(paths):
        with path.open("rb") as f:
            batch: list[bytes] = []
            first = 1
            for lineno, raw in enumerate(f, start=1):
                batch.append(raw)
                if len(batch) == batch_lines:
                    yield file_index, (str(path), first, batch)
                    batch, first = [], lineno + 1
            if batch:
                yield file_index, (str(path), first, batch)


def _ordered_map(jobs: Iterator[tuple[int, Any]], workers: int, tokenizer: str) -> Iterator[tuple[int, dict]]:
    """``(file_index, _encode_batch(job))`` in input order; ``workers`` processes."""
    if workers <= 1:
        _init_worker(tokenizer)
        for file_index, job in jobs:
            yield file_index, _encode_batch(job)
        return
    import multiprocessing as mp

    # fork: workers inherit the imported modules (a spawned one re-imports torch, seconds
    # each); they only run Python and the tokenizer, never torch or a process group.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for file_index, job in jobs:
            pending.append((file_index, pool.apply_async(_encode_batch, (job,))))
            if len(pending) >= 2 * workers:
                index, result = pending.popleft()
                yield index, result.get()
        while pending:
            index, result = pending.popleft()
            yield index, result.get()


# ----------------------------------------------------------------- writer side
def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """Counts per power-of-two band ``[2^k, 2^(k+1) - 1]`` (empty bands left out)."""
    if not len(lengths):
        return []
    bands = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(bands)
    return [(1 << k, (1 << (k + 1)) - 1, int(c)) for k, c in enumerate(counts) if c]


def prepare_store(
    inputs: Sequence[str | Path],
    *,
    out: str | Path,
    tokenizer: str = "",
    workers: int = 0,
    batch_lines: int = 2048,
    on_progress: Optional[Callable[[int, int], None]] = None,
) -> PrepareSummary:
    """Prepare ``inputs`` (JSONL, in this order) into the store ``out``; see the module
    docstring. ``workers=0`` = every core (one per 8 MiB of input). ``on_progress(lines_done, tokens_done)`` is
    called after each batch. Raises :class:`DataError` naming ``file:line`` on a bad line."""
    import time

    t0 = time.perf_counter()
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file (input to prepare)")
    out = Path(out)
    if store_is_current(out, paths, tokenizer):
        index = json.loads((out / INDEX).read_text())
        return PrepareSummary(out=str(out), up_to_date=True, samples=index["num_samples"],
                              tokens=index["num_tokens"])
    if not workers:  # every core, but no pool for a small input (starting one costs more)
        size = sum(p.stat().st_size for p in paths)
        workers = max(1, min(os.cpu_count() or 1, size // AUTO_BYTES_PER_WORKER))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        summary, index = _write(paths, partial, tokenizer, workers, batch_lines, on_progress)
        summary.out = str(out)
        _replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - t0
    summary.bytes = sum((out / name).stat().st_size for name, _ in FILES.values())
    return summary


def _write(paths: list[Path], partial: Path, tokenizer: str, workers: int, batch_lines: int,
           on_progress: Optional[Callable[[int, int], None]]) -> tuple[PrepareSummary, dict]:
    s = PrepareSummary(out=str(partial))
    files = {key: open(partial / name, "wb") for key, (name, _) in FILES.items()}
    per_file = [0] * len(paths)
    max_where = ""
    try:
        files["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
        for file_index, r in _ordered_map(_jobs(paths, batch_lines), workers, tokenizer):
            n = len(r["lengths"])
            files["tokens"].write(r["tokens"].tobytes())
            files["target"].write(r["target"].tobytes())
            files["offsets"].write((s.tokens + np.cumsum(r["lengths"])).tobytes())
            files["lines"].write(r["lines"].tobytes())
            per_file[file_index] += n
            s.samples += n
            s.tokens += int(r["lengths"].sum())
            s.loss_tokens += r["loss"]
            s.lines += r["num_lines"]
            s.blank += r["blank"]
            s.max_len = max(s.max_len, int(r["lengths"].max()) if n else 0)
            if r["max_id"] > s.max_token_id:
                s.max_token_id, max_where = r["max_id"], r["max_where"]
            if on_progress is not None:
                on_progress(s.lines, s.tokens)
    finally:
        for f in files.values():
            f.close()
    offsets = np.memmap(partial / FILES["offsets"][0], dtype=np.int64, mode="r")
    s.histogram = length_histogram(np.diff(offsets))
    del offsets
    inputs = []
    for path, count in zip(paths, per_file):
        inputs.append({**input_fingerprint(path), "sha256": file_sha256(path), "samples": count})
    index = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "num_samples": s.samples,
        "num_tokens": s.tokens, "loss_tokens": s.loss_tokens, "max_len": s.max_len,
        "max_token_id": s.max_token_id, "max_token_where": max_where, "token_dtype": "uint32",
        "tokenizer": tokenizer_identity(tokenizer), "tokenizer_path": str(tokenizer),
        "inputs": inputs, "settings": {"lines_blank": s.blank, "shifted": False,
                                       "max_seq_len": "applied when training opens the store"},
    }
    if s.samples == 0:
        raise DataError(f"{', '.join(map(str, paths))} holds no usable sample ({s.lines} lines, "
                        f"{s.blank} blank)")
    for f in partial.iterdir():  # data on disk before the index says the store is complete
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    tmp_index = partial / (INDEX + ".tmp")
    tmp_index.write_text(json.dumps(index, indent=1))
    tmp_index.rename(partial / INDEX)
    return s, index


def _replace(partial: Path, out: Path) -> None:
    """Rename the finished ``partial`` to ``out`` (an older store there is removed)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(out)
