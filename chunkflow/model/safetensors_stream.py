"""Read and write Hugging Face ``*.safetensors`` weights one tensor (or one slice) at a time.

A safetensors file is a little-endian ``u64`` header length, a JSON header and one flat
byte buffer::

    [n: u64][{"__metadata__": {...}, "name": {"dtype": "F32", "shape": [r, c],
              "data_offsets": [begin, end]}, ...} padded with spaces][bytes ...]

Offsets are relative to the buffer and tensors lie back to back in offset order. Large
models are split into ``model-00001-of-0000N.safetensors`` files listed by
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map":
{name: file}}``).

* :class:`SafetensorsReader` maps names to files and reads a tensor or a contiguous
  range along one dimension through ``safe_open(...).get_slice`` (memory-mapped), so a
  tensor-parallel rank reads only its rows or columns.
* :class:`SafetensorsWriter` is given the whole plan (names, shapes, dtypes, in order)
  up front, so every header is known before any data; tensors are then written as they
  are produced and dropped. Peak memory is one tensor, whatever the model size.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from safetensors import safe_open

__all__ = ["SafetensorsReader", "SafetensorsWriter", "TensorSpec", "INDEX_FILE", "SINGLE_FILE"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsReader:
    """Every tensor of a directory's safetensors files, by name (index json if present)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file = {name: self.dir / f for name, f in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{self.dir}: no *.safetensors files (and no {INDEX_FILE}); chunkflow reads "
                    "Hugging Face weights in safetensors format only"
                )
            self._file = {}
            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    self._file.update({name: f for name in handle.keys()})
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def _slice(self, name: str):
        if name not in self._file:
            raise KeyError(f"{self.dir}: no tensor '{name}' in the safetensors files")
        path = self._file[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _CODE_DTYPES[self._slice(name).get_dtype()]

    def read(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """The tensor, or its ``[start:stop]`` range along ``dim`` (only that range is read)."""
        sl = self._slice(name)
        if start is None and stop is None:
            return sl[:]
        index = (slice(None),) * dim + (slice(start, stop),)
        return sl[index]

    def close(self) -> None:
        self._handles.clear()


def _header(specs: Sequence[TensorSpec], metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.num_bytes]}
        offset += spec.num_bytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the buffer 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Streams tensors into safetensors files in a fixed, planned order.

    ``plan`` lists every tensor (name, shape, dtype) in write order; files are cut at
    ``max_shard_bytes`` (a tensor larger than that gets a file of its own). Call
    :meth:`write` once per tensor in plan order, then :meth:`close`, which writes the
    index json when there is more than one file.

    Files are written under temporary names (``.<name>.tmp-<pid>``) and renamed into
    place by :meth:`close`, so a failed or killed export never leaves a truncated file
    under a real name (an earlier export's files stay whole until replaced); shard
    files of an earlier export that this one does not replace are removed at close, so
    a reader never mixes two exports. :meth:`abort` removes the temporaries.
    """

    def __init__(self, directory: str | Path, plan: Iterable[TensorSpec], *,
                 max_shard_bytes: int = 5 * 2**30, metadata: Optional[dict] = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plan = list(plan)
        self.metadata = metadata or {"format": "pt"}
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in self.plan:
            if shards[-1] and size + spec.num_bytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.num_bytes
        n = len(shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = list(zip(names, shards))
        self._next = 0  # index into self.plan
        self._file = None
        self._shard = -1
        self._left_in_shard = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.plan):
            raise ValueError(f"tensor '{name}' is not in the write plan (all planned tensors written)")
        spec = self.plan[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor '{spec.name}' next in the write plan, got '{name}'")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor '{name}': planned {spec.shape} {spec.dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._left_in_shard == 0:
            self._open_next_shard()
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._file.close()
            self._file = None

    def _open_next_shard(self) -> None:
        self._shard += 1
        file_name, specs = self._shards[self._shard]
        self._file = open(self._tmp(file_name), "wb")
        self._file.write(_header(specs, self.metadata))
        self._left_in_shard = len(specs)

    def _tmp(self, file_name: str) -> Path:
        return self.dir / f".{file_name}.tmp-{os.getpid()}"

    def close(self) -> list[str]:
        """Finish: rename every file into place; returns the file names written."""
        if self._next != len(self.plan):
            missing = self.plan[self._next].name
            self.abort()
            raise ValueError(f"write plan incomplete: tensor '{missing}' and later were never written")
        names = [f for f, _ in self._shards]
        for f in names:
            os.replace(self._tmp(f), self.dir / f)
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.num_bytes for s in self.plan)},
                "weight_map": {s.name: f for f, specs in self._shards for s in specs},
            }
            self._tmp(INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            os.replace(self._tmp(INDEX_FILE), self.dir / INDEX_FILE)
        elif (self.dir / INDEX_FILE).is_file():
            (self.dir / INDEX_FILE).unlink()
        for old in self.dir.iterdir():  # shards of an earlier export not replaced now
            if _SHARD_NAME.fullmatch(old.name) and old.name not in names:
                old.unlink()
        return names

    def abort(self) -> None:
        """Drop the temporary files (after a failure); real names are untouched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for f, _ in self._shards:
            self._tmp(f).unlink(missing_ok=True)
