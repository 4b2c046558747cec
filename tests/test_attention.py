"""Core attention (chunkflow.model.attention): exact, mask-free, GQA without K/V copies.

In-process, no megatron model: the kernels against an fp64 explicit-softmax reference,
packed rows against each sample alone, and what a dependent chunk keeps for backward.
"""

from __future__ import annotations

import logging
import types
import warnings

import numpy as np
import pytest
import torch

from chunkflow.data.types import PackedRow
from chunkflow.model import attention as attn
from chunkflow.model.attention import attention_backend, causal_attention, packed_attention
from chunkflow.model.batch import row_to_tensors
from chunkflow.scheduling.memory import SavedTensorMeter
from chunkflow.scheduling.state import ChunkContext, StateStore

C, DIM, SCALE = 16, 8, 0.3


def reference(q, k, v, scale):
    """fp64 softmax attention, bottom-right causal; head h reads group h // (heads/groups)."""
    q, k, v = q.double(), k.double(), v.double()
    heads, sq, _ = q.shape
    groups, sk, _ = k.shape
    group_of = torch.arange(heads) // (heads // groups)
    scores = q @ k[group_of].transpose(1, 2) * scale  # (heads, sq, sk)
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    scores = scores.masked_fill(j > i + (sk - sq), float("-inf"))
    return scores.softmax(-1) @ v[group_of]


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)


def test_gpu_kernels_read_the_kv_buffer_without_copying_it():
    """On CUDA without offload a dependent chunk's attention is one kernel call over the
    view K[0:start + C] of its sample's buffer: that view reaches the kernel as it is
    (same storage), not split into prefix and own part and concatenated again per chunk
    and layer. Only separate prefix blocks are joined, and only they are reported."""
    from chunkflow.model.attention import one_key_sequence

    buffer_k, buffer_v = torch.randn(4 * C, 2, DIM), torch.randn(4 * C, 2, DIM)  # (tokens, groups, d)
    k_view, v_view = buffer_k[: 3 * C].transpose(0, 1), buffer_v[: 3 * C].transpose(0, 1)
    seen = []
    k, v = one_key_sequence(k_view, v_view, (), on_prefix=lambda *t: seen.append(t))
    assert k.data_ptr() == buffer_k.data_ptr() and v.data_ptr() == buffer_v.data_ptr()
    assert k.shape == (2, 3 * C, DIM) and not seen
    blocks = [(buffer_k[:C].transpose(0, 1), buffer_v[:C].transpose(0, 1))]
    k, v = one_key_sequence(k_view[:, C:], v_view[:, C:], blocks, on_prefix=lambda *t: seen.append(t))
    assert torch.equal(k, k_view) and torch.equal(v, v_view) and len(seen) == 1


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4)])
@pytest.mark.parametrize("prefix_len", [0, C, 3 * C + 5])
def test_prefix_attention_matches_reference(prefix_len, heads, groups, dtype, tol):
    gen = torch.Generator().manual_seed(prefix_len * 10 + groups)
    q = _rand(heads, C, DIM, dtype=dtype, gen=gen)
    k_own, v_own = (_rand(groups, C, DIM, dtype=dtype, gen=gen) for _ in range(2))
    k_pre, v_pre = (_rand(groups, prefix_len, DIM, dtype=dtype, gen=gen) for _ in range(2))
    # The state store hands the prefix over as per-chunk blocks (the last one odd here).
    cuts = list(range(0, prefix_len, C)) + [prefix_len]
    blocks = [(k_pre[:, a:b], v_pre[:, a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    out = causal_attention(q, k_own, v_own, SCALE, prefix=blocks)
    ref = reference(q, torch.cat([k_pre, k_own], 1), torch.cat([v_pre, v_own], 1), SCALE)
    assert out.shape == (heads, C, DIM) and out.dtype == dtype

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert rel(out, ref) <= tol
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    inputs = [q, k_own, v_own] + ([k_pre, v_pre] if prefix_len else [])
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    want = torch.autograd.grad(ref, inputs, grad)
    for name, g, w in zip(["q", "k_own", "v_own", "k_prefix", "v_prefix"], got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        assert rel(g, w) <= tol, (name, rel(g, w))


def _packed_row(lengths, pad_multiple):
    total = sum(lengths)
    row = PackedRow(
        input_ids=np.zeros(total, np.int64), labels=np.zeros(total, np.int64),
        loss_mask=np.ones(total, np.float32),
        position_ids=np.concatenate([np.arange(n) for n in lengths]),
        cu_seqlens=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
        sample_ids=list(range(len(lengths))),
    )
    return row_to_tensors(row, torch.device("cpu"), pad_multiple=pad_multiple)


def test_packed_rows_stay_within_segments():
    lengths, heads, groups = [5, 1, 7, 3], 4, 2
    rt = _packed_row(lengths, pad_multiple=12)  # 16 real tokens + 8 padding
    psp = rt.packed_seq_params
    assert rt.num_padding == 8 and psp.host_cu_seqlens == (0, 5, 6, 13, 16, 24)
    assert psp.num_padding == 8
    psp.cu_seqlens_q = psp.cu_seqlens_kv = None  # the CPU path must use the host copy only
    t = 16 + 8
    gen = torch.Generator().manual_seed(1)
    q = _rand(t, heads, DIM, dtype=torch.float64, gen=gen)
    k, v = (_rand(t, groups, DIM, dtype=torch.float64, gen=gen) for _ in range(2))
    out = packed_attention(q, k, v, psp, SCALE).view(t, heads, DIM)

    bounds = psp.host_cu_seqlens[:-1]
    for a, b in zip(bounds[:-1], bounds[1:]):  # every real sample equals itself alone
        alone = reference(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), SCALE)
        assert torch.allclose(out[a:b], alone.transpose(0, 1), rtol=0, atol=1e-12), (a, b)
    assert torch.equal(out[16:], torch.zeros(8, heads, DIM, dtype=out.dtype))

    # Perturbing the K/V of sample 2 (tokens 6..12) and of the padding moves only sample 2.
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[6:13] += 1.0
    v2[6:13] -= 2.0
    k2[16:] = 1e3
    out2 = packed_attention(q.detach(), k2, v2, psp, SCALE).view(t, heads, DIM)
    assert torch.equal(out2[:6], out[:6].detach()) and torch.equal(out2[13:], out[13:].detach())
    assert (out2[6:13] - out[6:13]).abs().max() > 1e-3

    # Gradients reach only a token's own sample; padding gets none.
    out[5].sum().backward()  # sample 1 is the single token 5
    assert k.grad[:5].abs().max() == 0 and k.grad[6:].abs().max() == 0
    assert k.grad[5].abs().max() > 0 and q.grad[16:].abs().max() == 0


def _attend_dependent_chunk(num_prefix_chunks, hooks, heads=4, groups=2):
    """Run ChunkContext.attend (forward under ``hooks``, then backward) for chunk
    ``num_prefix_chunks`` of one sample; returns the sample's K/V buffers."""
    gen = torch.Generator().manual_seed(3)
    store = StateStore()
    n = num_prefix_chunks + 1
    kv = store.layer("s", 1, n * C, C, torch.empty(C, groups, DIM))
    for j in range(num_prefix_chunks):
        kv.write(j * C, torch.randn(C, groups, DIM, generator=gen), torch.randn(C, groups, DIM, generator=gen))
    module = types.SimpleNamespace(layer_number=1, _scale=lambda d: d**-0.5)
    ctx = ChunkContext(store, sample="s", chunk=num_prefix_chunks, num_chunks=n)
    query = torch.randn(C, 1, heads, DIM, generator=gen, requires_grad=True)
    key = torch.randn(C, 1, groups, DIM, generator=gen, requires_grad=True)
    value = torch.randn(C, 1, groups, DIM, generator=gen, requires_grad=True)
    with hooks:
        out = ctx.attend(module, query, key, value, None)
    out.sum().backward()
    return kv


def test_dependent_chunk_keeps_no_mask_and_no_prefix():
    heads, groups, num_prefix = 4, 2, 16
    saved = []
    record = torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x)
    kv = _attend_dependent_chunk(num_prefix, record, heads, groups)
    prefix = num_prefix * C
    for t in saved:
        # No (C x prefix) score, probability or mask matrix in any layout, and nothing
        # of prefix length at all: the prefix is read from the store, not saved.
        assert t.numel() < C * prefix, t.shape
        assert t.dim() < 2 or max(t.shape) <= C, t.shape
        assert t.untyped_storage().data_ptr() != kv.k.untyped_storage().data_ptr()
    # The prefix's gradient landed in the store's gradient buffer, in place.
    assert kv.grad_hi == prefix and kv.gk[:prefix].abs().sum() > 0
    # Activations saved by the chunk do not depend on the prefix length.
    meter, meter4 = SavedTensorMeter(), SavedTensorMeter()
    _attend_dependent_chunk(num_prefix, meter, heads, groups)
    _attend_dependent_chunk(4, meter4, heads, groups)
    assert meter.peak_bytes == meter4.peak_bytes > 0
    assert meter.peak_kv_bytes == 0


def test_dependent_chunk_gradients_reach_the_gradient_buffer():
    kv = _attend_dependent_chunk(3, SavedTensorMeter())
    assert all(g[j * C:(j + 1) * C].abs().max() > 0 for j in range(3) for g in (kv.gk, kv.gv))


def test_backend_is_named_and_warns_without_flash_attn(caplog):
    assert attention_backend("cpu", torch.float32) == "torch SDPA flash (CPU) with LSE merge"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where the intended kernel runs
        assert "flash-attn" in attention_backend("cuda", torch.bfloat16, flash_attn=True)
    with pytest.warns(UserWarning, match="flash-attn is not installed"):
        name = attention_backend("cuda", torch.bfloat16, flash_attn=False)
    assert "SDPA" in name
    with pytest.warns(UserWarning, match="does not run torch.float32"):
        attention_backend("cuda", torch.float32, flash_attn=True)
    # Logged once per (device, dtype) when attention first runs.
    attn._ANNOUNCED.discard(("cpu", torch.float64))
    q = torch.randn(2, 4, DIM, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        causal_attention(q, q, q, SCALE)
        causal_attention(q, q, q, SCALE)
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert lines == ["attention backend: torch SDPA flash (CPU) with LSE merge"]
