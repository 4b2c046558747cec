"""K/V state of long samples, and the attention hook that reads and feeds it.

For a long sample split into dependent chunks 0..N-1 (chunk size C), every layer keeps
the post-RoPE keys and values each chunk produced, so that chunk j can attend to the
prefix of chunks 0..j-1 without recomputing them::

    layer l of sample s:   chunk 0        chunk 1        chunk 2
                           K0,V0 (leaf)   K1,V1 (leaf)   K2,V2 (leaf)
    chunk 2's queries attend to  K0, K1 (all) and K2_own (causal): bottom-right causal
                                 over the three, without building the mask
                                 (chunkflow.model.attention)

Stored tensors are detached *leaves* that require grad. When chunk j attends to the
prefix, autograd accumulates dL/dK_i, dL/dV_i (i < j) on those leaves. Chunk i's own
attention uses its freshly computed K_i/V_i (part of its graph) wrapped in
:class:`_AddStoredGrad`, whose backward adds the gradient accumulated on the leaf. As
backward runs in descending chunk order, the leaf's gradient is complete by the time
chunk i back-propagates, so parameter gradients equal the unchunked run's.

Gradient accumulators are fp32 when the model runs in lower precision (a post-
accumulate hook moves each leaf gradient into an fp32 buffer).

Storing is idempotent per (sample, layer, chunk): a recompute of chunk j (by the
ChunkFlow schedule, or by megatron's activation recompute inside backward) reads the
stored leaf instead of storing again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Optional

import torch

from chunkflow.model.attention import ATTENTION_HOOK, causal_attention
from chunkflow.model.provider import ROPE_OFFSET
from chunkflow.scheduling.memory import tag_kv

__all__ = ["StateStore", "ChunkContext", "chunk_context"]


@dataclass
class _Entry:
    k: torch.Tensor  # (groups, tokens, dim) leaf, requires grad
    v: torch.Tensor
    k_acc: Optional[torch.Tensor] = None  # fp32 gradient accumulators (low precision only)
    v_acc: Optional[torch.Tensor] = None

    def grads(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.k_acc is not None:
            return self.k_acc, self.v_acc
        return self.k.grad, self.v.grad


def _fp32_accumulator(leaf: torch.Tensor, entry: _Entry, attr: str) -> None:
    """Move each gradient landing on ``leaf`` into an fp32 buffer on ``entry``."""

    def hook(t: torch.Tensor) -> None:
        acc = getattr(entry, attr)
        g = t.grad.float()
        setattr(entry, attr, g if acc is None else acc.add_(g))
        t.grad = None

    leaf.register_post_accumulate_grad_hook(hook)


class StateStore:
    """Per sample, per layer, per chunk: stored K/V leaves and their gradients."""

    def __init__(self) -> None:
        self._data: dict[Hashable, dict[int, dict[int, _Entry]]] = {}

    def put(self, sample: Hashable, layer: int, chunk: int, k: torch.Tensor, v: torch.Tensor) -> _Entry:
        layers = self._data.setdefault(sample, {})
        chunks = layers.setdefault(layer, {})
        if chunk not in chunks:
            k_leaf = k.detach().requires_grad_(True)
            v_leaf = v.detach().requires_grad_(True)
            entry = _Entry(k_leaf, v_leaf)
            if k.dtype != torch.float32 and k.dtype != torch.float64:
                _fp32_accumulator(k_leaf, entry, "k_acc")
                _fp32_accumulator(v_leaf, entry, "v_acc")
            chunks[chunk] = entry
        return chunks[chunk]

    def prefix(self, sample: Hashable, layer: int, chunk: int) -> list[_Entry]:
        chunks = self._data.get(sample, {}).get(layer, {})
        missing = [i for i in range(chunk) if i not in chunks]
        if missing:
            raise RuntimeError(
                f"chunk {chunk} of sample {sample!r} needs stored K/V of chunks {missing} at "
                f"layer {layer}: the schedule ran it before its prefix"
            )
        return [chunks[i] for i in range(chunk)]

    def entry(self, sample: Hashable, layer: int, chunk: int) -> _Entry:
        return self._data[sample][layer][chunk]

    def free(self, sample: Hashable) -> None:
        self._data.pop(sample, None)

    def samples(self) -> list[Hashable]:
        return list(self._data)

    def nbytes(self) -> int:
        """Bytes held by stored K/V and their gradients (the state that grows with length)."""
        total = 0
        for layers in self._data.values():
            for chunks in layers.values():
                for e in chunks.values():
                    for t in (e.k, e.v, e.k.grad, e.v.grad, e.k_acc, e.v_acc):
                        if t is not None:
                            total += t.numel() * t.element_size()
        return total


class _AddStoredGrad(torch.autograd.Function):
    """Identity on ``x``; backward adds the gradient accumulated on the stored leaf.

    ``entry_box = [entry, "k" | "v", scale]``: the stored gradient is multiplied by
    ``scale`` on the way in (1 for exact training; SpaCO's per-hop factor k/t).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, entry_box: list) -> torch.Tensor:  # type: ignore[override]
        ctx.entry_box = entry_box
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        entry, which, scale = ctx.entry_box
        k_grad, v_grad = entry.grads()
        extra = k_grad if which == "k" else v_grad
        if extra is not None:
            extra = extra.to(grad.dtype)
            grad = grad + (extra if scale == 1.0 else extra * scale)
        return grad, None


@dataclass
class ChunkContext:
    """What the attention hook needs to know about the chunk being run."""

    store: StateStore
    sample: Hashable
    chunk: int
    num_chunks: int
    seen_layers: set = field(default_factory=set)
    # Factor on the K/V gradient this chunk receives from later chunks (SpaCO's k/t per
    # hop, chunkflow.scheduling.spaco); 1.0 = exact.
    grad_scale: float = 1.0

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               packed_seq_params: Any) -> torch.Tensor:
        """Hooked core attention for a dependent chunk (sbhd, batch 1)."""
        assert packed_seq_params is None, "dependent chunks run unpacked"
        layer = int(module.layer_number)
        sq, b, heads, dim = query.shape
        assert b == 1, "dependent chunks run with batch size 1"
        # (s, 1, h, d) -> (h, s, d). K/V are copied to their own storage before being
        # stored: megatron's value is a view of the fused QKV projection, and a stored
        # view would keep the whole (s, heads + 2 * groups, d) buffer alive.
        q = query[:, 0].transpose(0, 1)
        k = key[:, 0].transpose(0, 1).contiguous()
        v = value[:, 0].transpose(0, 1).contiguous()
        entry = self.store.put(self.sample, layer, self.chunk, k, v)
        prefix = self.store.prefix(self.sample, layer, self.chunk)
        if torch.is_grad_enabled():
            k_own = _AddStoredGrad.apply(k, [entry, "k", self.grad_scale])
            v_own = _AddStoredGrad.apply(v, [entry, "v", self.grad_scale])
        else:
            k_own, v_own = k, v
        scale = module._scale(dim)
        # For memory accounting, the K/V the chunk attends to are K/V state: its own K/V
        # (the same storage as its stored leaves) and the prefix kept for backward (the
        # stored leaves on CPU, their concatenation on GPU). The rest is chunk-sized.
        tag_kv(k, v)
        out = causal_attention(q, k_own, v_own, scale, prefix=[(e.k, e.v) for e in prefix],
                               on_prefix=tag_kv)  # (h, s, d)
        return out.transpose(0, 1).reshape(sq, 1, heads * dim)


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
