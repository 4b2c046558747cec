"""Measure activation memory: bytes of tensors autograd saves for backward.

:class:`SavedTensorMeter` installs ``torch.autograd.graph.saved_tensors_hooks`` and
counts every distinct storage saved for backward while it is alive (a storage saved by
several ops counts once; parameters are excluded since they exist regardless). It
reports the peak over the metered region, split in two:

* ``peak_bytes``: activations, what ChunkFlow bounds by K x (one chunk);
* ``peak_kv_bytes``: the concatenated K/V prefixes that dependent chunks attend to
  (tagged by the attention hook via :func:`tag_kv`), which grow linearly with the
  sample length by design and are accounted separately.

Byte counts, not time: the numbers are deterministic for a given model and batch.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import Any, Optional

import torch

__all__ = ["SavedTensorMeter", "tag_kv"]

_CURRENT: contextvars.ContextVar[Optional["SavedTensorMeter"]] = contextvars.ContextVar(
    "chunkflow_saved_tensor_meter", default=None
)


def _key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def tag_kv(*tensors: torch.Tensor) -> None:
    """Mark tensors as K/V state for the active meter (no-op without one)."""
    meter = _CURRENT.get()
    if meter is None or not torch.is_grad_enabled():
        return
    for t in tensors:
        ptr = _key(t)[0]
        meter._kv.add(ptr)
        # Forget the tag when the tensor dies, so a later activation that reuses the
        # address is not counted as K/V.
        weakref.finalize(t, meter._kv.discard, ptr)


class _Saved:
    __slots__ = ("tensor", "meter", "key", "__weakref__")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorMeter", key: tuple[int, int]):
        self.tensor, self.meter, self.key = tensor, meter, key
        meter._inc(key)

    def __del__(self) -> None:
        self.meter._dec(self.key)


class SavedTensorMeter:
    def __init__(self, exclude: Optional[torch.nn.Module] = None):
        self._refs: dict[tuple[int, int], list] = {}  # key -> [count, is_kv]
        self._kv: set[int] = set()
        self._excluded = {_key(p)[0] for p in exclude.parameters()} if exclude is not None else set()
        self.current_bytes = 0
        self.current_kv_bytes = 0
        self.peak_bytes = 0
        self.peak_kv_bytes = 0
        self._hooks: Any = None
        self._token: Any = None

    def _inc(self, key: tuple[int, int]) -> None:
        entry = self._refs.get(key)
        if entry is not None:
            entry[0] += 1
            return
        # The category is fixed when the storage is first saved: the tagged tensor object
        # may die (dropping its tag) while a saved alias of its storage lives on.
        is_kv = key[0] in self._kv
        self._refs[key] = [1, is_kv]
        if is_kv:
            self.current_kv_bytes += key[1]
            self.peak_kv_bytes = max(self.peak_kv_bytes, self.current_kv_bytes)
        else:
            self.current_bytes += key[1]
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _dec(self, key: tuple[int, int]) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] > 0:
            return
        del self._refs[key]
        if entry[1]:
            self.current_kv_bytes -= key[1]
        else:
            self.current_bytes -= key[1]

    def _pack(self, t: torch.Tensor) -> Any:
        key = _key(t)
        if key[0] in self._excluded or isinstance(t, torch.nn.Parameter):
            return t
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(p: Any) -> torch.Tensor:
        return p.tensor if isinstance(p, _Saved) else p

    def __enter__(self) -> "SavedTensorMeter":
        self._token = _CURRENT.set(self)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        _CURRENT.reset(self._token)
