"""K/V state of long samples, and the attention hook that reads and feeds it.

For a long sample split into dependent chunks 0..N-1 (chunk size C), every layer keeps
the post-RoPE keys and values each chunk produced, so that chunk j can attend to the
prefix of chunks 0..j-1 without recomputing them. They live in one buffer per
(sample, layer), allocated once for the sample's whole length and written in place::

    layer l of sample s:   K buffer (N*C tokens, groups, dim), token-major
                           [ K0 (chunk 0) | K1 | K2 | ...   unwritten   ]
    chunk 2 attends to     K[0:2C] (a view, no copy: the prefix, no mask)
                           and its own K2 (causal); the two parts are merged by
                           their log-sum-exps (chunkflow.model.attention)
    gradient buffer        dK[0:2C] += chunk 2's dK of the prefix, in place
                           (fp32 when the model runs in bf16/fp16)

Nothing in the buffers requires grad. :class:`_ChunkAttention` is the one autograd
Function of a dependent chunk's attention: its inputs are the chunk's q and fresh own
k, v (part of the chunk's graph); it reads the prefix from the store and, in backward,
adds the prefix's dK/dV into the gradient buffer and returns, for its own k/v, the
kernel's gradient plus the gradient later chunks accumulated there (times
``grad_scale``: SpaCO's per-hop factor, 1 for exact training). Backward runs in
descending chunk order, so that accumulated gradient is complete when chunk j needs it,
and parameter gradients equal the unchunked run's. A slice of a leaf that requires grad
would instead make autograd build a full-size gradient per chunk.

Writing is idempotent per (sample, layer, chunk): a recompute of chunk j (by the
ChunkFlow schedule, or by megatron's activation recompute inside backward) reads what
is stored instead of storing again. Writes preserve the buffer's autograd version
counter: a later chunk's write never touches a region an earlier chunk read.

**Offload** (``StateStore(offload=True)``, ``chunkflow.offload_kv``): the buffers, the
gradient buffers and the cached pipeline inputs (:meth:`StateStore.stash`) live in a
host pool, and each chunk's attention streams its prefix block by block (one block = one
chunk, C tokens) through the same log-sum-exp merge, forward and backward, so the
device holds at most two blocks per layer at a time whatever the sample's length::

    forward of chunk j, layer l:     fetch blk 0 | fetch blk 1 | fetch blk 2 ...   (side stream)
                                                 | attend blk 0| attend blk 1 ...   (compute)
    backward: the same, fetching dK/dV blocks too (when already written), adding,
    and writing them back.

On CUDA the host pool is pinned memory and copies run on a side stream, one block
ahead, ordered by events (``record_stream`` keeps each buffer alive until the stream
that uses it is done). On CPU the same code moves blocks between a memory-mapped file
(the host pool; the file is unlinked once mapped) and ordinary tensors (the device
pool), so the path runs and is tested here. The store counts the bytes of each pool
(current and peak) for ``scripts/memory_profile.py``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Optional

import torch

from chunkflow.model.attention import (
    ATTENTION_HOOK, block_backward, block_forward, causal_attention, merge_block,
)
from chunkflow.model.provider import ROPE_OFFSET
from chunkflow.scheduling.memory import tag_kv

__all__ = ["StateStore", "ChunkContext", "chunk_context"]

_preserve_version = torch.autograd._unsafe_preserve_version_counter


class _Pools:
    """The two memory pools of the K/V state, the copies between them, and byte counts.

    ``offload=False``: everything is on the run's device; "fetching" a region returns
    a view. ``offload=True``: buffers are allocated in the host pool (pinned on CUDA, a
    memory-mapped file on CPU) and fetched regions are device tensors.
    """

    def __init__(self, offload: bool, host_dir: Optional[str]):
        self.offload = offload
        self.host_dir = host_dir
        self._streams: dict[torch.device, Any] = {}
        # Current and peak bytes per pool, and per pool and kind ("kv": K/V buffers and
        # gradients; "inputs": stashed pipeline inputs; "blocks": regions fetched to the
        # device).
        self.bytes: dict = {}
        self.peak: dict = {}

    # ---------------------------------------------------------------- accounting
    def _count(self, t: torch.Tensor, pool: str, kind: str) -> torch.Tensor:
        n = t.numel() * t.element_size()
        for key in (pool, (pool, kind)):
            self.bytes[key] = self.bytes.get(key, 0) + n
            self.peak[key] = max(self.peak.get(key, 0), self.bytes[key])
        weakref.finalize(t, self._release, pool, kind, n)
        return t

    def _release(self, pool: str, kind: str, n: int) -> None:
        self.bytes[pool] -= n
        self.bytes[(pool, kind)] -= n

    # ---------------------------------------------------------------- allocation
    def alloc(self, shape: tuple, dtype: torch.dtype, device: torch.device, kind: str = "kv") -> torch.Tensor:
        """An uninitialised buffer in the state's home pool."""
        if not self.offload:
            return self._count(torch.empty(shape, dtype=dtype, device=device), "device", kind)
        numel = 1
        for s in shape:
            numel *= s
        if device.type == "cuda":  # pragma: no cover - needs CUDA
            t = torch.empty(shape, dtype=dtype, pin_memory=True)
        else:
            fd, path = tempfile.mkstemp(prefix="chunkflow-kv-", dir=self.host_dir)
            try:
                os.ftruncate(fd, max(numel, 1) * torch.empty((), dtype=dtype).element_size())
                t = torch.from_file(path, shared=True, size=max(numel, 1), dtype=dtype)[:numel].view(shape)
            finally:
                os.close(fd)
                os.unlink(path)  # the mapping keeps the pages; nothing is left on disk
        return self._count(t, "host", kind)

    # ---------------------------------------------------------------- copies
    def _stream(self, device: torch.device) -> Any:
        if device.type != "cuda":
            return None
        if device not in self._streams:  # pragma: no cover - needs CUDA
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def fetch(self, home: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        """Start bringing ``home`` (a region of a buffer) to ``device``; returns the
        tensor and an event to :meth:`ready` it with (None when nothing is pending)."""
        if not self.offload:
            return home, None
        side = self._stream(device)
        if side is None:
            t = torch.empty(home.shape, dtype=home.dtype, device=device).copy_(home)
            return self._count(t, "device", "blocks"), None
        with torch.cuda.stream(side):  # pragma: no cover - needs CUDA
            t = torch.empty(home.shape, dtype=home.dtype, device=device)
            t.copy_(home, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        return self._count(t, "device", "blocks"), event  # pragma: no cover

    @staticmethod
    def ready(t: torch.Tensor, event: Any) -> torch.Tensor:
        """Make the compute stream wait for ``t``'s copy; keep ``t`` alive until it is used."""
        if event is not None:  # pragma: no cover - needs CUDA
            current = torch.cuda.current_stream(t.device)
            current.wait_event(event)
            t.record_stream(current)
        return t

    def store(self, home: torch.Tensor, t: torch.Tensor) -> None:
        """Write device tensor ``t`` into ``home`` (in place; asynchronous on CUDA)."""
        side = self._stream(t.device) if self.offload else None
        with torch.no_grad(), _preserve_version(home):
            if side is None:
                home.copy_(t)
                return
            side.wait_stream(torch.cuda.current_stream(t.device))  # pragma: no cover - needs CUDA
            with torch.cuda.stream(side):  # pragma: no cover
                home.copy_(t, non_blocking=True)
            t.record_stream(side)  # pragma: no cover

    def drain(self, device: torch.device) -> None:
        """Order the compute stream after every pending copy (before host memory is freed)."""
        side = self._streams.get(device)
        if side is not None:  # pragma: no cover - needs CUDA
            torch.cuda.current_stream(device).wait_stream(side)


class _LayerKV:
    """K/V of one (sample, layer): buffers ``(capacity, groups, dim)``, token-major."""

    def __init__(self, pools: _Pools, capacity: int, block: int, like: torch.Tensor):
        self.pools, self.capacity, self.block = pools, capacity, block
        self.device, self.dtype = like.device, like.dtype
        self.shape = (capacity,) + tuple(like.shape[1:])
        self.k = pools.alloc(self.shape, like.dtype, like.device)
        self.v = pools.alloc(self.shape, like.dtype, like.device)
        low = like.dtype not in (torch.float32, torch.float64)
        self.grad_dtype = torch.float32 if low else like.dtype
        self.gk: Optional[torch.Tensor] = None
        self.gv: Optional[torch.Tensor] = None
        self.grad_hi = 0  # gradient buffers hold data in [0, grad_hi)
        self.written: set[int] = set()

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a chunk's ``k, v (tokens, groups, dim)`` at ``start`` (once)."""
        if start in self.written:
            return
        end = start + k.shape[0]
        if end > self.capacity:
            raise RuntimeError(f"a chunk ending at token {end} does not fit the sample's K/V "
                               f"buffer of {self.capacity} tokens")
        self.pools.store(self.k[start:end], k)
        self.pools.store(self.v[start:end], v)
        self.written.add(start)

    def blocks(self, end: int) -> list[tuple[int, int]]:
        """The regions [a, b) a prefix of ``end`` tokens is read in: one view on the
        device, blocks of one chunk when offloaded."""
        if not self.pools.offload:
            return [(0, end)] if end > 0 else []
        return [(a, min(a + self.block, end)) for a in range(0, end, self.block)]

    def _fetch(self, a: int, b: int, grads: bool) -> list:
        """Start fetching K, V (and the gradients, if written) of region [a, b)."""
        homes = [self.k[a:b], self.v[a:b]]
        if grads and self.gk is not None and b <= self.grad_hi:
            homes += [self.gk[a:b], self.gv[a:b]]
        return [self.pools.fetch(h, self.device) for h in homes]

    def stream(self, end: int, grads: bool = False) -> Iterator[tuple[int, int, list]]:
        """Yield ``(a, b, [k, v, (gk, gv)])`` device tensors (token-major) of the prefix
        [0, end), fetching the next region while the caller works on this one."""
        regions = self.blocks(end)
        pending = self._fetch(*regions[0], grads) if regions else None
        for n, (a, b) in enumerate(regions):
            current = pending
            pending = self._fetch(*regions[n + 1], grads) if n + 1 < len(regions) else None
            yield a, b, [self.pools.ready(t, e) for t, e in current]

    def accumulate(self, a: int, b: int, fetched: list, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """Add ``dk, dv (tokens, groups, dim)`` to the gradient of region [a, b).

        Gradient regions fill from the front (backward runs in descending chunk order):
        [0, grad_hi) holds sums, the rest is unwritten and is written, not added to.
        ``fetched``: what :meth:`stream` brought for this region (offload: the gradient
        blocks, when written)."""
        if self.gk is None:
            self.gk = self.pools.alloc(self.shape, self.grad_dtype, self.device)
            self.gv = self.pools.alloc(self.shape, self.grad_dtype, self.device)
        mid = min(max(self.grad_hi, a), b)  # [a, mid) adds, [mid, b) writes
        for n, (home, d) in enumerate(((self.gk, dk), (self.gv, dv))):
            d = d.to(self.grad_dtype)
            if mid > a and not self.pools.offload:
                with torch.no_grad(), _preserve_version(home):
                    home[a:mid].add_(d[:mid - a])
            elif mid > a:  # offload: blocks are whole chunks, written or not
                assert mid == b and len(fetched) == 4, "an offloaded gradient block was not fetched"
                self.pools.store(home[a:b], fetched[2 + n].add_(d))
            if b > mid:
                self.pools.store(home[mid:b], d[mid - a:])
        self.grad_hi = max(self.grad_hi, b)

    def grad(self, a: int, b: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The accumulated gradient of region [a, b) on the device, or None if none."""
        if self.gk is None or b > self.grad_hi:
            return None
        out = [self.pools.fetch(h[a:b], self.device) for h in (self.gk, self.gv)]
        return tuple(self.pools.ready(t, e) for t, e in out)  # type: ignore[return-value]


class StateStore:
    """Per sample, per layer: the K/V buffers, their gradients, and stashed inputs.

    ``offload``: keep them in host memory and stream what each chunk needs (module
    docstring). ``host_dir``: where the CPU host pool's memory-mapped files are created
    (default: the system temp dir; the files are unlinked at once).
    """

    def __init__(self, offload: bool = False, host_dir: Optional[str] = None) -> None:
        self.offload = offload
        self.pools = _Pools(offload, host_dir)
        self._data: dict[Hashable, dict[int, _LayerKV]] = {}

    def layer(self, sample: Hashable, layer: int, capacity: int, block: int,
              like: torch.Tensor) -> _LayerKV:
        """The (sample, layer) buffers, allocated on first use for ``capacity`` tokens."""
        layers = self._data.setdefault(sample, {})
        kv = layers.get(layer)
        if kv is None:
            kv = layers[layer] = _LayerKV(self.pools, capacity, block, like)
        return kv

    def free(self, sample: Hashable) -> None:
        layers = self._data.pop(sample, None)
        if layers:
            for kv in layers.values():
                self.pools.drain(kv.device)

    def samples(self) -> list[Hashable]:
        return list(self._data)

    def stash(self, t: Optional[torch.Tensor]) -> Any:
        """Keep ``t`` (a cached pipeline input) until :meth:`unstash`: in the host pool
        when offloading, as is otherwise (counted in the device pool)."""
        if t is None:
            return None
        if not self.offload:
            return self.pools._count(t, "device", "inputs")
        home = self.pools.alloc(tuple(t.shape), t.dtype, t.device, kind="inputs")
        self.pools.store(home, t)
        return home, t.device, t.requires_grad

    def unstash(self, handle: Any) -> Optional[torch.Tensor]:
        if handle is None or isinstance(handle, torch.Tensor):
            return handle
        home, device, _ = handle
        t, event = self.pools.fetch(home, device)
        return self.pools.ready(t, event)

    def nbytes(self) -> int:
        """Bytes of K/V state and gradients held now, in whichever pool they live."""
        total = 0
        for layers in self._data.values():
            for kv in layers.values():
                for t in (kv.k, kv.v, kv.gk, kv.gv):
                    if t is not None:
                        total += t.numel() * t.element_size()
        return total

    def memory(self) -> dict[str, int]:
        """Current and peak bytes of each pool (K/V, gradients, stashed inputs, and the
        blocks fetched to the device)."""
        out = {}
        for key, peak in self.pools.peak.items():
            name = key if isinstance(key, str) else "_".join(key)
            out[f"{name}_bytes"] = self.pools.bytes[key]
            out[f"{name}_peak_bytes"] = peak
        for pool in ("device", "host"):
            out.setdefault(f"{pool}_bytes", 0)
            out.setdefault(f"{pool}_peak_bytes", 0)
        return out


def _nested(device: torch.device) -> bool:
    """One fused kernel over the buffer view (GPU kernels), or the block kernels."""
    return device.type != "cpu"


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """(1, groups, s, d) kernel layout <-> (s, groups, d) buffer layout (views)."""
    return t[0].transpose(0, 1)


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1)[None]


class _ChunkAttention(torch.autograd.Function):
    """A dependent chunk's attention over the stored prefix and its own k, v.

    Inputs ``q (1, heads, s, d)``, ``k/v (1, groups, s, d)`` (own, fresh), ``info =
    (layer K/V, start, scale, grad_scale, nested)``. ``nested`` (CUDA without offload):
    one flash-attn / SDPA call over the contiguous view ``K[0:start + s]`` (bottom-right
    causal), differentiated by a graph built inside forward; otherwise the own part and
    each prefix block run the block kernels and are merged by log-sum-exp.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                info: tuple) -> torch.Tensor:
        kv, start, scale, _, nested = info
        ctx.info = info
        if nested:
            end = start + q.shape[2]
            with torch.enable_grad():
                qd = q.detach().requires_grad_(True)
                k_all = kv.k[:end].detach().requires_grad_(True)
                v_all = kv.v[:end].detach().requires_grad_(True)
                tag_kv(k_all, v_all)
                out = causal_attention(qd[0], k_all.transpose(0, 1), v_all.transpose(0, 1), scale)
            ctx.inner = (out, qd, k_all, v_all)
            return out.detach()[None]
        out, lse = block_forward(q, k, v, scale, True)
        if start > 0:
            acc = out.to(lse.dtype)
            for _, _, (kb, vb) in kv.stream(start):
                o_i, l_i = block_forward(q, _kernel_layout(kb), _kernel_layout(vb), scale, False)
                acc, lse = merge_block(acc, lse, o_i, l_i)
                del kb, vb  # let the fetched block go before the next one arrives
            out = acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple:  # type: ignore[override]
        kv, start, scale, grad_scale, nested = ctx.info
        dout = dout.contiguous()
        if nested:
            out, qd, k_all, v_all = ctx.inner
            del ctx.inner
            dq, dk_all, dv_all = torch.autograd.grad(out, (qd, k_all, v_all), dout[0])
            if start > 0:
                kv.accumulate(0, start, [], dk_all[:start], dv_all[:start])
            dq = dq[None]
            dk, dv = _kernel_layout(dk_all[start:]), _kernel_layout(dv_all[start:])
        else:
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = block_backward(dout, q, k, v, out, lse, scale, True)
            if start > 0:
                dq = dq.to(lse.dtype)
                for a, b, fetched in kv.stream(start, grads=True):
                    kb, vb = _kernel_layout(fetched[0]), _kernel_layout(fetched[1])
                    dq_i, dk_i, dv_i = block_backward(dout, q, kb, vb, out, lse, scale, False)
                    dq += dq_i
                    kv.accumulate(a, b, fetched, _token_major(dk_i), _token_major(dv_i))
                    del fetched, kb, vb, dk_i, dv_i
                dq = dq.to(q.dtype)
        stored = kv.grad(start, start + dk.shape[2])
        if stored is not None:  # what later chunks sent to this chunk's K/V
            gk, gv = (_kernel_layout(g).to(dk.dtype) for g in stored)
            dk = dk + (gk if grad_scale == 1.0 else gk * grad_scale)
            dv = dv + (gv if grad_scale == 1.0 else gv * grad_scale)
        return dq, dk, dv, None


@dataclass
class ChunkContext:
    """What the attention hook needs to know about the chunk being run.

    ``start``: the chunk's first token in the sample (default ``chunk * tokens``);
    ``capacity``: tokens the sample's buffers hold (default ``num_chunks * tokens``);
    ``block``: tokens per offloaded block (default: the chunk's tokens).
    """

    store: StateStore
    sample: Hashable
    chunk: int
    num_chunks: int
    seen_layers: set = field(default_factory=set)
    # Factor on the K/V gradient this chunk receives from later chunks (SpaCO's k/t per
    # hop, chunkflow.scheduling.spaco); 1.0 = exact.
    grad_scale: float = 1.0
    start: int = -1
    capacity: int = 0
    block: int = 0

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               packed_seq_params: Any) -> torch.Tensor:
        """Hooked core attention for a dependent chunk (sbhd, batch 1)."""
        assert packed_seq_params is None, "dependent chunks run unpacked"
        layer = int(module.layer_number)
        sq, b, heads, dim = query.shape
        assert b == 1, "dependent chunks run with batch size 1"
        start = self.start if self.start >= 0 else self.chunk * sq
        capacity = max(self.capacity or self.num_chunks * sq, start + sq)
        kv = self.store.layer(self.sample, layer, capacity, self.block or sq, key[:, 0])
        kv.write(start, key[:, 0], value[:, 0])  # (s, groups, d): the buffer's layout
        # (s, 1, h, d) -> (1, h, s, d). Own K/V are copied out of megatron's fused QKV
        # projection so a saved view does not keep that whole buffer alive.
        q = query[:, 0].transpose(0, 1)[None]
        k = key[:, 0].transpose(0, 1).contiguous()[None]
        v = value[:, 0].transpose(0, 1).contiguous()[None]
        nested = _nested(q.device) and not self.store.offload
        info = (kv, start, module._scale(dim), self.grad_scale, nested)
        if nested and not torch.is_grad_enabled():
            out = causal_attention(q[0], kv.k[:start + sq].transpose(0, 1),
                                   kv.v[:start + sq].transpose(0, 1), info[2])[None]
        else:
            out = _ChunkAttention.apply(q, k, v, info)  # (1, h, s, d)
        return out[0].transpose(0, 1).reshape(sq, 1, heads * dim)


@contextlib.contextmanager
def chunk_context(ctx: Optional[ChunkContext], rope_offset: int = 0) -> Iterator[None]:
    """Route core attention through ``ctx`` and shift RoPE positions by ``rope_offset``.

    Keep it active through ``backward()`` as well: megatron's activation recompute
    re-runs the forward inside backward and must see the same chunk.
    """
    hook_token = ATTENTION_HOOK.set(None if ctx is None else ctx.attend)
    rope_token = ROPE_OFFSET.set(rope_offset)
    try:
        yield
    finally:
        ROPE_OFFSET.reset(rope_token)
        ATTENTION_HOOK.reset(hook_token)
