"""Gradient equivalence on the user's own configuration: ChunkFlow vs the Megatron path.

:func:`verify_equivalence` runs the first global batch of the configured data twice on
the same weights, once through megatron-core's stock schedule over packed micro-batches
(the full-sequence reference) and once through ChunkFlow (chunks, K/V state, the
configured K; the pipeline schedule when ``parallel.pipeline > 1``), and compares:

* the loss (sum of per-token losses / loss tokens of the global batch);
* every parameter's gradient, as ``||g_chunkflow - g_megatron|| / ||g_megatron||``,
  maximised over parameters and ranks.

Tolerances: 1e-5 in fp32, 1e-10 in fp64 (design.md §2.2 expects ~1e-6 and ~1e-12).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from chunkflow.config.schema import Config
from chunkflow.parallel import comm
from chunkflow.parallel.distributed import ParallelContext

__all__ = ["EquivalenceReport", "verify_equivalence", "TOLERANCE"]

TOLERANCE = {"fp32": 1e-5, "fp64": 1e-10, "bf16": 2e-2, "fp16": 2e-2}


@dataclass
class EquivalenceReport:
    max_rel_grad_diff: float
    worst_param: str
    loss_megatron: float
    loss_chunkflow: float
    tolerance: float
    num_tokens: int
    num_chunks: int
    num_dependent_chunks: int

    @property
    def loss_diff(self) -> float:
        return abs(self.loss_megatron - self.loss_chunkflow)

    @property
    def ok(self) -> bool:
        rel_loss = self.loss_diff / max(abs(self.loss_megatron), 1e-30)
        return self.max_rel_grad_diff <= self.tolerance and rel_loss <= self.tolerance


def _grads(model: Any) -> dict[str, torch.Tensor]:
    module = getattr(model, "module", model)
    return {n: p.main_grad.detach().clone() for n, p in module.named_parameters()}


def _global_loss(loss_sum: float, num_tokens: int, ctx: ParallelContext) -> float:
    t = torch.tensor([loss_sum], dtype=torch.float64)
    if dist.is_initialized():
        # Loss lives on the last stage; sum over data-parallel ranks, then share it.
        comm.all_reduce(t, group=ctx.dp_group)
        if ctx.pp_size > 1:
            comm.broadcast(t, src=dist.get_global_rank(ctx.pp_group, ctx.pp_size - 1), group=ctx.pp_group)
    return float(t[0]) / max(num_tokens, 1)


def verify_equivalence(cfg: Config, ctx: ParallelContext, *, full_state: Optional[dict] = None) -> EquivalenceReport:
    """Run one global batch both ways on this process group; see module docstring."""
    from chunkflow.data.dataset import load_samples
    from chunkflow.data.loader import GlobalBatchLoader
    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
    from chunkflow.train.build import build_model_and_ddp, build_schedule, row_pad_multiple
    from chunkflow.train.megatron_schedule import MegatronSchedule

    samples, _ = load_samples(cfg.data, vocab_size=cfg.model.vocab_size)
    batch = next(iter(GlobalBatchLoader(samples, global_batch_size=cfg.data.global_batch_size,
                                        seed=cfg.data.seed, shuffle=cfg.data.shuffle)))
    ddp, _ = build_model_and_ddp(cfg, ctx, full_state=full_state)

    mplan = plan_megatron_step(batch, dp_size=ctx.dp_size, max_seq_len=cfg.data.max_seq_len)
    ddp.zero_grad_buffer()
    ref = MegatronSchedule(ddp, ctx.device, pad_multiple=row_pad_multiple(cfg)).run(mplan.rows_per_rank[ctx.dp_rank])
    ref_grads = _grads(ddp)

    cplan = plan_chunkflow_step(batch, dp_size=ctx.dp_size, chunk_size=cfg.chunkflow.chunk_size)
    ddp.zero_grad_buffer()
    cf_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, schedule="chunkflow"))
    out = build_schedule(cf_cfg, ddp, ctx).run(cplan.rows_per_rank[ctx.dp_rank])
    cf_grads = _grads(ddp)

    worst, worst_name = 0.0, ""
    for name, g_ref in ref_grads.items():
        denom = g_ref.double().norm().clamp_min(1e-30)
        rel = float((cf_grads[name].double() - g_ref.double()).norm() / denom)
        if rel > worst or not worst_name:
            worst, worst_name = rel, name
    t = torch.tensor([worst], dtype=torch.float64)
    if dist.is_initialized():
        comm.all_reduce(t, op="max")
    return EquivalenceReport(
        max_rel_grad_diff=float(t[0]),
        worst_param=worst_name,
        loss_megatron=_global_loss(ref.loss_sum, mplan.num_loss_tokens, ctx),
        loss_chunkflow=_global_loss(out.loss_sum, cplan.num_loss_tokens, ctx),
        tolerance=TOLERANCE[cfg.model.dtype],
        num_tokens=mplan.num_tokens,
        num_chunks=cplan.num_rows,
        num_dependent_chunks=cplan.num_dependent_rows,
    )
