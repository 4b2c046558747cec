"""Estimated cost of a row, and balancing work across data-parallel ranks (docs/chunkflow.md).

Cost model
----------
One number per row, in *token-equivalents* (the forward work of the linear layers for one
token is 1)::

    cost(row) = linear * num_tokens + attention * num_causal_pairs

    num_causal_pairs = sum over the row's pieces of  l * p + l * (l + 1) / 2

where a piece of ``l`` tokens starts at position ``p`` of its sample (``p = 0`` for a
whole sample, ``p = jC`` for dependent chunk j): each query sees the ``p`` prefix keys
plus the causal part of its own piece. So a packed row of samples L_1..L_m costs
~ sum L_i^2 / 2 attention pairs and dependent chunk j costs ~ C^2 (j + 1/2), and the
dependent chunks of a sample add up to exactly what the whole sample would cost.

The attention weight is the ratio of the forward FLOPs of one pair to those of one
token in :mod:`chunkflow.data.flops` (the project's one FLOP formula; backward is ~2x
both, so it cancels)::

    attention = 4 L h / (2 N)        N = matmul parameters per token (with the LM head)

:meth:`CostModel.from_dims` computes it; :meth:`CostModel.for_hidden_size` uses a
plain GPT block (24 h^2 per token) giving ``1 / (6 h)``. The default is a 4096-wide model.

Assignment
----------
Units are what must stay on one rank: for ChunkFlow all dependent chunks of one sample,
or one standalone chunk; for the Megatron baseline one whole sample. Greedy
longest-processing-time (LPT): units by decreasing cost (ties by sample id), each to the
currently cheapest rank (ties: lowest rank). Round-robin (unit i -> rank i mod dp) is kept
as the baseline to compare with. Both are deterministic.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Sequence

from chunkflow.data.flops import attention_flops_per_pair, causal_pairs, matmul_params
from chunkflow.data.types import PackedRow, Sample

__all__ = [
    "CostModel",
    "BALANCE",
    "causal_pairs",
    "estimate_cost",
    "sample_cost",
    "lpt_assign",
    "round_robin_assign",
    "chunk_units",
    "assign_chunks",
    "assign_samples",
]

BALANCE = ("lpt", "round_robin")


@dataclass(frozen=True)
class CostModel:
    """``cost = linear * tokens + attention * causal_pairs`` (module docstring)."""

    linear: float = 1.0  # cost of one token through the linear layers
    attention: float = 1.0 / (6 * 4096)  # cost of one (query, key) pair, same unit

    @classmethod
    def for_hidden_size(cls, hidden_size: int) -> "CostModel":
        """A plain GPT block (MLP 4h, MHA, no LM head): attention = 4h / 24h^2 = 1 / (6h)."""
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        return cls(linear=1.0, attention=1.0 / (6 * hidden_size))

    @classmethod
    def from_dims(
        cls,
        *,
        hidden_size: int,
        ffn_hidden_size: int,
        num_attention_heads: int,
        num_query_groups: int,
        num_layers: int = 1,
        vocab_size: int = 0,
    ) -> "CostModel":
        """Forward-FLOP ratio for a GQA + SwiGLU decoder (:mod:`chunkflow.data.flops`)."""
        dims = SimpleNamespace(hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size,
                               num_attention_heads=num_attention_heads,
                               num_query_groups=num_query_groups, num_layers=num_layers,
                               vocab_size=vocab_size)
        per_token = 2.0 * matmul_params(dims)
        return cls(linear=1.0, attention=attention_flops_per_pair(dims) / per_token)

    @classmethod
    def from_model_config(cls, model: Any) -> "CostModel":
        """From a :class:`chunkflow.config.schema.ModelConfig` (or anything with its fields)."""
        return cls.from_dims(
            hidden_size=model.hidden_size,
            ffn_hidden_size=model.ffn_hidden_size,
            num_attention_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups,
            num_layers=model.num_layers,
            vocab_size=model.vocab_size,
        )

    def __call__(self, num_tokens: float, num_pairs: float) -> float:
        return self.linear * num_tokens + self.attention * num_pairs


def estimate_cost(row: PackedRow, *, cost_model: Optional[CostModel] = None) -> float:
    """Estimated cost of running ``row`` (0 for an empty row).

    The prefix of each piece is read from the row itself (its first position id), so a
    full dependent chunk j of size C costs ``linear * C + attention * (C^2 (j + 1/2) + C/2)``
    without being told C.
    """
    model = cost_model or CostModel()
    if len(row) == 0:
        return 0.0
    cu = row.cu_seqlens.tolist()
    prefixes = row.position_ids[row.cu_seqlens[:-1]].tolist()
    pairs = sum(causal_pairs(end - start, p) for start, end, p in zip(cu, cu[1:], prefixes))
    return model(len(row), pairs)


def sample_cost(length: int, cost_model: Optional[CostModel] = None) -> float:
    """Cost of one whole sample of ``length`` tokens, however it is later chunked."""
    return (cost_model or CostModel())(length, causal_pairs(length))


def lpt_assign(
    costs: Sequence[float], num_ranks: int, keys: Optional[Sequence[int]] = None
) -> list[int]:
    """Greedy LPT: the rank of each item; items by decreasing cost (ties by key, index)
    each go to the currently least-loaded rank (ties: lowest rank)."""
    _check_ranks(num_ranks)
    keys = range(len(costs)) if keys is None else keys
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], keys[i], i))
    loads = [(0.0, r) for r in range(num_ranks)]  # a heap of (load, rank)
    ranks = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(loads)
        ranks[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return ranks


def round_robin_assign(num_items: int, num_ranks: int) -> list[int]:
    """Item i goes to rank i mod ``num_ranks`` (the baseline LPT is compared with)."""
    _check_ranks(num_ranks)
    return [i % num_ranks for i in range(num_items)]


def _check_ranks(num_ranks: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"the data-parallel size must be >= 1, got {num_ranks}")


def _assign(costs: list[float], keys: list[int], num_ranks: int, balance: str) -> list[int]:
    if balance == "lpt":
        return lpt_assign(costs, num_ranks, keys)
    if balance == "round_robin":
        return round_robin_assign(len(costs), num_ranks)
    raise ValueError(f"balance={balance!r} is not one of {', '.join(BALANCE)}")


def chunk_units(chunks: Sequence[PackedRow]) -> list[list[int]]:
    """Group chunk indices into units that must share a rank.

    All dependent chunks of one sample form one unit (in the order they appear, which
    ``build_chunks`` makes ascending j); every other row is a unit of its own. Units are
    listed in order of their first chunk.
    """
    units: list[list[int]] = []
    unit_of_sample: dict[int, int] = {}
    for i, row in enumerate(chunks):
        if row.dependent:
            sid = row.sample_ids[0]
            if sid not in unit_of_sample:
                unit_of_sample[sid] = len(units)
                units.append([])
            units[unit_of_sample[sid]].append(i)
        else:
            units.append([i])
    return units


def assign_chunks(
    chunks: Sequence[PackedRow],
    num_ranks: int,
    *,
    cost_model: Optional[CostModel] = None,
    balance: str = "lpt",
) -> list[list[PackedRow]]:
    """Distribute ChunkFlow chunks over data-parallel ranks, a sample's chunks together.

    Returns ``rows[rank]``; on each rank units keep their order in ``chunks`` and a long
    sample's dependent chunks stay consecutive in ascending chunk order.
    """
    units = chunk_units(chunks)
    costs = [sum(estimate_cost(chunks[i], cost_model=cost_model) for i in u) for u in units]
    keys = [chunks[u[0]].sample_ids[0] if chunks[u[0]].sample_ids else -1 for u in units]
    ranks = _assign(costs, keys, num_ranks, balance)
    out: list[list[PackedRow]] = [[] for _ in range(num_ranks)]
    for unit, r in zip(units, ranks):
        out[r].extend(chunks[i] for i in unit)
    return out


def assign_samples(
    samples: Sequence[Sample],
    num_ranks: int,
    *,
    cost_model: Optional[CostModel] = None,
    balance: str = "lpt",
) -> list[list[Sample]]:
    """Distribute whole samples over ranks by :func:`sample_cost` (Megatron baseline).

    Returns ``samples[rank]`` in batch order.
    """
    costs = [sample_cost(len(s), cost_model) for s in samples]
    ranks = _assign(costs, [s.sample_id for s in samples], num_ranks, balance)
    out: list[list[Sample]] = [[] for _ in range(num_ranks)]
    for s, r in zip(samples, ranks):
        out[r].append(s)
    return out
