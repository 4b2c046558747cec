"""Core attention for megatron-core's local layer spec, on exact kernels.

megatron's local ``DotProductAttention`` rejects packed (THD) input; this subclass
accepts both layouts megatron hands to core attention:

* ``sbhd``: ``query (sq, b, heads, dim)``, ``key/value (sk, b, groups, dim)``, causal.
* ``thd`` (packed samples, ``packed_seq_params.cu_seqlens_q``):
  ``query (t, heads, dim)``, ``key/value (t, groups, dim)``; each sample attends only
  to itself, causally. RoPE was already applied per sample by megatron (positions
  restart at 0 at every ``cu_seqlens`` boundary)::

      tokens      a0 a1 a2 b0 b1 | p0 p1      (p = padding segment, chunkflow.model.batch)
      cu_seqlens  [0, 3, 5, 7]
      a1 sees a0 a1;  b0 sees b0 only (never a*);  p* outputs are zeros (no kernel call)

Query head ``h`` reads key/value group ``h // (heads / groups)`` (GQA); no path
repeats K/V per query head.

A dependent chunk (chunk j of a long sample, ``chunkflow.scheduling.state``) attends to
the stored K/V of chunks 0..j-1 (the prefix, P tokens) and to its own C tokens, with the
causal mask aligned bottom-right::

    keys:         prefix (P)          own chunk (C)
    query i  [ 1 1 1 ... 1 1 1 | 1 .. 1 (keys <= i) 0 .. 0 ]

That mask never needs to exist. The attention splits into (a) the chunk attending to the
prefix with no mask and (b) the chunk attending to itself with an ordinary causal mask
(square, so top-left and bottom-right agree). Each part's kernel returns its output
``o_p`` and the log-sum-exp ``l_p`` of its scores; the exact result is::

    l = logaddexp(l_a, l_b)        o = exp(l_a - l) * o_a + exp(l_b - l) * o_b

Backward uses the merged ``o`` and ``l`` for every part: with them the flash backward of
part p computes ``P_p = exp(S_p - l)`` (its slice of the full softmax) and
``D = rowsum(dO * o)`` (the full softmax's term), so the part's dQ, dK, dV are exactly
its share of the full gradient. Only q, the K/V inputs, ``o`` and ``l`` are kept for
backward; no score matrix, no mask, no K/V copies. A dependent chunk's prefix is a view
of the state store's per-sample buffer (one block), or, with K/V offload, chunk-sized
blocks streamed from host memory and merged in turn (:func:`block_forward`,
:func:`block_backward`, :func:`merge_block`; ``chunkflow.scheduling.state``).

Backends (:func:`attention_backend`, decided per device and dtype, logged once):

* CPU: torch's flash kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` (native
  GQA, returns the log-sum-exp) and its backward op, merged as above (:class:`_MergedCPU`).
* CUDA + flash-attn 2 (fp16/bf16): ``flash_attn_func(causal=True)`` over prefix + own
  K/V as one sequence (for a dependent chunk, a view of the state store's buffer; bottom-right aligned when ``sq < sk`` since flash-attn 2.1, native GQA);
  packed rows via ``flash_attn_varlen_func`` (a padding segment is one more segment).
* CUDA without flash-attn, or fp32, and other devices: ``scaled_dot_product_attention``
  with ``causal_lower_right(sq, sk)`` and ``enable_gqa=True``. This warns: for fp32 with
  GQA torch has no kernel for the lower-right mask and materialises it.

A per-call hook (:data:`ATTENTION_HOOK`) lets the ChunkFlow executor take over the
attention of a layer (dependent chunks attend to a stored K/V prefix); with no hook
set this module is plain attention and the same model runs unchunked.
"""

from __future__ import annotations

import contextvars
import logging
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = [
    "SDPAAttention", "ATTENTION_HOOK", "causal_attention", "packed_attention",
    "attention_backend", "host_cu_seqlens", "flash_attn_available",
    "block_forward", "block_backward", "merge_block", "one_key_sequence",
]

logger = logging.getLogger(__name__)

# Called as hook(module, query, key, value, packed_seq_params) -> output or None.
ATTENTION_HOOK: contextvars.ContextVar[Optional[Callable[..., Any]]] = contextvars.ContextVar(
    "chunkflow_attention_hook", default=None
)

try:  # GPU-only kernels, optional
    import flash_attn as _flash_attn_pkg  # type: ignore
    from flash_attn import flash_attn_func as _flash  # type: ignore
    from flash_attn import flash_attn_varlen_func as _flash_varlen  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    _flash_attn_pkg = _flash = _flash_varlen = None

_HALF = (torch.float16, torch.bfloat16)
_CPU_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def attention_backend(device: torch.device | str, dtype: torch.dtype, *,
                      flash_attn: Optional[bool] = None) -> str:
    """Name of the attention path used for ``device`` and ``dtype``.

    ``flash_attn``: whether flash-attn is importable (default: detect). On CUDA without a
    usable flash-attn (not installed, or fp32) this emits a ``UserWarning``: the SDPA
    path works but is slower, and for fp32 + GQA torch materialises the bottom-right
    mask of a dependent chunk.
    """
    device = torch.device(device)
    if flash_attn is None:
        flash_attn = _flash_varlen is not None
    if device.type == "cpu":
        return "torch SDPA flash (CPU) with LSE merge"
    if device.type == "cuda" and flash_attn and dtype in _HALF:
        version = getattr(_flash_attn_pkg, "__version__", "2.x")
        return f"flash-attn {version} varlen + bottom-right causal"
    name = f"torch SDPA ({device.type}) causal_lower_right + enable_gqa"
    if device.type == "cuda":
        why = "flash-attn is not installed" if not flash_attn else f"flash-attn does not run {dtype}"
        warnings.warn(
            f"attention on CUDA without flash-attn ({why}): using {name}; with fp32 and GQA "
            f"torch materialises each dependent chunk's (C x prefix) mask. Install flash-attn "
            f"and train in bf16 for the intended kernels.",
            stacklevel=2,
        )
    return name


_ANNOUNCED: set = set()


def _announce(t: torch.Tensor) -> None:
    """Log the backend the first time a (device type, dtype) runs attention."""
    key = (t.device.type, t.dtype)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        logger.info("attention backend: %s", attention_backend(t.device, t.dtype))


def flash_attn_available(t: torch.Tensor) -> bool:
    """flash-attn is importable, the tensor is on a GPU and in a dtype it supports."""
    return _flash_varlen is not None and t.is_cuda and t.dtype in _HALF


class _MergedCPU(torch.autograd.Function):
    """CPU flash attention of a chunk over its own K/V (causal) and prefix blocks (full).

    Inputs ``q (1, heads, C, d)``, ``k_own/v_own (1, groups, C, d)``, then
    ``k_0, v_0, k_1, v_1, ...`` with ``k_i (1, groups, P_i, d)``. See the module
    docstring for the log-sum-exp merge and why backward is exact.
    """

    @staticmethod
    def forward(ctx: Any, scale: float, q: torch.Tensor, k_own: torch.Tensor,  # type: ignore[override]
                v_own: torch.Tensor, *prefix: torch.Tensor) -> torch.Tensor:
        out, lse = _CPU_FWD(q, k_own, v_own, 0.0, True, scale=scale)
        if prefix:
            acc = out.to(lse.dtype)  # merge in fp32 (fp64 for fp64 inputs)
            for k, v in zip(prefix[0::2], prefix[1::2]):
                o_i, l_i = _CPU_FWD(q, k, v, 0.0, False, scale=scale)
                new = torch.logaddexp(lse, l_i)
                acc = acc * (lse - new).exp_()[..., None] + o_i.to(acc.dtype) * (l_i - new).exp_()[..., None]
                lse = new
            out = acc.to(q.dtype)
        ctx.scale = scale
        ctx.save_for_backward(q, out, lse, k_own, v_own, *prefix)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple:  # type: ignore[override]
        q, out, lse, k_own, v_own, *prefix = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = _CPU_BWD(dout, q, k_own, v_own, out, lse, 0.0, True, scale=ctx.scale)
        grads: list = []
        if prefix:
            dq = dq.to(lse.dtype)
            for k, v in zip(prefix[0::2], prefix[1::2]):
                dq_i, dk_i, dv_i = _CPU_BWD(dout, q, k, v, out, lse, 0.0, False, scale=ctx.scale)
                dq += dq_i
                grads += [dk_i, dv_i]
            dq = dq.to(q.dtype)
        return (None, dq, dk, dv, *grads)


# --------------------------------------------------------------- block kernels
# A block is one piece of the keys a query chunk attends to. ``block_forward`` returns
# the block's output and log-sum-exp; ``merge_block`` folds it into a running result;
# ``block_backward`` computes the block's share of dq, dk, dv from the *merged* output
# and log-sum-exp (module docstring). Layouts: ``q (1, heads, sq, d)``,
# ``k/v (1, groups, sk, d)`` (any strides with a contiguous last dim), ``lse (1, heads, sq)``
# in fp32 (fp64 for fp64). ``causal`` = the square own-chunk block (sq == sk).

_QUERY_TILE = 1024  # query rows per tile of the generic kernel: scores are (heads, tile, sk)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _generic_scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, row0: int) -> torch.Tensor:
    """Scores of query rows ``row0 ..`` of ``q (g, r, t, d)`` over ``k (g, sk, d)`` in fp32+."""
    dt = _lse_dtype(q.dtype)
    s = torch.matmul(q.to(dt), k.to(dt)[:, None].transpose(-1, -2)) * scale  # (g, r, t, sk)
    if causal:
        t, sk = s.shape[-2], s.shape[-1]
        rows = torch.arange(row0, row0 + t, device=s.device)[:, None]
        s = s.masked_fill(torch.arange(sk, device=s.device)[None, :] > rows, float("-inf"))
    return s


def _generic_forward(q, k, v, scale, causal):
    """Exact attention by matmuls, tiled over query rows, GQA without repeating K/V."""
    _, heads, sq, d = q.shape
    groups = k.shape[1]
    qg = q[0].reshape(groups, heads // groups, sq, d)
    outs, lses = [], []
    for a in range(0, sq, _QUERY_TILE):
        s = _generic_scores(qg[:, :, a:a + _QUERY_TILE], k[0], scale, causal, a)
        lse = torch.logsumexp(s, dim=-1)
        p = (s - lse[..., None]).exp_()
        outs.append(torch.matmul(p, v[0].to(p.dtype)[:, None]).to(q.dtype))
        lses.append(lse)
    out = torch.cat(outs, dim=2).reshape(1, heads, sq, d)
    return out, torch.cat(lses, dim=2).reshape(1, heads, sq)


def _generic_backward(dout, q, k, v, out, lse, scale, causal):
    _, heads, sq, d = q.shape
    groups = k.shape[1]
    r = heads // groups
    dt = _lse_dtype(q.dtype)
    qg, dog, og = (t[0].reshape(groups, r, sq, d) for t in (q, dout, out))
    lg = lse[0].reshape(groups, r, sq)
    kk, vv = k[0].to(dt), v[0].to(dt)
    dk = torch.zeros(kk.shape, dtype=dt, device=k.device)
    dv = torch.zeros(vv.shape, dtype=dt, device=v.device)
    dqs = []
    for a in range(0, sq, _QUERY_TILE):
        b = min(a + _QUERY_TILE, sq)
        p = (_generic_scores(qg[:, :, a:b], k[0], scale, causal, a) - lg[:, :, a:b, None]).exp_()
        do = dog[:, :, a:b].to(dt)
        dv += torch.matmul(p.transpose(-1, -2), do).sum(dim=1)
        dp = torch.matmul(do, vv[:, None].transpose(-1, -2))
        delta = (do * og[:, :, a:b].to(dt)).sum(dim=-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dqs.append(torch.matmul(ds, kk[:, None]))
        dk += torch.matmul(ds.transpose(-1, -2), qg[:, :, a:b].to(dt)).sum(dim=1)
    dq = torch.cat(dqs, dim=2).reshape(1, heads, sq, d)
    return dq.to(q.dtype), dk[None].to(k.dtype), dv[None].to(v.dtype)


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q`` over one key block: the CPU flash kernel on CPU, exact
    tiled matmuls elsewhere (the CUDA flash kernels do not return a mergeable lse
    through a stable public API)."""
    if q.device.type == "cpu":
        out, lse = _CPU_FWD(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    return _generic_forward(q, k, v, scale, causal)


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, scale: float,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's ``(dq, dk, dv)`` given the merged ``out`` and ``lse``."""
    if q.device.type == "cpu":
        return _CPU_BWD(dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    return _generic_backward(dout, q, k, v, out, lse, scale, causal)


def merge_block(acc: torch.Tensor, lse: torch.Tensor, o_i: torch.Tensor,
                l_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold block output ``o_i`` (log-sum-exp ``l_i``) into ``acc`` (``lse``); ``acc`` is
    kept in the lse's precision."""
    new = torch.logaddexp(lse, l_i)
    acc = acc * (lse - new).exp_()[..., None] + o_i.to(acc.dtype) * (l_i - new).exp_()[..., None]
    return acc, new


def one_key_sequence(
    k: torch.Tensor, v: torch.Tensor, prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    on_prefix: Optional[Callable[..., None]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one K/V sequence a GPU kernel (flash-attn, SDPA) takes.

    ``k``/``v`` that already hold the prefix in front (``sk > sq``: a view of a sample's
    K/V buffer) are returned as they are, never copied. Only separate ``prefix`` blocks
    are concatenated in front, and that copy is what ``on_prefix`` is shown.
    """
    prefix = [(pk, pv) for pk, pv in prefix if pk.shape[1] > 0]
    if not prefix:
        return k, v
    k = torch.cat([pk for pk, _ in prefix] + [k], dim=1)
    v = torch.cat([pv for _, pv in prefix] + [v], dim=1)
    if on_prefix is not None:
        on_prefix(k, v)
    return k, v


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    on_prefix: Optional[Callable[..., None]] = None,
) -> torch.Tensor:
    """Causal attention of ``q`` over ``prefix`` blocks and its own ``k``, ``v``.

    ``q (heads, s, dim)``, ``k/v (groups, s, dim)`` (the chunk's own keys, same length);
    ``prefix``: ``(k_i, v_i)`` blocks of shape ``(groups, P_i, dim)`` that come before
    it. Query i sees every prefix key and own keys ``0..i`` (bottom-right causal over
    the concatenation). Returns ``(heads, s, dim)``. ``on_prefix(*tensors)`` (optional)
    sees the prefix-length tensors kept for backward (for memory accounting).

    ``k/v`` longer than ``q`` (``sk > sq``) mean the same thing with the prefix already
    concatenated in front: their first ``sk - sq`` keys are taken as one prefix block.
    """
    _announce(q)
    prefix = [(pk, pv) for pk, pv in prefix if pk.shape[1] > 0]
    if q.device.type == "cpu":
        extra = k.shape[1] - q.shape[1]
        if extra > 0:  # the CPU kernels merge blocks: split the leading prefix off (views)
            prefix = prefix + [(k[:, :extra], v[:, :extra])]
            k, v = k[:, extra:], v[:, extra:]
        blocks = [t[None] for kv in prefix for t in kv]
        if on_prefix is not None and blocks:
            on_prefix(*blocks)
        return _MergedCPU.apply(scale, q[None], k[None], v[None], *blocks)[0]
    k, v = one_key_sequence(k, v, prefix, on_prefix)
    sq, sk = q.shape[1], k.shape[1]
    if flash_attn_available(q):  # pragma: no cover - needs CUDA + flash-attn
        # (1, s, heads, d) layout; causal=True is bottom-right aligned when sq < sk.
        out = _flash(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                     softmax_scale=scale, causal=True)
        return out[0].transpose(0, 1)
    # SDPA: a CausalBias mask object, not a tensor (torch picks a kernel that applies it).
    mask = causal_lower_right(sq, sk) if sq != sk else None
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=True,
    )
    return out[0]


def host_cu_seqlens(psp: Any) -> tuple[int, ...]:
    """Sample boundaries of a packed row on the host.

    ``row_to_tensors`` sets ``psp.host_cu_seqlens``; for params built elsewhere the
    device tensor is read once and the result cached on the instance (one sync per row,
    not per layer).
    """
    bounds = getattr(psp, "host_cu_seqlens", None)
    if bounds is None:
        bounds = tuple(int(x) for x in psp.cu_seqlens_q.tolist())
        psp.host_cu_seqlens = bounds
    return bounds


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
        return packed_attention(query, key, value, psp, scale)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, psp: Any,
                     scale: float) -> torch.Tensor:
    """Causal attention within each segment of a packed row; returns ``(t, heads * dim)``.

    ``query (t, heads, dim)``, ``key/value (t, groups, dim)``, ``psp`` a megatron
    ``PackedSeqParams`` (``cu_seqlens_q``; ``host_cu_seqlens`` and ``num_padding`` from
    ``row_to_tensors``). Outputs of padding tokens are zeros off flash-attn.
    """
    t, heads, dim = query.shape
    if flash_attn_available(query):  # pragma: no cover - needs CUDA + flash-attn
        _announce(query)
        cu = psp.cu_seqlens_q
        out = _flash_varlen(
            query, key, value, cu, cu, psp.max_seqlen_q, psp.max_seqlen_q,
            softmax_scale=scale, causal=True,
        )
        return out.reshape(t, heads * dim)
    bounds = host_cu_seqlens(psp)
    real_end = t - int(getattr(psp, "num_padding", 0))  # padding: the last segment
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start >= real_end:
            break
        if end > start:
            q = query[start:end].transpose(0, 1)
            k = key[start:end].transpose(0, 1)
            v = value[start:end].transpose(0, 1)
            outs.append(causal_attention(q, k, v, scale).transpose(0, 1))
    done = sum(o.shape[0] for o in outs)
    if done < t:  # padding tail attends to nothing
        outs.append(query.new_zeros(t - done, heads, dim))
    return torch.cat(outs, dim=0).reshape(t, heads * dim)
