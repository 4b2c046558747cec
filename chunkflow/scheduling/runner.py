"""Pick the ChunkFlow runner for the run's layout (used by the trainer)."""

from __future__ import annotations

from typing import Any

from chunkflow.config.schema import Config
from chunkflow.parallel.distributed import ParallelContext

__all__ = ["build_chunkflow_schedule"]


def build_chunkflow_schedule(cfg: Config, model: Any, ctx: ParallelContext) -> Any:
    """PP=1: the state-aware chunk executor; PP>1: the state-aware 1F1B pipeline.

    ``chunkflow.mode``: ``seco`` is the PP=1 executor with K = 1; ``spaco`` adds the
    sampler of ``chunkflow.spaco`` (seeded by ``train.seed``, keyed by step and sample).
    """
    mode = cfg.chunkflow.mode
    if mode in ("seco", "spaco"):
        if ctx.pp_size != 1 or cfg.chunkflow.k != 1:
            raise ValueError(f"chunkflow.mode={mode} needs parallel.pipeline=1 and chunkflow.k=1 "
                             f"(got {ctx.pp_size} and {cfg.chunkflow.k})")
        from chunkflow.scheduling.executor import ChunkFlowSchedule
        from chunkflow.scheduling.spaco import SpaCOSampler

        sampler = None
        if mode == "spaco":
            s = cfg.chunkflow.spaco
            sampler = SpaCOSampler(s.budget, s.sampler, s.max_factor, seed=cfg.train.seed)
        return ChunkFlowSchedule(model, ctx.device, 1, sampler=sampler)
    if ctx.pp_size == 1:
        from chunkflow.scheduling.executor import ChunkFlowSchedule

        return ChunkFlowSchedule(model, ctx.device, cfg.chunkflow.k)
    from chunkflow.pipeline.executor import PipelineChunkFlowSchedule

    return PipelineChunkFlowSchedule(model, ctx, cfg.chunkflow.k)
