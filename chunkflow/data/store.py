"""The token store: a prepared data set in flat binary files that every rank memory-maps.

``scripts/prepare_data.py`` (or the first training run on a JSONL ``data.path``) writes
one directory::

    store/
      tokens.bin    uint32  (num_tokens,)       raw token ids d_0 .. d_n of every sample
      target.bin    uint8   (num_tokens,)       1 = token is trained on (the reader's target)
      offsets.bin   int64   (num_samples + 1,)  sample i = tokens[offsets[i]:offsets[i + 1]]
      lines.bin     int64   (num_samples,)      its line in its input file (for error messages)
      index.json    format, version, counts, max_token_id, tokenizer identity, inputs,
                    settings; written LAST, so a directory without it is not a store

Samples are stored *unshifted*, exactly as a JSONL line gives them; :class:`StoreDataset`
shifts one sample when the loader asks for it (``input_ids = d[:-1]``, ``labels = d[1:]``,
``loss_mask = target[1:]``, see ``chunkflow.data.types``), so nothing but the global batch
in hand is ever materialised. The files are memory-mapped for whole-array work (lengths);
one sample is read with ``pread`` from the OS page cache, which all ranks of a node share.

``data.max_seq_len`` and ``data.overlong`` are applied when the store is opened, not when
it is prepared, so one store serves runs of any length: ``error`` refuses the store naming
the sample and its ``file:line``, ``truncate`` cuts to ``max_seq_len`` positions (dropping
a sample left without a loss token), ``drop`` skips; sample ids count the kept samples
from 0, as :func:`chunkflow.data.reader.read_jsonl` numbers them.

Megatron-LM's preprocessed ``.bin`` + ``.idx`` pair is read through the same
:class:`StoreDataset` (:class:`MegatronTokens`); those files have no loss mask, so every
token trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from chunkflow.config.schema import OVERLONG
from chunkflow.data.reader import DataError
from chunkflow.data.types import Sample

__all__ = ["STORE_FORMAT", "STORE_VERSION", "TOKEN_DTYPE", "TokenStore", "MegatronTokens",
           "StoreDataset", "is_store", "megatron_prefix", "tokenizer_identity", "file_sha256"]

STORE_FORMAT = "chunkflow-token-store"
STORE_VERSION = 1
TOKEN_DTYPE = np.uint32
INDEX = "index.json"
FILES = {"tokens": ("tokens.bin", np.uint32), "target": ("target.bin", np.uint8),
         "offsets": ("offsets.bin", np.int64), "lines": ("lines.bin", np.int64)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def is_store(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a complete store (its index exists)."""
    return (Path(path) / INDEX).is_file()


def megatron_prefix(path: str | Path) -> Optional[str]:
    """The Megatron path prefix for ``path`` (``x``, ``x.bin`` or ``x.idx`` with both
    ``x.bin`` and ``x.idx`` present), else None."""
    text = str(path)
    for ext in (".bin", ".idx"):
        if text.endswith(ext):
            text = text[: -len(ext)]
            break
    if Path(text + ".bin").is_file() and Path(text + ".idx").is_file():
        return text
    return None


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_identity(path: str | Path) -> Optional[dict[str, Any]]:
    """``{"sha256": ..., "files": [...]}`` over ``tokenizer.json`` and, next to it,
    ``tokenizer_config.json`` (the chat template lives there); None for no tokenizer."""
    if not str(path):
        return None
    file = Path(path)
    folder = file if file.is_dir() else file.parent
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not file.is_dir() and file.is_file() and file not in files:
        files.insert(0, file)
    if not files:
        raise DataError(f"{path}: no tokenizer.json there (data.tokenizer / --tokenizer)")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return {"sha256": digest.hexdigest(), "files": [f.name for f in files]}


class TokenStore:
    """A complete store opened read-only; arrays are ``np.memmap`` views (nothing read)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not is_store(self.path):
            raise DataError(f"{self.path}: not a chunkflow token store (no {INDEX}); prepare "
                            "one with scripts/prepare_data.py")
        try:
            self.index = json.loads((self.path / INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path / INDEX}: unreadable store index: {exc}") from None
        if self.index.get("format") != STORE_FORMAT or self.index.get("version") != STORE_VERSION:
            raise DataError(f"{self.path}: store format {self.index.get('format')!r} version "
                            f"{self.index.get('version')!r}; this chunkflow reads {STORE_FORMAT} "
                            f"version {STORE_VERSION} (prepare the data again)")
        self.num_samples = int(self.index["num_samples"])
        self.num_tokens = int(self.index["num_tokens"])
        sizes = {"tokens": self.num_tokens, "target": self.num_tokens,
                 "offsets": self.num_samples + 1, "lines": self.num_samples}
        arrays = {}
        for key, (name, dtype) in FILES.items():
            file = self.path / name
            want = sizes[key] * np.dtype(dtype).itemsize
            have = file.stat().st_size if file.is_file() else -1
            if have != want:
                raise DataError(f"{file}: {have if have >= 0 else 'missing'} bytes, the index says "
                                f"{want}; the store is damaged (prepare it again)")
            arrays[key] = (np.memmap(file, dtype=dtype, mode="r", shape=(sizes[key],))
                           if sizes[key] else np.zeros(0, dtype=dtype))
        self.tokens, self.target = arrays["tokens"], arrays["target"]
        self.offsets, self.lines = arrays["offsets"], arrays["lines"]
        # One sample is read with pread, not through the maps: a page fault on a map also
        # maps up to 16 neighbouring cached pages ("fault-around"), so random samples
        # through np.memmap left most of a warm store in each rank's RSS.
        self._fds = {key: os.open(self.path / FILES[key][0], os.O_RDONLY)
                     for key in ("tokens", "target", "offsets")}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _pread(self, key: str, start: int, count: int) -> np.ndarray:
        dtype = np.dtype(FILES[key][1])
        raw = os.pread(self._fds[key], count * dtype.itemsize, start * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise DataError(f"{self.path / FILES[key][0]}: short read at element {start}; the "
                            "store is damaged (prepare it again)")
        return np.frombuffer(raw, dtype=dtype)

    @property
    def max_len(self) -> int:
        return int(self.index["max_len"])

    @property
    def max_token_id(self) -> int:
        return int(self.index["max_token_id"])

    def raw_lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw tokens ``(n,) int64`` and target ``(n,) bool`` of stored sample ``i``."""
        a, b = (int(x) for x in self._pread("offsets", i, 2))
        return self._pread("tokens", a, b - a).astype(np.int64), self._pread("target", a, b - a).astype(bool)

    def where(self, i: int) -> str:
        """``file:line`` of the input line stored sample ``i`` came from."""
        counts = np.cumsum([f["samples"] for f in self.index["inputs"]])
        k = int(np.searchsorted(counts, i, side="right"))
        source = self.index["inputs"][k]["path"] if k < len(counts) else "?"
        return f"{source}:{int(self.lines[i])}"

    def name(self, i: int) -> str:
        return f"sample {i} of the store {self.path}"


class MegatronTokens:
    """Megatron-LM's ``prefix.bin`` + ``prefix.idx`` through megatron-core's own reader.

    Each Megatron *sequence* is one sample; there is no loss mask (every token trains),
    no tokenizer identity and no recorded max token id, so token ids are checked per
    sample when it is materialised.
    """

    def __init__(self, prefix: str) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset  # lazy: heavy import

        self.path = prefix
        self.dataset = IndexedDataset(prefix, multimodal=False, mmap=True)
        self.num_samples = len(self.dataset)
        self.index: dict[str, Any] = {"tokenizer": None}
        self.max_token_id = None

    def raw_lengths(self) -> np.ndarray:
        return np.asarray(self.dataset.sequence_lengths, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.raw_lengths().sum())

    @property
    def max_len(self) -> int:
        return int(self.raw_lengths().max()) if self.num_samples else 0

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.asarray(self.dataset[i]).astype(np.int64)
        return tokens, np.ones(len(tokens), dtype=bool)

    def where(self, i: int) -> str:
        return f"{self.path}.bin: sample {i}"

    def name(self, i: int) -> str:
        return "Megatron indexed data set"


class StoreDataset(Sequence[Sample]):
    """The run's samples over a :class:`TokenStore` or :class:`MegatronTokens`, built one
    at a time on ``dataset[i]`` (``sample_id == i``); see the module docstring for how
    ``max_seq_len`` and ``overlong`` apply. Holds no per-sample data unless samples are
    dropped (then one int64 index per kept sample)."""

    def __init__(self, source: Any, *, max_seq_len: int, vocab_size: int, overlong: str = "error") -> None:
        if overlong not in OVERLONG:
            raise ValueError(f"overlong={overlong!r} is not one of {', '.join(OVERLONG)}")
        self.source, self.max_seq_len, self.vocab_size = source, max_seq_len, vocab_size
        self.overlong = overlong
        self.truncated = self.dropped = self.dropped_no_loss = 0
        self.keep: Optional[np.ndarray] = None  # stored index of each kept sample (None: all)
        if source.max_token_id is not None and source.max_token_id >= vocab_size:
            where = source.index.get("max_token_where", f"{source.path}: token id {source.max_token_id}")
            raise DataError(f"{where} is outside [0, {vocab_size}) (model.vocab_size={vocab_size}); "
                            f"the store {source.path} holds ids up to {source.max_token_id}, made for "
                            "a larger vocabulary")
        if source.max_len - 1 > max_seq_len:
            self._apply_overlong()
        elif isinstance(source, MegatronTokens) and source.num_samples:
            self._check_megatron_lengths(source.raw_lengths())

    def _check_megatron_lengths(self, lengths: np.ndarray) -> None:
        short = np.flatnonzero(lengths < 2)
        if len(short):
            i = int(short[0])
            raise DataError(f"{self.source.where(i)}: empty sample: {int(lengths[i])} token(s); a "
                            "sample needs at least 2 (one input and its label)")

    def _apply_overlong(self) -> None:
        lengths = self.source.raw_lengths()
        if isinstance(self.source, MegatronTokens):
            self._check_megatron_lengths(lengths)
        over = np.flatnonzero(lengths - 1 > self.max_seq_len)
        if self.overlong == "error":
            i = int(over[0])
            raise DataError(
                f"{self.source.where(i)}: sample has {int(lengths[i]) - 1} positions after shifting "
                f"({int(lengths[i])} tokens), more than max_seq_len={self.max_seq_len}; set "
                "data.overlong=truncate or data.overlong=drop, or raise data.max_seq_len "
                f"({self.source.name(i)})")
        gone = over
        if self.overlong == "truncate":
            keep_over = [i for i in over if self.source.read(int(i))[1][1 : self.max_seq_len + 1].any()]
            self.truncated = len(over)  # as read_jsonl counts: dropped_no_loss among them
            self.dropped_no_loss = len(over) - len(keep_over)
            gone = np.setdiff1d(over, np.asarray(keep_over, dtype=np.int64))
        else:
            self.dropped = len(over)
        if len(gone):
            mask = np.ones(len(lengths), dtype=bool)
            mask[gone] = False
            self.keep = np.flatnonzero(mask)

    def __len__(self) -> int:
        return self.source.num_samples if self.keep is None else len(self.keep)

    def stored_index(self, i: int) -> int:
        return i if self.keep is None else int(self.keep[i])

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside this data set of {len(self)} samples")
        j = self.stored_index(i)
        tokens, target = self.source.read(j)
        if len(tokens) - 1 > self.max_seq_len:  # overlong="truncate" kept it
            tokens, target = tokens[: self.max_seq_len + 1], target[: self.max_seq_len + 1]
        if self.source.max_token_id is None:  # Megatron files: no recorded max id
            outside = (tokens < 0) | (tokens >= self.vocab_size)
            if outside.any():
                k = int(np.flatnonzero(outside)[0])
                raise DataError(f"{self.source.where(j)}: token id {int(tokens[k])} at position {k} "
                                f"is outside [0, {self.vocab_size}) (model.vocab_size={self.vocab_size})"
                                f" ({self.source.name(j)})")
        return Sample(sample_id=i, input_ids=tokens[:-1].copy(), labels=tokens[1:].copy(),
                      loss_mask=target[1:].astype(np.float32))

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def describe(self) -> str:
        """One line for the log, like :meth:`chunkflow.data.reader.ReadStats.summary`."""
        src = self.source
        kind = "Megatron indexed data set" if isinstance(src, MegatronTokens) else "token store"
        text = (f"{src.path} ({kind}): {len(self)} samples of {src.num_samples} stored, "
                f"{src.num_tokens:,} tokens stored, longest {src.max_len}")
        if isinstance(src, TokenStore):
            text += f" ({int(src.index['loss_tokens']):,} with loss)"
        else:
            text += " (every token trains: Megatron files carry no loss mask)"
        return text + (f"; {self.truncated} truncated, {self.dropped} dropped overlong"
                       + (f", {self.dropped_no_loss} dropped (no loss token left after truncation)"
                          if self.dropped_no_loss else ""))
