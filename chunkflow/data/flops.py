"""The one FLOP formula of the project: model FLOPs of a GQA + SwiGLU decoder.

Everything that counts work uses these functions: the data-parallel cost model
(:mod:`chunkflow.data.assignment`, a ratio of them), the trainer's ``tflops_per_s`` and
``mfu`` (:mod:`chunkflow.train.metrics`) and the benchmark's recompute FLOPs
(:mod:`chunkflow.bench.measure`). It lives in ``data`` because that is the lowest layer
that needs it.

Convention (Megatron's; torchtitan counts causal attention whole, twice our figure)::

    matmul parameters   N = L * (h*(h + 2*g*d)  +  h*h  +  3*h*f)  +  h*V
                                 q, k, v          o      SwiGLU       LM head
    forward, dense      2 * N                   per token (multiply-add = 2 FLOPs)
    forward, attention  4 * L * h * pairs       QK^T and AV, 2h each per (query, key) pair
    training            3 x forward             backward = 2 x forward

with L layers, hidden h, SwiGLU width f, g key/value groups of head dim d = h / heads
and vocabulary V. ``pairs`` counts causal (query, key) pairs, so causal attention is
half of full attention: a sample of l tokens has l (l + 1) / 2 pairs, and a piece of
l tokens after a K/V prefix of p keys has l p + l (l + 1) / 2 (:func:`causal_pairs`).
The dependent chunks of a sample add up to exactly the pairs of the whole sample, so
chunked and unchunked runs of a batch count the same FLOPs.

These are *model* FLOPs: recompute is not counted (a run that recomputes does more
work for the same model FLOPs). Embedding lookups, norms, RoPE, softmax and biases are
left out (each is O(h) per token, under 1% here).

Qwen2.5-7B (L=28, h=3584, f=18944, 28 heads, g=4, V=152064): N = 7.07e9, so 6N =
42.4 GFLOP per token, plus 6 * 2 * L * h * l ~ 19.7 GFLOP per token of causal attention
for samples of l = 32K tokens (tests/test_metrics.py checks both).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "causal_pairs",
    "matmul_params",
    "attention_flops_per_pair",
    "forward_flops",
    "training_flops",
    "step_pairs",
]


def causal_pairs(length: int, prefix: int = 0) -> int:
    """(query, key) pairs of ``length`` causal queries after ``prefix`` visible keys."""
    return length * prefix + length * (length + 1) // 2


def step_pairs(*, num_tokens: int, sum_sq_seqlens: int) -> int:
    """Causal pairs of whole samples from sum(l) and sum(l^2): sum l (l + 1) / 2."""
    return (int(sum_sq_seqlens) + int(num_tokens)) // 2


def matmul_params(m: Any, *, output_layer: bool = True) -> int:
    """N: weights one token is multiplied by (transformer layers, plus the LM head).

    ``m`` is a :class:`chunkflow.config.schema.ModelConfig` or anything with its fields.
    """
    h, f = m.hidden_size, m.ffn_hidden_size
    d = h // m.num_attention_heads
    per_layer = h * (h + 2 * m.num_query_groups * d) + h * h + 3 * h * f
    return m.num_layers * per_layer + (h * m.vocab_size if output_layer else 0)


def attention_flops_per_pair(m: Any) -> float:
    """Forward FLOPs of one causal (query, key) pair over all layers: QK^T and AV."""
    return 4.0 * m.num_layers * m.hidden_size


def forward_flops(m: Any, *, num_tokens: float, num_pairs: float, output_layer: bool = True) -> float:
    """Forward FLOPs of ``num_tokens`` tokens attending over ``num_pairs`` causal pairs."""
    dense = 2.0 * float(num_tokens) * matmul_params(m, output_layer=output_layer)
    return dense + attention_flops_per_pair(m) * float(num_pairs)


def training_flops(m: Any, *, num_tokens: float, num_pairs: float) -> float:
    """Forward + backward FLOPs (3 x forward) of ``num_tokens`` tokens over ``num_pairs``."""
    return 3.0 * forward_flops(m, num_tokens=num_tokens, num_pairs=num_pairs)
