"""megatron-core's DDP wrapper, optimizer (Adam) and LR schedule (warm-up + cosine)."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from chunkflow.config.schema import Config

__all__ = ["wrap_ddp", "build_optimizer", "build_scheduler"]


def wrap_ddp(model: torch.nn.Module, tc: TransformerConfig, cfg: Config) -> DistributedDataParallel:
    """megatron's DDP. ``train.overlap_grad_reduce``: each bucket's all-reduce (or
    reduce-scatter, distributed optimizer) starts asynchronously as soon as the step's
    last backward has produced its gradients, overlapping the rest of that backward; both
    schedules run every earlier backward under ``config.no_sync_func``. Bucket size:
    ``train.grad_bucket_params`` parameters (0 = megatron's default, max(4e7, 1e6 x DP))."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.model.dtype in ("bf16", "fp16"),
        overlap_grad_reduce=cfg.train.overlap_grad_reduce,
        bucket_size=cfg.train.grad_bucket_params or None,
        use_distributed_optimizer=cfg.train.distributed_optimizer,
    )
    return DistributedDataParallel(config=tc, ddp_config=ddp_config, module=model)


def build_optimizer(model: DistributedDataParallel, cfg: Config) -> Any:
    t, m = cfg.train, cfg.model
    oc = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.grad_clip,
        bf16=m.dtype == "bf16",
        fp16=m.dtype == "fp16",
        initial_loss_scale=t.initial_loss_scale,
        params_dtype=model.module.config.params_dtype if hasattr(model, "module") else torch.float32,
        use_distributed_optimizer=t.distributed_optimizer,
    )
    return get_megatron_optimizer(oc, [model])


def build_scheduler(optimizer: Any, cfg: Config) -> OptimizerParamScheduler:
    t = cfg.train
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(t.steps, warmup + 1),
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.steps, 1),
        wd_incr_style="constant",
    )
