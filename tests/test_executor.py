"""The one ChunkFlow executor: what used to differ between its one-stage and pipeline
copies now holds for every pipeline size (issue 13).

* fp16 without a pipeline applies the optimizer's loss scale (megatron's scaler would
  otherwise unscale unscaled gradients and training would stop learning);
* with LoRA dropout and PP = 2, a recomputed chunk replays its first forward's random
  state: gradients equal those of K large enough that nothing is recomputed;
* SpaCO runs with PP = 2 and back-propagates exactly what PP = 1 does.
"""

from __future__ import annotations

import pytest

from _workers import TINY, make_samples
from chunkflow.parallel.spawn import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "train.schedule=chunkflow"]


# ----------------------------------------------------------------------------- workers
def _flat_grads(ddp):
    import torch

    return torch.cat([p.main_grad.detach().flatten().double() for p in ddp.module.parameters()
                      if p.requires_grad])


def fp16_worker(rank: int, world: int, out_dir: str) -> dict:
    """fp16 vs fp32 gradients of one chunked step on the same weights (PP = 1), then a
    short fp16 training run on a fixed batch."""
    import torch

    from chunkflow.config import load_config
    from chunkflow.data.plan import plan_chunkflow_step
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.build import build_model_and_ddp, build_schedule
    from chunkflow.train.trainer import Trainer

    base = list(TINY) + ["train.schedule=chunkflow", "chunkflow.k=1", "parallel.pipeline=1"]
    cfg32 = load_config(None, base)
    ctx = init_distributed(cfg32)
    ddp32, _ = build_model_and_ddp(cfg32, ctx)
    state = {n: p.detach().clone() for n, p in ddp32.module.named_parameters()}
    cfg16 = load_config(None, base + ["model.dtype=fp16"])
    ddp16, tc16 = build_model_and_ddp(cfg16, ctx, full_state=state)
    scale = 1024.0
    tc16.grad_scale_func = lambda loss: loss * scale  # what the fp16 optimizer installs
    rows = plan_chunkflow_step(make_samples([200, 64, 30, 12], seed=3), dp_size=1,
                               chunk_size=cfg32.chunkflow.chunk_size).rows_per_rank[0]
    grads = {}
    for name, cfg, ddp in (("fp32", cfg32, ddp32), ("fp16", cfg16, ddp16)):
        ddp.zero_grad_buffer()
        build_schedule(cfg, ddp, ctx).run(rows)
        grads[name] = _flat_grads(ddp)
    g32, g16 = grads["fp32"], grads["fp16"]
    out = {"ratio": float(g16.norm() / g32.norm()), "rel": float((g16 / scale - g32).norm() / g32.norm()),
           "finite": bool(torch.isfinite(g16).all())}

    # Training: the same 4 samples every step (num_samples == global batch), lr high enough
    # to move; with the loss scale missing, megatron's optimizer would divide unscaled
    # gradients by it and the loss would not move.
    train = load_config(None, base + [
        "model.dtype=fp16", "data.global_batch_size=4", "data.synthetic.num_samples=4",
        "data.max_seq_len=256", "train.steps=8", "train.lr=1e-2", "train.min_lr=1e-2",
        "train.warmup_steps=0", "train.initial_loss_scale=64", "train.save_at_end=false",
        f"train.output_dir={out_dir}"])
    summary = Trainer(train, ctx, log=lambda *a, **k: None).train()
    out.update(first=summary["first_loss"], final=summary["final_loss"])
    return out


def lora_dropout_worker(rank: int, world: int) -> dict:
    """PP = 2, LoRA dropout 0.2, fp64: one long sample (4 chunks) with K = 1 (chunks 0-2
    recomputed) and K = 4 (nothing recomputed), from the same random state."""
    import dataclasses

    import torch

    from chunkflow.config import load_config
    from chunkflow.data.plan import plan_chunkflow_step
    from chunkflow.model.lora import apply_lora, lora_parameters
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.build import build_model_and_ddp, build_schedule

    cfg = load_config(None, list(TINY) + LORA + [
        "parallel.pipeline=2", "lora.dropout=0.2", "model.dtype=fp64", "chunkflow.chunk_size=32"])
    ctx = init_distributed(cfg)

    def prepare(model: torch.nn.Module) -> None:
        lo = cfg.lora
        apply_lora(model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets, seed=lo.seed)
        g = torch.Generator().manual_seed(1 + ctx.pp_rank)
        with torch.no_grad():  # non-zero B, so every adapter's gradient depends on the masks
            for _, p in sorted(lora_parameters(model).items()):
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))

    ddp, _ = build_model_and_ddp(cfg, ctx, prepare=prepare)
    rows = plan_chunkflow_step(make_samples([128], seed=5), dp_size=1, chunk_size=32).rows_per_rank[0]
    grads, recomputes = {}, {}
    for k in (1, 4, 1):
        run_cfg = dataclasses.replace(cfg, chunkflow=dataclasses.replace(cfg.chunkflow, k=k))
        schedule = build_schedule(run_cfg, ddp, ctx)
        ddp.zero_grad_buffer()
        torch.manual_seed(123)
        schedule.run(rows)
        grads.setdefault(k, []).append(_flat_grads(ddp))
        recomputes[k] = sum(type(a).__name__ == "Recompute" for a in schedule.last_actions)
    g1, g4, g1_again = grads[1][0], grads[4][0], grads[1][1]
    torch.manual_seed(999)  # control: other masks give other gradients
    ddp.zero_grad_buffer()
    build_schedule(dataclasses.replace(cfg, chunkflow=dataclasses.replace(cfg.chunkflow, k=4)), ddp, ctx).run(rows)
    other = _flat_grads(ddp)
    return {"rel": float((g1 - g4).norm() / g4.norm()), "repeat": float((g1 - g1_again).norm() / g4.norm()),
            "control": float((other - g4).norm() / g4.norm()), "recomputes": recomputes[1]}


def spaco_worker(rank: int, world: int, pipeline: int, state: dict = None) -> dict:
    """SpaCO (fixed seed) gradients by full parameter name, on a PP = ``pipeline`` layout."""
    import torch

    from _workers import setup
    from chunkflow.data.plan import plan_chunkflow_step
    from chunkflow.model.state import global_name
    from chunkflow.train.build import build_schedule

    cfg, ctx, ddp, offset = setup([f"parallel.pipeline={pipeline}", "model.dtype=fp64",
                                   "train.schedule=chunkflow", "chunkflow.mode=spaco",
                                   "chunkflow.spaco.budget=0.5"], state)
    samples = make_samples([256, 200, 30, 12, 100], seed=9)
    rows = plan_chunkflow_step(samples, dp_size=1, chunk_size=cfg.chunkflow.chunk_size).rows_per_rank[0]
    schedule = build_schedule(cfg, ddp, ctx)
    schedule.step = 3
    ddp.zero_grad_buffer()
    res = schedule.run(rows)
    full = {global_name(n, offset): p.detach().clone() for n, p in ddp.module.named_parameters()}
    return {"grads": {global_name(n, offset): p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()},
            "state": full, "selection": {s: sorted(v.chunks) for s, v in schedule.last_selection.items()},
            "loss_sum": res.loss_sum, "backprop": res.extra.get("spaco_backprop_chunks"),
            "finite": all(bool(torch.isfinite(p.main_grad).all()) for p in ddp.module.parameters())}


# ----------------------------------------------------------------------------- tests
def test_fp16_without_pipeline_scales_the_loss_and_learns(tmp_path):
    out = run_distributed(fp16_worker, 1, (str(tmp_path / "run"),), timeout_s=600)[0]
    assert out["finite"]
    # The fp16 gradients carry the loss scale (1 without it: the bug this guards against) ...
    assert out["ratio"] == pytest.approx(1024.0, rel=2e-2)
    # ... and, unscaled, equal fp32's to fp16 precision.
    assert out["rel"] < 2e-2, out
    assert out["final"] < out["first"] - 0.05, out


def test_lora_dropout_recompute_replays_masks_with_a_pipeline():
    per_rank = run_distributed(lora_dropout_worker, 2, (), timeout_s=600)
    for r in per_rank:
        assert r["recomputes"] == 3  # chunks 0..2 are rebuilt on every stage with K = 1
        assert r["repeat"] < 1e-12  # same seed, same run: deterministic
        assert r["control"] > 1e-3  # the masks matter: other draws change the gradient
        assert r["rel"] < 1e-10, r  # recomputed chunks saw their first forward's masks


def test_spaco_with_a_pipeline_matches_one_stage():
    one = run_distributed(spaco_worker, 1, (1,), timeout_s=600)[0]
    two = run_distributed(spaco_worker, 2, (2, one["state"]), timeout_s=600)
    assert all(r["finite"] for r in two) and one["finite"]
    assert 0 < one["backprop"] < 8  # of 4 + 4 dependent chunks: a strict subset was drawn
    for r in two:
        assert r["selection"] == one["selection"]  # every stage draws PP = 1's chunks
        for name, g in r["grads"].items():
            ref = one["grads"][name].double()
            rel = float((g.double() - ref).norm() / ref.norm().clamp_min(1e-30))
            assert rel < 1e-10, (name, rel)
    last = [r for r in two if r["loss_sum"]][0]
    assert last["loss_sum"] == pytest.approx(one["loss_sum"], rel=1e-12)
