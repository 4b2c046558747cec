"""Core attention for megatron-core's local layer spec, on exact kernels.

megatron's local ``DotProductAttention`` rejects packed (THD) input; this subclass
accepts both layouts megatron hands to core attention:

* ``sbhd``: ``query (sq, b, heads, dim)``, ``key/value (sk, b, groups, dim)``, causal.
* ``thd`` (packed samples, ``packed_seq_params.cu_seqlens_q``):
  ``query (t, heads, dim)``, ``key/value (t, groups, dim)``; each sample attends only
  to itself, causally. RoPE was already applied per sample by megatron (positions
  restart at 0 at every ``cu_seqlens`` boundary)::

      tokens      a0 a1 a2 b0 b1
      cu_seqlens  [0, 3, 5]
      a1 sees a0 a1;  b0 sees b0 only (never a*)

Query head ``h`` reads key/value group ``h // (heads / groups)`` (GQA).

The CPU path (and the reference path everywhere) is
``torch.nn.functional.scaled_dot_product_attention`` per sample. With CUDA and
flash-attn installed, packed input goes to ``flash_attn_varlen_func`` instead.

A per-call hook (:data:`ATTENTION_HOOK`) lets the ChunkFlow executor take over the
attention of a layer (dependent chunks attend to a stored K/V prefix); with no hook
set this module is plain attention and the same model runs unchunked.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = ["SDPAAttention", "ATTENTION_HOOK", "causal_attention", "flash_attn_available"]

# Called as hook(module, query, key, value, packed_seq_params) -> output or None.
ATTENTION_HOOK: contextvars.ContextVar[Optional[Callable[..., Any]]] = contextvars.ContextVar(
    "chunkflow_attention_hook", default=None
)

try:  # GPU-only kernels, optional
    from flash_attn import flash_attn_func as _flash  # type: ignore
    from flash_attn import flash_attn_varlen_func as _flash_varlen  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    _flash = _flash_varlen = None


def flash_attn_available(t: torch.Tensor) -> bool:
    """flash-attn is importable, the tensor is on a GPU and in a dtype it supports."""
    return _flash_varlen is not None and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    on_inputs: Optional[Callable[..., None]] = None,
) -> torch.Tensor:
    """Causal attention with the mask aligned bottom-right.

    ``q (heads, sq, dim)``, ``k/v (groups, sk, dim)`` with ``sk >= sq``: query i sees
    keys ``0 .. sk - sq + i`` (the whole prefix plus its own chunk up to itself). For
    ``sk == sq`` this is ordinary causal attention. Returns ``(heads, sq, dim)``.
    ``on_inputs(k, v, mask)`` (optional) sees the tensors handed to the kernel.
    """
    heads, sq, _ = q.shape
    groups, sk, _ = k.shape
    if flash_attn_available(q):  # pragma: no cover - needs CUDA
        # flash-attn's causal mask is aligned bottom-right when sq < sk, and it reads
        # GQA groups directly: (1, s, heads, d) layout.
        if on_inputs is not None:
            on_inputs(k, v, None)
        out = _flash(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                     softmax_scale=scale, causal=True)
        return out[0].transpose(0, 1)
    if heads != groups:
        k = k.repeat_interleave(heads // groups, dim=0)
        v = v.repeat_interleave(heads // groups, dim=0)
    mask = None
    if sq != sk:
        # Additive mask in q's dtype: the CPU kernel would otherwise convert a boolean
        # mask to a float copy of its own and keep that for backward.
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        mask = torch.zeros(sq, sk, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
    if on_inputs is not None:
        on_inputs(k, v, mask)
    # 4-D inputs: torch's CPU dispatcher picks its flash kernel (which saves only q, k, v,
    # output and log-sum-exp for backward) for 4-D inputs, masked or not; 3-D inputs fall
    # back to the math path that saves the (heads, sq, sk) probability matrix.
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=scale
    )
    return out[0]


class SDPAAttention(DotProductAttention):
    """``DotProductAttention`` that handles THD packing and the ChunkFlow hook."""

    def _scale(self, dim: int) -> float:
        scale = getattr(self, "softmax_scale", None)
        return float(scale) if scale is not None else dim**-0.5

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Any = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        assert attention_bias is None, "attention bias is not supported"
        hook = ATTENTION_HOOK.get()
        if hook is not None:
            out = hook(self, query, key, value, packed_seq_params)
            if out is not None:
                return out
        scale = self._scale(query.shape[-1])
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params, scale)
        # sbhd: (s, b, h, d) -> (b, h, s, d)
        sq, b, heads, dim = query.shape
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        outs = [causal_attention(q[i], k[i], v[i], scale) for i in range(b)]
        out = torch.stack(outs, dim=0)  # (b, h, s, d)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    def _packed(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, psp: Any, scale: float
    ) -> torch.Tensor:
        # (t, heads, dim) / (t, groups, dim)
        t, heads, dim = query.shape
        cu = psp.cu_seqlens_q
        if flash_attn_available(query):  # pragma: no cover - needs CUDA + flash-attn
            out = _flash_varlen(
                query, key, value, cu, cu, psp.max_seqlen_q, psp.max_seqlen_q,
                softmax_scale=scale, causal=True,
            )
            return out.reshape(t, heads * dim)
        bounds = cu.tolist()
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end == start:
                continue
            q = query[start:end].transpose(0, 1)
            k = key[start:end].transpose(0, 1)
            v = value[start:end].transpose(0, 1)
            outs.append(causal_attention(q, k, v, scale).transpose(0, 1))
        if bounds[-1] < t:  # padding tail, if any: attends to nothing useful, output zeros
            outs.append(query.new_zeros(t - bounds[-1], heads, dim))
        return torch.cat(outs, dim=0).reshape(t, heads * dim)
