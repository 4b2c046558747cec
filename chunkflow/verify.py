"""Gradient equivalence on the user's own configuration: ChunkFlow vs the Megatron path.

:func:`verify_equivalence` runs the first global batch of the configured data twice on
the same weights, once through megatron-core's stock schedule over packed micro-batches
(the full-sequence reference) and once through ChunkFlow (chunks, K/V state, the
configured K; the pipeline schedule when ``parallel.pipeline > 1``), and compares:

* the loss (sum of per-token losses / loss tokens of the global batch);
* every parameter's gradient, as ``||g_chunkflow - g_megatron|| / ||g_megatron||``,
  maximised over parameters and ranks (names are those of the full model, so a
  pipeline stage's ``decoder.layers.i`` is the model's layer ``i``).

**Weights.** The model starts from the user's weights when the configuration names
them, the way the trainer starts: ``train.load`` (a chunkflow checkpoint directory; its
model only) or else ``model.hf_dir`` (Hugging Face safetensors); a random
initialisation seeded by ``train.seed`` otherwise. The report says which.

**Non-finite values fail.** A NaN or infinity in either loss, or in any element of any
parameter's gradient on either side, makes the verdict FAIL and is named (side, loss or
parameter). A relative difference cannot be NaN-tolerant by accident: ``nan > worst``
is False, so a running maximum silently keeps an earlier finite value.

**Distributed optimizer.** With ``train.distributed_optimizer=true`` megatron's DDP
*reduce-scatters* each gradient bucket over the data-parallel ranks: after the step a
rank's ``main_grad`` views hold the reduced gradient only in that rank's shard of each
bucket; the rest of the buffer still holds its local, unreduced contribution. Comparing
whole buffers would compare those local parts, which depend on how each schedule spread
the samples over ranks. So after each run the owned shards are all-gathered over the
same group megatron reduced on (:func:`gather_reduced_grads`), which makes every rank's
buffer the full reduced gradient. The reduction itself is the one the user's training
runs (a reduce-scatter), not a substitute all-reduce; the gather only reads its result.
The gathered buffers live on the model's device (``ctx.device``), as collectives need.

Tolerances (:data:`TOLERANCE`): 1e-5 in fp32, 1e-10 in fp64 (the design expects
~1e-6 and ~1e-12); the loss is held to the same relative tolerance.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from chunkflow.config.schema import Config
from chunkflow.parallel import comm
from chunkflow.parallel.distributed import ParallelContext

__all__ = ["EquivalenceReport", "verify_equivalence", "compare_grads", "gather_reduced_grads",
           "TOLERANCE"]

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
    nonfinite: tuple[str, ...] = field(default_factory=tuple)  # e.g. "chunkflow grad <name>"
    weights: str = "random init"

    @property
    def loss_diff(self) -> float:
        return abs(self.loss_megatron - self.loss_chunkflow)

    @property
    def rel_loss_diff(self) -> float:
        return self.loss_diff / max(abs(self.loss_megatron), 1e-30)

    @property
    def ok(self) -> bool:
        if self.nonfinite:
            return False
        values = (self.max_rel_grad_diff, self.loss_megatron, self.loss_chunkflow)
        if not all(math.isfinite(v) for v in values):
            return False
        return self.max_rel_grad_diff <= self.tolerance and self.rel_loss_diff <= self.tolerance


def compare_grads(ref: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]
                  ) -> tuple[float, str, list[str]]:
    """``(max relative difference, its parameter, non-finite findings)`` of ``got``
    (ChunkFlow) against ``ref`` (Megatron), parameter by parameter.

    A parameter whose gradient has a NaN or infinity on either side is listed as
    ``"megatron grad <name>"`` / ``"chunkflow grad <name>"`` and counts as an infinite
    difference, so it is also the worst parameter; a parameter missing from ``got`` is
    listed as ``"chunkflow grad <name> missing"``.
    """
    worst, worst_name, bad = 0.0, "", []
    for name, g_ref in ref.items():
        g = got.get(name)
        if g is None:
            bad.append(f"chunkflow grad {name} missing")
            rel = math.inf
        else:
            r, c = g_ref.detach().double(), g.detach().double()
            finite = True
            for side, t in (("megatron", r), ("chunkflow", c)):
                if not bool(torch.isfinite(t).all()):
                    bad.append(f"{side} grad {name}")
                    finite = False
            rel = float((c - r).norm() / r.norm().clamp_min(1e-30)) if finite else math.inf
            if not math.isfinite(rel):  # finite inputs whose norm overflows
                rel = math.inf
        if rel > worst or not worst_name:
            worst, worst_name = rel, name
    return worst, worst_name, bad


def gather_reduced_grads(ddp: Any) -> None:
    """Make every rank's gradient buffer the full reduced gradient after a step with the
    distributed optimizer (no-op without it); see the module docstring.

    megatron reduce-scatters bucket ``b`` of a bucket group into shard ``r`` of
    ``b.grad_data`` (split in ``intra_distributed_optimizer_instance_size`` equal parts)
    on rank ``r`` of ``intra_distributed_optimizer_instance_group``; this all-gathers
    those shards back into ``b.grad_data`` on the same group.
    """
    if not getattr(ddp, "ddp_config", None) or not ddp.ddp_config.use_distributed_optimizer:
        return
    groups = list(ddp.bucket_groups) + list(getattr(ddp, "expert_parallel_bucket_groups", []))
    for group in groups:
        size = group.intra_distributed_optimizer_instance_size
        if size == 1:
            continue
        rank = group.intra_distributed_optimizer_instance_rank
        for bucket in group.buckets:
            data = bucket.grad_data
            if data.numel() % size:
                raise RuntimeError(f"gradient bucket of {data.numel()} elements does not split "
                                   f"into {size} shards (megatron pads buckets to a multiple)")
            n = data.numel() // size
            mine = data[rank * n:(rank + 1) * n].clone()  # input and output must not alias
            comm.all_gather_into(data, mine, group=group.intra_distributed_optimizer_instance_group)


def _grads(ddp: Any) -> dict[str, torch.Tensor]:
    from chunkflow.model.state import global_name, layer_offset

    module = getattr(ddp, "module", ddp)
    offset = layer_offset(module)
    return {global_name(n, offset): p.main_grad.detach().clone()
            for n, p in module.named_parameters() if p.requires_grad}


def _global_loss(loss_sum: float, num_tokens: int, ctx: ParallelContext) -> float:
    t = torch.tensor([loss_sum], dtype=torch.float64, device=ctx.device)
    if dist.is_initialized():
        # Loss lives on the last stage; sum over data-parallel ranks, then share it.
        comm.all_reduce(t, group=ctx.dp_group)
        if ctx.pp_size > 1:
            comm.broadcast(t, src=dist.get_global_rank(ctx.pp_group, ctx.pp_size - 1), group=ctx.pp_group)
    return float(t[0]) / max(num_tokens, 1)


def _load_weights(cfg: Config, ctx: ParallelContext) -> tuple[Any, str]:
    """``(prepare, description)``: the trainer's choice of starting weights, model only."""
    if cfg.train.load:
        from chunkflow.train.checkpoint import load_checkpoint

        def prepare(model: torch.nn.Module) -> None:
            load_checkpoint(cfg.train.load, model=model, optimizer=None)

        return prepare, f"checkpoint {cfg.train.load} (model only)"
    if cfg.model.hf_dir:
        from chunkflow.model.hf import load_hf_weights

        def prepare(model: torch.nn.Module) -> None:
            load_hf_weights(model, cfg.model.hf_dir, cfg.model, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)

        return prepare, f"Hugging Face {cfg.model.hf_dir}"
    return None, f"random init (train.seed={cfg.train.seed})"


def _all_ranks(ctx: ParallelContext, value: Any) -> list:
    if not dist.is_initialized() or ctx.world_size == 1:
        return [value]
    return comm.all_gather_object(value)


def verify_equivalence(cfg: Config, ctx: ParallelContext, *, full_state: Optional[dict] = None) -> EquivalenceReport:
    """Run one global batch both ways on this process group; see module docstring.

    ``full_state`` (a full TP=1/PP=1 state dict, used by tests) overrides the
    configured weights. Every rank returns the same report.
    """
    from chunkflow.config.validate import require_chunking
    from chunkflow.data.loader import GlobalBatchLoader
    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
    from chunkflow.train.build import build_model_and_ddp, build_schedule, row_pad_multiple
    from chunkflow.train.data_cache import load_run_samples
    from chunkflow.train.megatron_schedule import MegatronSchedule

    require_chunking(cfg, "verify")  # chunk_size/k = auto are resolved by the trainer only
    samples, _ = load_run_samples(cfg, ctx, log=print if ctx.rank == 0 else (lambda _line: None))
    batch = next(iter(GlobalBatchLoader(samples, global_batch_size=cfg.data.global_batch_size,
                                        seed=cfg.data.seed, shuffle=cfg.data.shuffle)))
    prepare, weights = (None, "full_state") if full_state is not None else _load_weights(cfg, ctx)
    ddp, _ = build_model_and_ddp(cfg, ctx, full_state=full_state, prepare=prepare)

    mplan = plan_megatron_step(batch, dp_size=ctx.dp_size, max_seq_len=cfg.data.max_seq_len)
    ddp.zero_grad_buffer()
    ref = MegatronSchedule(ddp, ctx.device, pad_multiple=row_pad_multiple(cfg)).run(mplan.rows_per_rank[ctx.dp_rank])
    gather_reduced_grads(ddp)
    ref_grads = _grads(ddp)

    cplan = plan_chunkflow_step(batch, dp_size=ctx.dp_size, chunk_size=cfg.chunkflow.chunk_size)
    ddp.zero_grad_buffer()
    cf_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, schedule="chunkflow"))
    out = build_schedule(cf_cfg, ddp, ctx).run(cplan.rows_per_rank[ctx.dp_rank])
    gather_reduced_grads(ddp)
    worst, worst_name, bad = compare_grads(ref_grads, _grads(ddp))

    loss_megatron = _global_loss(ref.loss_sum, mplan.num_loss_tokens, ctx)
    loss_chunkflow = _global_loss(out.loss_sum, cplan.num_loss_tokens, ctx)
    for side, value in (("megatron", loss_megatron), ("chunkflow", loss_chunkflow)):
        if not math.isfinite(value):
            bad.append(f"{side} loss")
    # The worst parameter and every non-finite finding of every rank, on every rank.
    per_rank = _all_ranks(ctx, (worst, worst_name, bad))
    worst, worst_name = max(((w, n) for w, n, _ in per_rank), key=lambda x: x[0])
    findings = tuple(dict.fromkeys(b for _, _, bs in per_rank for b in bs))
    return EquivalenceReport(
        max_rel_grad_diff=worst,
        worst_param=worst_name,
        loss_megatron=loss_megatron,
        loss_chunkflow=loss_chunkflow,
        tolerance=TOLERANCE[cfg.model.dtype],
        num_tokens=mplan.num_tokens,
        num_chunks=cplan.num_rows,
        num_dependent_chunks=cplan.num_dependent_rows,
        nonfinite=findings,
        weights=weights,
    )
