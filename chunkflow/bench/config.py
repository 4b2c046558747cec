"""The ``bench`` config section: what each side runs, checked before any process group.

    megatron_candidates(cfg)   recompute settings Megatron tries, in order of growing memory:
                               full (= block:L), block:L-1 .. block:1, selective, none
    recompute_setting(name)    "block:2" -> ("block", 2): train.recompute, recompute_num_layers
    chunkflow_points(cfg)      (C, K) pairs ChunkFlow runs: the configured one, or the sweep
"""

from __future__ import annotations

from chunkflow.config.loader import ConfigError
from chunkflow.config.schema import RECOMPUTE, Config

__all__ = ["validate_bench", "megatron_candidates", "recompute_setting", "chunkflow_points", "batch_roles", "MIB"]

MIB = 2**20


def validate_bench(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the ``bench.*`` key and the fix."""
    b, m = cfg.bench, cfg.data.max_seq_len
    if b.megatron_recompute not in ("auto",) + RECOMPUTE:
        raise ConfigError(f"bench.megatron_recompute={b.megatron_recompute!r} is not one of "
                          f"auto, {', '.join(RECOMPUTE)}")
    if b.warmup_steps < 1:
        raise ConfigError(f"bench.warmup_steps={b.warmup_steps}: use >= 1 (the warm-up batches also "
                          "probe each side's memory before timing)")
    if b.timed_steps < 1:
        raise ConfigError(f"bench.timed_steps={b.timed_steps}: use >= 1")
    if b.sweep and b.selection_steps < 1:
        raise ConfigError(f"bench.selection_steps={b.selection_steps}: a sweep chooses its (C, K) on "
                          "batches of its own, apart from the timed ones it is scored on; use >= 1")
    for key in ("memory_budget_mb", "peak_mem_budget_mb"):
        if getattr(b, key) < 0:
            raise ConfigError(f"bench.{key}={getattr(b, key)}: use a size in MiB, or 0 for no budget")
    bad = [c for c in b.sweep_chunk_sizes if not 0 < c <= m]
    if bad:
        raise ConfigError(f"bench.sweep_chunk_sizes has {bad}: chunk sizes must be in [1, data.max_seq_len={m}]")
    if any(k < 1 for k in b.sweep_k) or (b.sweep and not b.sweep_k):
        raise ConfigError(f"bench.sweep_k={list(b.sweep_k)}: use one or more integers >= 1")
    if cfg.chunkflow.mode != "chunkflow":
        raise ConfigError(f"chunkflow.mode={cfg.chunkflow.mode}: the benchmark runs the exact "
                          "ChunkFlow schedule; set chunkflow.mode=chunkflow")


def megatron_candidates(cfg: Config) -> list[str]:
    """``auto``: every setting, in order of growing memory (the benchmark probes them and
    runs the one with the fewest recompute FLOPs that fits; chunkflow/bench/probe.py says
    why this order); else the forced one.

    ``block:n`` recomputes the first n of the L layers of each pipeline stage; block:L is
    ``full`` (every layer, one checkpoint each) and is listed once, as ``full``.
    """
    r = cfg.bench.megatron_recompute
    per_stage = cfg.model.num_layers // cfg.parallel.pipeline
    if r == "block":
        return [f"block:{cfg.train.recompute_num_layers}"]
    if r != "auto":
        return [r]
    return ["full"] + [f"block:{n}" for n in range(per_stage - 1, 0, -1)] + ["selective", "none"]


def recompute_setting(name: str) -> tuple[str, int]:
    """A candidate's ``(train.recompute, train.recompute_num_layers)``."""
    if name.startswith("block:"):
        return "block", int(name.split(":", 1)[1])
    return name, 1


def chunkflow_points(cfg: Config) -> list[tuple[int, int]]:
    """(C, K) to run: ``chunkflow.chunk_size/k``, or the sweep grid (C ascending, then K)."""
    if not cfg.bench.sweep:
        return [(cfg.chunkflow.chunk_size, cfg.chunkflow.k)]
    m = cfg.data.max_seq_len
    sizes = cfg.bench.sweep_chunk_sizes or [max(1, m // 8), max(1, m // 4), max(1, m // 2)]
    return [(c, k) for c in sorted(set(sizes)) for k in sorted(set(cfg.bench.sweep_k))]


def batch_roles(cfg: Config) -> tuple[list[int], list[int], list[int]]:
    """Indices of the global batches used to warm up, to select a sweep's (C, K), and to
    time the comparison: consecutive, disjoint ranges (selection is empty without a sweep)::

        warmup_steps=1, selection_steps=2, timed_steps=8, sweep -> [0], [1, 2], [3 .. 10]
    """
    b = cfg.bench
    num_select = b.selection_steps if b.sweep else 0
    warmup = list(range(b.warmup_steps))
    selection = list(range(b.warmup_steps, b.warmup_steps + num_select))
    timed = list(range(b.warmup_steps + num_select, b.warmup_steps + num_select + b.timed_steps))
    return warmup, selection, timed
