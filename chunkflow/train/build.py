"""Build what a run trains: the model stage wrapped in megatron's DDP, and its schedule.

Every entry point (trainer, verification, benchmark, profiling scripts, tests) builds its
model through :func:`build_model_and_ddp`, so the order that megatron needs is written
once: build the stage on the run's device, load or adapt its weights, *then* wrap it in
DDP (which sizes its gradient buffers from the parameters that require grad), then point
the config at megatron's gradient finalisation and the wrapper's ``no_sync``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.transformer.transformer_config import TransformerConfig

from chunkflow.config.schema import Config
from chunkflow.model.provider import build_model, build_transformer_config
from chunkflow.model.state import load_full_state_dict
from chunkflow.parallel.distributed import ParallelContext
from chunkflow.train.optim import wrap_ddp

__all__ = ["build_model_and_ddp", "build_schedule", "row_pad_multiple"]


def build_model_and_ddp(
    cfg: Config, ctx: ParallelContext, *, full_state: Optional[dict] = None,
    prepare: Optional[Callable[[torch.nn.Module], None]] = None,
) -> tuple[DistributedDataParallel, TransformerConfig]:
    """This rank's model stage in megatron's DDP, and its ``TransformerConfig``.

    ``full_state``: a full (TP=1, PP=1 named) state dict whose shard this rank loads.
    ``prepare(model)``: runs before DDP wraps the model (e.g. loading HF weights, adding
    LoRA adapters).
    """
    tc = build_transformer_config(cfg)
    model = build_model(cfg, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage,
                        transformer_config=tc)
    model.to(ctx.device)
    if full_state is not None:
        load_full_state_dict(model, full_state, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
    if prepare is not None:
        prepare(model)
    ddp = wrap_ddp(model, tc, cfg)
    tc.finalize_model_grads_func = finalize_model_grads
    tc.no_sync_func = ddp.no_sync
    return ddp, tc


def row_pad_multiple(cfg: Config) -> int:
    """Rows are padded to a multiple of this: ``data.pad_to_multiple``, times the tensor
    size under sequence parallelism (megatron splits each row across tensor ranks)."""
    tp = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1
    return math.lcm(max(1, cfg.data.pad_to_multiple), tp)


def build_schedule(cfg: Config, model: Any, ctx: ParallelContext) -> Any:
    """The forward/backward schedule selected by ``train.schedule``: ``run(rows) -> StepResult``.

    ``megatron``: megatron-core's stock schedule over packed rows. ``chunkflow``: the
    state-aware executor for any layout; ``chunkflow.mode=seco`` is it with K = 1, and
    ``spaco`` adds the sampler of ``chunkflow.spaco`` (seeded by ``train.seed``, keyed by
    step and sample).
    """
    pad = row_pad_multiple(cfg)
    if cfg.train.schedule == "megatron":
        from chunkflow.train.megatron_schedule import MegatronSchedule

        return MegatronSchedule(model, ctx.device, pad_multiple=pad)
    from chunkflow.pipeline.executor import ChunkFlowSchedule

    sampler = None
    if cfg.chunkflow.mode == "spaco":
        from chunkflow.scheduling.spaco import SpaCOSampler

        s = cfg.chunkflow.spaco
        sampler = SpaCOSampler(s.budget, s.sampler, s.max_factor, seed=cfg.train.seed)
    k = 1 if cfg.chunkflow.mode in ("seco", "spaco") else cfg.chunkflow.k
    return ChunkFlowSchedule(model, ctx, k, sampler=sampler, pad_multiple=pad,
                             offload_kv=cfg.chunkflow.offload_kv)
