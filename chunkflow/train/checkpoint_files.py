"""The files of a checkpoint: a manifest that proves it complete, and reading megatron's
torch-DCP metadata without running code from it.

``manifest.json`` (written last, after every rank's shards exist)::

    {"format": 1, "hash": "blake2b",
     "files": {"model/__0_0.distcp": {"size": 123456, "blake2b": "9f2c..."},
               "trainer.json": {...}, "rng/rank0.pt": {...}, ...}}

lists every other file of the checkpoint. :func:`check_sizes` (cheap: one ``stat`` per
file) tells a complete checkpoint from a torn one; :func:`verify_files` hashes every
file (threads; ``hashlib`` releases the GIL) and is what loading runs first. The hash
is BLAKE2b from the standard library, faster than SHA-256 on CPUs without SHA
instructions.

Safe loading: torch DCP pickles its ``.metadata`` file and unpickles it on load, and
megatron's objects (``_extra_state``) are stored as pickles inside the shards; a
crafted checkpoint could run code through either. :func:`read_dcp_metadata` unpickles
``.metadata`` through an allow-list (DCP's metadata classes, torch dtypes/``Size``,
containers) and :func:`check_pickled_objects` loads each stored object with
``torch.load(weights_only=True)``; both run before megatron reads the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

from chunkflow.config.errors import UserError

__all__ = ["MANIFEST", "HASH", "CheckpointError", "hash_files", "write_manifest_entries", "write_manifest",
           "read_manifest", "list_files", "check_sizes", "verify_files", "read_dcp_metadata", "SafeFileSystemReader",
           "check_pickled_objects", "write_text_atomic"]

MANIFEST = "manifest.json"
HASH = "blake2b"
_BLOCK = 8 << 20  # bytes read per hash update


class CheckpointError(UserError):
    """A checkpoint that must not be loaded: incomplete, corrupt, unsafe, or not matching
    the model. The message names the checkpoint and, where known, a valid one. A user
    error (exit code 2, one line: ``chunkflow/train/errors.py``)."""


# --------------------------------------------------------------------------- manifest
def _hash_one(path: Path) -> tuple[int, str]:
    h = hashlib.blake2b(digest_size=32)
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def hash_files(root: Path, names: Sequence[str], *, threads: Optional[int] = None) -> dict[str, dict]:
    """``{name: {"size", "blake2b"}}`` for files ``root/name``, hashed in parallel threads."""
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda n: _hash_one(root / n), names))
    return {n: {"size": s, HASH: d} for n, (s, d) in zip(names, results)}


def list_files(root: Path) -> list[str]:
    """Every file under ``root`` except the manifest, relative, largest first."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST]
    files.sort(key=lambda p: (-p.stat().st_size, str(p)))
    return [p.relative_to(root).as_posix() for p in files]


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds the old text or the new, never a part: temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest_entries(root: Path, entries: dict[str, dict]) -> None:
    write_text_atomic(root / MANIFEST, json.dumps({"format": 1, "hash": HASH, "files": dict(sorted(entries.items()))},
                                                  indent=1) + "\n")


def write_manifest(root: str | Path) -> Path:
    """Hash every file of ``root`` (one process) and write its manifest; e.g. to vouch for
    a checkpoint written before chunkflow wrote manifests. Returns the manifest path."""
    root = Path(root)
    write_manifest_entries(root, hash_files(root, list_files(root)))
    return root / MANIFEST


def read_manifest(root: Path) -> dict:
    """The manifest's file table; raises ``CheckpointError("incomplete (...)")`` or
    ``("corrupt (...)")`` without the checkpoint's name (callers add it)."""
    p = root / MANIFEST
    if not p.is_file():
        raise CheckpointError(f"incomplete (no {MANIFEST}: the save did not finish, or it was written before "
                              f"chunkflow wrote manifests, see docs/checkpoints.md)")
    try:
        manifest = json.loads(p.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and manifest.get("hash") == HASH
    except (ValueError, KeyError, AssertionError, TypeError) as e:
        raise CheckpointError(f"corrupt (unreadable {MANIFEST}: {e!r})") from None
    return files


def check_sizes(root: Path, files: dict[str, dict]) -> Optional[str]:
    """The first problem found by size alone (missing file, size differs), else None."""
    for name, entry in files.items():
        p = root / name
        if not p.is_file():
            return f"incomplete (file {name} is missing)"
        if p.stat().st_size != entry["size"]:
            return f"incomplete (file {name}: size {p.stat().st_size} differs from the manifest's {entry['size']})"
    return None


def verify_files(root: Path, files: dict[str, dict], names: Sequence[str]) -> Optional[str]:
    """Hash ``names`` (a subset of the manifest) and return the first mismatch, else None."""
    problem = check_sizes(root, {n: files[n] for n in names})
    if problem:
        return problem
    got = hash_files(root, list(names))
    for name in names:
        if got[name][HASH] != files[name][HASH]:
            return f"corrupt (file {name}: {HASH} hash differs from the manifest's, the file changed after saving)"
    return None


# --------------------------------------------------------------------------- safe metadata
_DCP = "torch.distributed.checkpoint"
_ALLOWED: dict[str, set[str]] = {
    f"{_DCP}.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                         "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    f"{_DCP}.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
                        "LoadItemType"},
    f"{_DCP}.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # looks a layout up by name in torch's table
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "dict", "list", "tuple"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes a DCP ``.metadata`` holds; anything else (``os.system``,
    ``builtins.eval``, ...) is refused before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}' (not a checkpoint metadata class)")


def read_dcp_metadata(model_dir: str | Path) -> Any:
    """The DCP ``Metadata`` of ``model_dir/.metadata``, unpickled through the allow-list."""
    path = Path(model_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{model_dir}: no .metadata (not a torch_dist checkpoint)") from None
    except Exception as e:  # UnpicklingError, or whatever a malformed stream raises
        raise CheckpointError(f"{path}: unsafe or malformed checkpoint metadata, not loaded: {e}") from None


class SafeFileSystemReader(FileSystemReader):
    """torch DCP's ``FileSystemReader`` whose ``read_metadata`` uses the allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_pickled_objects(model_dir: str | Path, metadata: Any) -> None:
    """Load every pickled object stored in the shards (and megatron's ``common.pt``) with
    ``weights_only=True``: megatron's loader unpickles them without that restriction."""
    model_dir = Path(model_dir)
    objects = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in objects:
            continue
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{model_dir}: stored object '{index.fqn}' is transformed "
                                  f"({info.transform_descriptors}); chunkflow cannot check it")
        with open(model_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        _weights_only(io.BytesIO(raw), f"{model_dir}/{info.relative_path} object '{index.fqn}'")
    if (model_dir / "common.pt").is_file():
        _weights_only(model_dir / "common.pt", f"{model_dir}/common.pt")


def _weights_only(source: Any, what: str) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{what}: unsafe pickle, not loaded: {str(e).splitlines()[0]}") from None
