"""Attention parity: every kernel path chunkflow uses against an fp64 reference.

The reference is written out in full here, independent of the kernels it judges::

    group(h) = h // (heads / groups)                       GQA: query head -> K/V group
    s[h]     = q[h] @ k[group(h)]^T * dim^-0.5             (sq, sk)
    allowed  = causal, aligned bottom-right:  key j visible to query i iff j <= sk - sq + i
               (packed rows: and only inside the query's own cu_seqlens segment)
    out[h]   = softmax(s[h] masked to allowed) @ v[group(h)]

in float64, on inputs already rounded to the dtype under test (so only the kernel's
arithmetic is measured), with gradients of q, k and v from autograd. Cases::

    prefix_gqa      dependent chunk: 61 queries, 190 prefix keys + own 61, 8 heads / 2 groups
    causal_mha      ordinary causal (sq == sk), 4 heads / 4 groups
    packed_varlen   SDPAAttention, THD, samples of odd lengths 7 13 1 29 51, GQA
    packed_padding  SDPAAttention, THD, samples 31 17 + a padding segment of 16 (as
                    row_to_tensors pads), no gradient flowing into the padding rows
    sbhd_batch2     SDPAAttention, (s, b, h, d) layout with two sequences

Error per tensor = ||x - ref|| / ||ref|| (out, dq, dk, dv), compared with a tolerance per
dtype (:data:`TOLERANCE`). A wrong mask (e.g. top-left aligned causal) or GQA mapping
gives errors of order 0.1-1, far above every tolerance.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["TOLERANCE", "DTYPES", "CASES", "reference_attention", "run_parity", "forced_sdpa",
           "kernel_paths"]

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative (norm) error allowed per dtype; bf16/fp16 match verify.TOLERANCE's spirit.
TOLERANCE = {"fp64": 1e-10, "fp32": 1e-5, "fp16": 5e-3, "bf16": 2e-2}
HEAD_DIM = 128  # Qwen2.5-7B's head dim (3584 / 28)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """``q (heads, sq, d)``, ``k/v (groups, sk, d)``, ``allowed (sq, sk)`` bool -> (heads, sq, d)."""
    heads, groups = q.shape[0], k.shape[0]
    group_of_head = torch.arange(heads, device=q.device) // (heads // groups)
    scores = torch.einsum("hqd,hkd->hqk", q, k[group_of_head]) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,hkd->hqd", probs, v[group_of_head])


def bottom_right(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= (sk - sq) + i


def packed_mask(lengths: list[int], device: torch.device) -> torch.Tensor:
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))
    t = int(sum(lengths))
    return (seg[:, None] == seg[None, :]) & bottom_right(t, t, device)


@dataclass
class CaseData:
    q: torch.Tensor  # (heads, sq, d) in the dtype under test
    k: torch.Tensor  # (groups, sk, d)
    v: torch.Tensor
    grad_out: torch.Tensor  # (heads, sq, d); zero on padding rows
    allowed: torch.Tensor  # (sq, sk)


def _case_tensors(heads: int, groups: int, sq: int, sk: int, dtype: torch.dtype,
                  device: torch.device, seed: int, allowed: torch.Tensor,
                  pad_rows: int = 0) -> CaseData:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    grad_out = rnd(heads, sq, HEAD_DIM)
    if pad_rows:
        grad_out[:, sq - pad_rows:] = 0
    return CaseData(rnd(heads, sq, HEAD_DIM), rnd(groups, sk, HEAD_DIM), rnd(groups, sk, HEAD_DIM),
                    grad_out, allowed)


def _sdpa_module(heads: int, groups: int) -> Any:
    """A real ``SDPAAttention`` (megatron's parallel state must be initialised)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from chunkflow.model.attention import SDPAAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                            num_query_groups=groups, kv_channels=HEAD_DIM, use_cpu_initialization=True,
                            attention_dropout=0.0, hidden_dropout=0.0)
    return SDPAAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


# Each case builds its tensors and a kernel call ``fn(q, k, v) -> (heads, sq, d)``.
CaseFn = Callable[[torch.dtype, torch.device], tuple[CaseData, Callable[..., torch.Tensor]]]


def _prefix_gqa(dtype: torch.dtype, device: torch.device):
    from chunkflow.model import attention

    heads, groups, sq, prefix = 8, 2, 61, 190
    data = _case_tensors(heads, groups, sq, prefix + sq, dtype, device, 1,
                         bottom_right(sq, prefix + sq, device))
    return data, lambda q, k, v: attention.causal_attention(q, k, v, HEAD_DIM**-0.5)


def _causal_mha(dtype: torch.dtype, device: torch.device):
    from chunkflow.model import attention

    heads, s = 4, 77
    data = _case_tensors(heads, heads, s, s, dtype, device, 2, bottom_right(s, s, device))
    return data, lambda q, k, v: attention.causal_attention(q, k, v, HEAD_DIM**-0.5)


def _packed(lengths: list[int], pad: int, seed: int):
    def build(dtype: torch.dtype, device: torch.device):
        from megatron.core.packed_seq_params import PackedSeqParams

        heads, groups = 8, 2
        segments = lengths + ([pad] if pad else [])
        t = sum(segments)
        data = _case_tensors(heads, groups, t, t, dtype, device, seed, packed_mask(segments, device),
                             pad_rows=pad)
        cu = torch.tensor([0] + [sum(segments[:i + 1]) for i in range(len(segments))],
                          dtype=torch.int32, device=device)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                              max_seqlen_q=max(segments), max_seqlen_kv=max(segments))
        module = _sdpa_module(heads, groups)

        def fn(q, k, v):  # (h, t, d) -> megatron's THD (t, h, d) and back
            thd = [x.transpose(0, 1).contiguous() for x in (q, k, v)]  # numerics, not strides
            out = module(*thd, None, packed_seq_params=psp)
            return out.reshape(t, heads, HEAD_DIM).transpose(0, 1)
        return data, fn
    return build


def _sbhd_batch2(dtype: torch.dtype, device: torch.device):
    heads, groups, s = 8, 2, 45
    a = _case_tensors(heads, groups, s, s, dtype, device, 5, bottom_right(s, s, device))
    b = _case_tensors(heads, groups, s, s, dtype, device, 6, bottom_right(s, s, device))
    # Two sequences side by side in the reference = block-diagonal causal over 2s tokens.
    allowed = packed_mask([s, s], device)
    data = CaseData(torch.cat([a.q, b.q], 1), torch.cat([a.k, b.k], 1), torch.cat([a.v, b.v], 1),
                    torch.cat([a.grad_out, b.grad_out], 1), allowed)
    module = _sdpa_module(heads, groups)

    def fn(q, k, v):  # (h, 2s, d) -> (s, b=2, h, d) and back
        def sbhd(x):
            return torch.stack([x[:, :s], x[:, s:]], dim=0).permute(2, 0, 1, 3)
        out = module(sbhd(q), sbhd(k), sbhd(v), None).reshape(s, 2, heads, HEAD_DIM)
        return torch.cat([out[:, 0], out[:, 1]], dim=0).transpose(0, 1)
    return data, fn


CASES: dict[str, CaseFn] = {
    "prefix_gqa": _prefix_gqa,
    "causal_mha": _causal_mha,
    "packed_varlen": _packed([7, 13, 1, 29, 51], 0, 3),
    "packed_padding": _packed([31, 17], 16, 4),
    "sbhd_batch2": _sbhd_batch2,
}


def _rel(x: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    if x is None:
        return math.inf
    x = x.double()
    if not torch.isfinite(x).all():
        return math.inf
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def run_case(name: str, dtype_name: str, device: torch.device) -> dict[str, float]:
    """Relative errors of out, dq, dk, dv for one case and dtype."""
    dtype = DTYPES[dtype_name]
    data, fn = CASES[name](dtype, device)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (data.q, data.k, data.v))
    out = fn(q, k, v)
    out.backward(data.grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (data.q, data.k, data.v))
    ref = reference_attention(q64, k64, v64, data.allowed, HEAD_DIM**-0.5)
    ref.backward(data.grad_out.double())
    return {"out": _rel(out.detach(), ref.detach()), "dq": _rel(q.grad, q64.grad),
            "dk": _rel(k.grad, k64.grad), "dv": _rel(v.grad, v64.grad)}


@contextlib.contextmanager
def forced_sdpa() -> Iterator[None]:
    """Make chunkflow's attention take its torch SDPA path even where flash-attn is used."""
    from chunkflow.model import attention

    saved = attention.flash_attn_available
    attention.flash_attn_available = lambda t: False
    try:
        yield
    finally:
        attention.flash_attn_available = saved


def kernel_paths(device: torch.device, dtype_name: str) -> list[tuple[str, Any]]:
    """(label, context manager factory) for every path chunkflow can take for this dtype."""
    from chunkflow.gpu_check.environment import attention_backend_name
    from chunkflow.model import attention

    default = attention_backend_name(device, DTYPES[dtype_name])
    paths: list[tuple[str, Any]] = [(default, contextlib.nullcontext)]
    if "sdpa" not in default.lower() and hasattr(attention, "flash_attn_available"):
        paths.append(("sdpa", forced_sdpa))
    return paths


def run_parity(device: torch.device, dtype_name: str, context: Any = contextlib.nullcontext,
               cases: Optional[list[str]] = None) -> dict[str, Any]:
    """Every case on one path and dtype: errors, the worst one, and failures in words."""
    tol = TOLERANCE[dtype_name]
    errors: dict[str, Any] = {}
    failures: list[str] = []
    worst, worst_at = 0.0, ""
    for name in cases or list(CASES):
        try:
            with context():
                errs = run_case(name, dtype_name, device)
        except Exception as e:  # noqa: BLE001 - one case's error is a failure of that case
            last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            errors[name] = {"error": f"{type(e).__name__}: {last}"}
            failures.append(f"{name}: {type(e).__name__}: {last}")
            continue
        errors[name] = errs
        for tensor, err in errs.items():
            if err > worst or not worst_at:
                worst, worst_at = err, f"{name} {tensor}"
            if not err <= tol:
                failures.append(f"{name} {tensor} rel {err:.2e} > tol {tol:.0e}")
    return {"errors": errors, "worst": worst, "worst_at": worst_at, "tolerance": tol,
            "failures": failures}
