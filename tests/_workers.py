"""Functions run inside spawned ranks by the model-level tests (see run_distributed).

Every worker builds the model from config overrides, loads the same *full* weights
(made once by a world-size-1 run) into its TP/PP shard, runs a global batch and returns
numbers the test compares. Keeping them here lets one spawn serve several checks.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import numpy as np

warnings.filterwarnings("ignore")

TINY = [
    "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=160",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=256",
    "data.max_seq_len=512", "chunkflow.chunk_size=64",
]


def make_samples(lengths: Sequence[int], seed: int = 0, vocab: int = 256, mask_p: float = 0.2):
    from chunkflow.data.types import Sample

    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        raw = rng.integers(0, vocab, n + 1)
        mask = (rng.random(n) > mask_p).astype(np.float32)
        mask[-1] = 1.0
        out.append(Sample(i, raw[:-1].astype(np.int64), raw[1:].astype(np.int64), mask))
    return out


def setup(overrides: Sequence[str], full_state: Optional[dict] = None):
    """Config, process groups, DDP-wrapped model (with ``full_state`` loaded if given)."""
    from chunkflow.config import load_config
    from chunkflow.model.state import layer_offset
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.build import build_model_and_ddp

    cfg = load_config(None, list(TINY) + list(overrides))
    ctx = init_distributed(cfg)
    ddp, _ = build_model_and_ddp(cfg, ctx, full_state=full_state)
    return cfg, ctx, ddp, layer_offset(ddp)


def run_step(cfg, ctx, ddp, samples, schedule: str, *, k: Optional[int] = None,
             chunk_size: Optional[int] = None, measure: bool = False) -> dict:
    """One global batch through ``schedule``; returns loss, grads (by full name), extras."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
    from chunkflow.model.state import global_name, layer_offset
    from chunkflow.train.build import build_schedule

    offset = layer_offset(ddp)
    c = cfg.chunkflow
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, schedule=schedule),
        chunkflow=dataclasses.replace(c, k=k or c.k, chunk_size=chunk_size or c.chunk_size),
    )
    if schedule == "megatron":
        plan = plan_megatron_step(samples, dp_size=ctx.dp_size, max_seq_len=cfg.data.max_seq_len)
    else:
        plan = plan_chunkflow_step(samples, dp_size=ctx.dp_size, chunk_size=cfg.chunkflow.chunk_size)
    ddp.zero_grad_buffer()
    engine = build_schedule(cfg, ddp, ctx)
    if measure:
        engine.measure_memory = True
    res = engine.run(plan.rows_per_rank[ctx.dp_rank])
    t = torch.tensor([res.loss_sum], dtype=torch.float64)
    dist.all_reduce(t, group=ctx.dp_group)
    grads = {global_name(n, offset): p.main_grad.detach().clone()
             for n, p in ddp.module.named_parameters()}
    return {
        "loss": float(t[0]) / plan.num_loss_tokens,
        "grads": grads,
        "extra": dict(getattr(res, "extra", {}) or {}),
        "is_last": ctx.is_last_stage,
        "actions": getattr(engine, "last_actions", None),
        "busy_s": float(res.busy_s), "wall_s": float(res.wall_s), "chunks": len(plan.rows_per_rank[ctx.dp_rank]),
    }


def full_reference(rank: int, world: int, overrides: Sequence[str], samples, seed: int = 0) -> dict:
    """World size 1: the full weights and the Megatron path's loss and gradients."""
    import torch

    torch.manual_seed(seed)
    cfg, ctx, ddp, _ = setup(list(overrides) + ["parallel.tensor=1", "parallel.pipeline=1"])
    state = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    out = run_step(cfg, ctx, ddp, samples, "megatron")
    return {"state": state, "loss": out["loss"], "grads": out["grads"]}


def rel_diff(a, b) -> float:
    """``||a - b|| / ||b||``; infinite when either side has a NaN or infinity (a NaN
    would lose every later ``max()`` comparison and vanish from a running maximum)."""
    import math

    import torch

    a, b = a.double(), b.double()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return math.inf
    rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return rel if math.isfinite(rel) else math.inf


def compare_sharded(grads: dict, ref: dict, ddp, ctx, offset: int) -> float:
    """Max relative difference of this rank's gradient shards against full references.
    A non-finite gradient (either side) raises, naming the parameter."""
    import math

    from chunkflow.model.state import global_name, shard_tensor

    worst = 0.0
    for n, p in ddp.module.named_parameters():
        g = global_name(n, offset)
        want = shard_tensor(ref[g], p, n, ctx.tp_rank, ctx.tp_size)
        rel = rel_diff(grads[g], want)
        if not math.isfinite(rel):
            raise AssertionError(f"non-finite gradient of {g} (rank {ctx.rank})")
        worst = max(worst, rel)
    return worst


def reference_then_check(rank: int, world: int, ref_overrides, overrides, samples, runs) -> dict:
    """World size 1, one process for both halves: :func:`full_reference` (with
    ``ref_overrides``), process groups torn down, then :func:`layout_check` (with
    ``overrides``) against it. Saves a process start per comparison."""
    from chunkflow.parallel.distributed import destroy_distributed

    assert world == 1, "the reference is a world-size-1 run"
    ref = full_reference(rank, world, ref_overrides, samples)
    destroy_distributed()
    return {"ref": ref, "results": layout_check(rank, world, overrides, samples, ref, runs)}


def layout_check(rank: int, world: int, overrides, samples, ref: dict, runs, slow_loss_s: float = 0.0) -> list:
    """Run several (schedule, k, chunk_size) on one layout against the full reference.

    ``slow_loss_s``: the last run again with the last stage's loss made that much slower
    per chunk; its record carries each rank's busy and wall seconds (idle accounting).
    """
    cfg, ctx, ddp, offset = setup(overrides, ref["state"])
    results = []
    for schedule, k, c in runs:
        out = run_step(cfg, ctx, ddp, samples, schedule, k=k, chunk_size=c)
        worst = compare_sharded(out["grads"], ref["grads"], ddp, ctx, offset)
        loss = out["loss"] if ctx.is_last_stage else None
        results.append({"run": (schedule, k, c), "grad": worst, "loss": loss})
    if slow_loss_s > 0:
        import time

        import chunkflow.pipeline.executor as ex

        original = ex.masked_loss

        def slow(mask, out):
            time.sleep(slow_loss_s)
            return original(mask, out)

        ex.masked_loss = slow
        try:
            schedule, k, c = runs[-1]
            out = run_step(cfg, ctx, ddp, samples, schedule, k=k, chunk_size=c)
        finally:
            ex.masked_loss = original
        results.append({"run": "slow loss", "stage": ctx.pp_rank, "busy_s": out["busy_s"],
                        "wall_s": out["wall_s"], "chunks": out["chunks"], "grad": 0.0, "loss": None})
    return results


def packing_logits(rank: int, world: int, lengths: Sequence[int]) -> dict:
    """Logits of samples packed in one THD row vs each sample alone, and with the
    neighbour's tokens changed (which must not move a sample's logits)."""
    import torch

    from chunkflow.data.packing import pack_samples
    from chunkflow.model.batch import row_to_tensors

    torch.manual_seed(0)
    cfg, ctx, ddp, _ = setup([])
    model = ddp.module
    samples = make_samples(lengths, seed=5)
    (row,) = pack_samples(samples, sum(lengths))
    with torch.no_grad():
        b = row_to_tensors(row, ctx.device)
        packed = model(b.input_ids, b.position_ids, None, packed_seq_params=b.packed_seq_params)[0]
        alone = {}
        for s in samples:
            ids = torch.from_numpy(s.input_ids)[None]
            pos = torch.arange(len(s))[None]
            alone[s.sample_id] = model(ids, pos, None)[0]
        changed = b.input_ids.clone()
        first = int(row.cu_seqlens[1])
        changed[0, first:] = (changed[0, first:] + 7) % cfg.model.vocab_size
        perturbed = model(changed, b.position_ids, None, packed_seq_params=b.packed_seq_params)[0]
    out = {"max_diff": 0.0, "first_sample_moved": float((perturbed[:first] - packed[:first]).abs().max())}
    for i, sid in enumerate(row.sample_ids):
        a, e = int(row.cu_seqlens[i]), int(row.cu_seqlens[i + 1])
        out["max_diff"] = max(out["max_diff"], float((packed[a:e] - alone[sid]).abs().max()))
    out["rest_moved"] = float((perturbed[first:] - packed[first:]).abs().max())
    return out


def memory_profile(rank: int, world: int, chunk_size: int, k: int, multiples: Sequence[int]) -> list:
    """Saved-for-backward bytes of both schedules as the longest sample grows."""
    import torch

    from chunkflow.scheduling.memory import SavedTensorMeter

    torch.manual_seed(0)
    cfg, ctx, ddp, _ = setup(["data.max_seq_len=4096", f"chunkflow.chunk_size={chunk_size}"])
    rows = []
    for m in multiples:
        samples = make_samples([m * chunk_size, 40, 17, 9], seed=m)
        with SavedTensorMeter(exclude=ddp.module) as meter:
            run_step(cfg, ctx, ddp, samples, "megatron")
        cf = run_step(cfg, ctx, ddp, samples, "chunkflow", k=k, measure=True)
        rows.append({
            "multiple": m,
            "megatron_bytes": meter.peak_bytes + meter.peak_kv_bytes,
            "chunkflow_activation_bytes": cf["extra"]["saved_activation_peak_bytes"],
            "chunkflow_saved_kv_bytes": cf["extra"]["saved_kv_peak_bytes"],
            "chunkflow_state_bytes": cf["extra"]["kv_state_peak_bytes"],
        })
    return rows


def forward_only_loss(rank: int, world: int, overrides, samples, ref: dict) -> Optional[list]:
    """Evaluation through StateAwarePipelineSchedule(forward_only=True), Megatron-style,
    without and with ``offload_kv``: the two losses on the last stage, else None."""
    from functools import partial

    from chunkflow.data.plan import plan_chunkflow_step
    from chunkflow.pipeline.executor import StateAwarePipelineSchedule
    from chunkflow.model.batch import row_to_tensors
    from chunkflow.train.megatron_schedule import masked_loss

    cfg, ctx, ddp, _ = setup(overrides, ref["state"])
    plan = plan_chunkflow_step(samples, dp_size=1, chunk_size=cfg.chunkflow.chunk_size)
    rows = plan.rows_per_rank[0]

    def forward_step(data_iterator, model):
        row = next(data_iterator)["row"]
        b = row_to_tensors(row, ctx.device, packed=not row.dependent)
        out = model(b.input_ids, b.position_ids, None, labels=b.labels, packed_seq_params=b.packed_seq_params)
        return out, partial(masked_loss, b.loss_mask)

    losses = []
    for offload in (False, True):  # the K/V state on the device, then in the host pool
        fb = StateAwarePipelineSchedule(k=1, pp_group=ctx.pp_group, offload_kv=offload)
        reports = fb(forward_step_func=forward_step, data_iterator=iter([{"row": r} for r in rows]),
                     model=[ddp], num_microbatches=len(rows), seq_length=cfg.chunkflow.chunk_size,
                     micro_batch_size=1, forward_only=True)
        losses.append(sum(float(r["lm loss"][0]) for r in reports) / plan.num_loss_tokens)
    return losses if ctx.is_last_stage else None


# ------------------------------------------------------------- sequence parallelism
def _token_loss_rows(samples):
    """A packed row and a lone sample (``packed=False``), both of odd length."""
    from chunkflow.data.packing import pack_samples

    (row,) = pack_samples(samples[:2], sum(len(s) for s in samples[:2]))
    (alone,) = pack_samples(samples[2:3], len(samples[2]))
    return [(row, True), (alone, False)]


def _per_token_losses(ddp, ctx, samples, pad: int) -> list:
    """Per-token losses of ``_token_loss_rows`` through ``token_losses`` (the schedules'
    path) and through GPTModel's own loss (``labels=``), with shapes."""
    import torch

    from chunkflow.model.batch import row_to_tensors
    from chunkflow.model.loss import token_losses

    out = []
    with torch.no_grad():
        for row, packed in _token_loss_rows(samples):
            b = row_to_tensors(row, ctx.device, packed=packed, pad_multiple=pad)
            ours = token_losses(ddp, b)
            megatron = ddp(b.input_ids, b.position_ids, None, labels=b.labels,
                           packed_seq_params=b.packed_seq_params)
            out.append({"len": len(row), "padded": b.input_ids.shape[1],
                        "ours": ours.detach().clone(), "megatron": megatron.detach().clone()})
    return out


def _padding_run(cfg, ctx, ddp, samples, schedule: str, pad: int) -> dict:
    """One step with rows padded to ``pad``: loss sum, loss tokens, gradients."""
    import dataclasses

    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
    from chunkflow.model.state import global_name, layer_offset
    from chunkflow.train.build import build_schedule

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, schedule=schedule),
                              data=dataclasses.replace(cfg.data, pad_to_multiple=pad))
    if schedule == "megatron":
        plan = plan_megatron_step(samples, dp_size=1, max_seq_len=cfg.data.max_seq_len)
    else:
        plan = plan_chunkflow_step(samples, dp_size=1, chunk_size=cfg.chunkflow.chunk_size)
    ddp.zero_grad_buffer()
    res = build_schedule(cfg, ddp, ctx).run(plan.rows_per_rank[0])
    offset = layer_offset(ddp)
    return {"loss_sum": res.loss_sum, "num_loss_tokens": res.num_loss_tokens,
            "plan_loss_tokens": plan.num_loss_tokens,
            "grads": {global_name(n, offset): p.main_grad.detach().clone()
                      for n, p in ddp.module.named_parameters()}}


def sp_reference(rank: int, world: int, overrides: Sequence[str], samples, pads: Sequence[int]) -> dict:
    """World size 1: ``full_reference`` plus per-token losses of two odd-length rows, and
    each schedule's loss, loss-token count and gradients with rows padded to each of ``pads``."""
    import torch

    torch.manual_seed(0)
    cfg, ctx, ddp, _ = setup(list(overrides) + ["parallel.tensor=1", "parallel.pipeline=1"])
    state = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    out = run_step(cfg, ctx, ddp, samples, "megatron")
    padding = {(s, pad): _padding_run(cfg, ctx, ddp, samples, s, pad)
               for s in ("megatron", "chunkflow") for pad in pads}
    return {"state": state, "loss": out["loss"], "grads": out["grads"], "padding": padding,
            "token_losses": _per_token_losses(ddp, ctx, samples, pad=1)}


def sp_layout_check(rank: int, world: int, overrides, samples, ref: dict, runs) -> dict:
    """``layout_check`` on a sequence-parallel layout, plus: which parameters carry
    ``sequence_parallel`` and (one pipeline stage) the per-token losses' shapes and values."""
    from chunkflow.train.build import row_pad_multiple

    cfg, ctx, ddp, offset = setup(overrides, ref["state"])
    results = []
    for schedule, k, c in runs:
        out = run_step(cfg, ctx, ddp, samples, schedule, k=k, chunk_size=c)
        worst = compare_sharded(out["grads"], ref["grads"], ddp, ctx, offset)
        results.append({"run": (schedule, k, c), "grad": worst,
                        "loss": out["loss"] if ctx.is_last_stage else None})
    marked = sorted(n for n, p in ddp.module.named_parameters() if getattr(p, "sequence_parallel", False))
    tokens = None
    if ctx.pp_size == 1:
        tokens = _per_token_losses(ddp, ctx, samples, pad=row_pad_multiple(cfg))
    return {"results": results, "sp_params": marked, "token_losses": tokens, "tp_rank": ctx.tp_rank}


def write_pid_and_wait(rank: int, world: int, pid_dir: str) -> None:
    """Write this rank's pid to ``pid_dir/<rank>`` and wait (a rank whose parent dies)."""
    import os
    import time

    with open(os.path.join(pid_dir, str(rank)), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def offload_reference(rank: int, world: int, overrides: Sequence[str], samples, runs) -> dict:
    """World size 1: the Megatron reference, then ChunkFlow with ``chunkflow.offload_kv``
    for each (k, chunk_size) in ``runs`` on the same weights (one spawn, several checks)."""
    import dataclasses

    import torch

    torch.manual_seed(0)
    cfg, ctx, ddp, offset = setup(list(overrides) + ["parallel.tensor=1", "parallel.pipeline=1"])
    state = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    ref = run_step(cfg, ctx, ddp, samples, "megatron")
    off = dataclasses.replace(cfg, chunkflow=dataclasses.replace(cfg.chunkflow, offload_kv=True))
    results = []
    for k, c in runs:
        out = run_step(off, ctx, ddp, samples, "chunkflow", k=k, chunk_size=c)
        results.append({"run": (k, c), "grad": compare_sharded(out["grads"], ref["grads"], ddp, ctx, offset),
                        "loss": out["loss"], "extra": out["extra"]})
    return {"state": state, "loss": ref["loss"], "grads": ref["grads"], "results": results}
