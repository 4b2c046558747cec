"""The ``bench`` config section: what each side runs, checked before any process group.

    megatron_candidates(cfg)   recompute settings Megatron tries, cheapest first
    chunkflow_points(cfg)      (C, K) pairs ChunkFlow runs: the configured one, or the sweep
"""

from __future__ import annotations

from chunkflow.config.loader import ConfigError
from chunkflow.config.schema import RECOMPUTE, Config

__all__ = ["validate_bench", "megatron_candidates", "chunkflow_points", "MIB"]

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
    """``auto``: none, selective, full (the first that fits is used); else the forced one."""
    r = cfg.bench.megatron_recompute
    return list(RECOMPUTE) if r == "auto" else [r]


def chunkflow_points(cfg: Config) -> list[tuple[int, int]]:
    """(C, K) to run: ``chunkflow.chunk_size/k``, or the sweep grid (C ascending, then K)."""
    if not cfg.bench.sweep:
        return [(cfg.chunkflow.chunk_size, cfg.chunkflow.k)]
    m = cfg.data.max_seq_len
    sizes = cfg.bench.sweep_chunk_sizes or [max(1, m // 8), max(1, m // 4), max(1, m // 2)]
    return [(c, k) for c in sorted(set(sizes)) for k in sorted(set(cfg.bench.sweep_k))]
