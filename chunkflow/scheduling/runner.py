"""Pick the ChunkFlow runner for the run's layout (used by the trainer)."""

from __future__ import annotations

from typing import Any

from chunkflow.config.schema import Config
from chunkflow.parallel.distributed import ParallelContext

__all__ = ["build_chunkflow_schedule"]


def build_chunkflow_schedule(cfg: Config, model: Any, ctx: ParallelContext) -> Any:
    """PP=1: the state-aware chunk executor; PP>1: the state-aware 1F1B pipeline."""
    if ctx.pp_size == 1:
        from chunkflow.scheduling.executor import ChunkFlowSchedule

        return ChunkFlowSchedule(model, ctx.device, cfg.chunkflow.k)
    from chunkflow.pipeline.executor import PipelineChunkFlowSchedule

    return PipelineChunkFlowSchedule(model, ctx, cfg.chunkflow.k)
