"""LoRA (issue 6): frozen base, exact adapter gradients with SeCO, TP=2 == TP=1,
adapter save/load, and merging into the base weights.

Adapters start with B = 0, which would make A's gradient zero; the tests give both A and
B random values first, so every adapter tensor has a gradient worth comparing.
"""

from __future__ import annotations

import pytest

from chunkflow.parallel.spawn import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "train.schedule=chunkflow", "chunkflow.chunk_size=32"]
LENGTHS = [128, 20, 9, 70, 33]  # 4 + 3 + 2 dependent chunks at C = 32, short ones packed


# ----------------------------------------------------------------------------- workers
def _build(overrides, full_state=None, adapters=None):
    """Config, groups, base model (+ ``full_state``), LoRA (+ ``adapters``), DDP wrapper."""
    import torch

    from _workers import TINY
    from chunkflow.config import load_config
    from chunkflow.model.lora import apply_lora, lora_parameters
    from chunkflow.model.state import shard_tensor
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.build import build_model_and_ddp

    cfg = load_config(None, list(TINY) + LORA + list(overrides))
    ctx = init_distributed(cfg)
    torch.manual_seed(0)

    def prepare(model: torch.nn.Module) -> None:
        lo = cfg.lora
        apply_lora(model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets, seed=lo.seed)
        with torch.no_grad():
            if adapters is not None:
                for name, p in lora_parameters(model).items():
                    p.copy_(shard_tensor(adapters[name], p, name, ctx.tp_rank, ctx.tp_size))
            else:  # random A and B (same on every rank: seeded, TP=1 only)
                g = torch.Generator().manual_seed(1)
                for name, p in sorted(lora_parameters(model).items()):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))

    ddp, _ = build_model_and_ddp(cfg, ctx, full_state=full_state, prepare=prepare)
    return cfg, ctx, ddp


def _step(cfg, ctx, ddp, samples, schedule: str, k: int = 1, seed: int = 7) -> dict:
    """One global batch; adapter gradients by full name, and the loss."""
    import dataclasses

    import torch

    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
    from chunkflow.model.lora import lora_parameters
    from chunkflow.train.build import build_schedule

    mode = "seco" if schedule == "seco" else "chunkflow"
    run_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, schedule="megatron" if schedule == "megatron" else "chunkflow"),
        chunkflow=dataclasses.replace(cfg.chunkflow, k=k, mode=mode))
    if schedule == "megatron":
        plan = plan_megatron_step(samples, dp_size=ctx.dp_size, max_seq_len=cfg.data.max_seq_len)
    else:
        plan = plan_chunkflow_step(samples, dp_size=ctx.dp_size, chunk_size=cfg.chunkflow.chunk_size)
    ddp.zero_grad_buffer()
    torch.manual_seed(seed)  # dropout masks: the same stream for every schedule
    res = build_schedule(run_cfg, ddp, ctx).run(plan.rows_per_rank[ctx.dp_rank])
    return {"grads": {n: p.main_grad.detach().clone() for n, p in lora_parameters(ddp).items()},
            "loss": res.loss_sum / plan.num_loss_tokens}


def _rel(a, b) -> float:
    """Relative difference; infinite on a NaN/inf either side (a NaN loses every max())."""
    from _workers import rel_diff

    return rel_diff(a, b)


def _worst(grads, ref) -> float:
    import math

    assert grads.keys() == ref.keys()
    rels = {n: _rel(grads[n], ref[n]) for n in ref}
    bad = [n for n, r in rels.items() if not math.isfinite(r)]
    assert not bad, f"non-finite gradient of {bad}"
    return max(rels.values())


def single_process(rank: int, world: int, dtype: str, tmp: str) -> dict:
    import torch

    from _workers import make_samples
    from chunkflow.model.lora import (adapter_state, load_adapters, lora_parameters, merge_full_state,
                                      merge_lora, save_adapters)
    from chunkflow.train.optim import build_optimizer

    cfg, ctx, ddp = _build([f"model.dtype={dtype}"])
    module = ddp.module
    samples = make_samples(LENGTHS, seed=3)
    out: dict = {"trainable": sorted(n for n, p in module.named_parameters() if p.requires_grad)}
    out["frozen"] = sum(1 for p in module.parameters() if not p.requires_grad)
    out["frozen_main_grad"] = sum(1 for p in module.parameters() if not p.requires_grad and hasattr(p, "main_grad"))
    ref = _step(cfg, ctx, ddp, samples, "megatron")
    seco = _step(cfg, ctx, ddp, samples, "seco")
    out["seco_vs_full"] = _worst(seco["grads"], ref["grads"])
    out["loss_diff"] = abs(seco["loss"] - ref["loss"]) / abs(ref["loss"])
    out["base_grads"] = sum(1 for p in module.parameters() if not p.requires_grad and p.grad is not None)
    out["state"] = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    out["adapters"] = adapter_state(ddp)
    out["ref"] = ref

    # megatron's activation recompute: adapters still get their gradients (the frozen
    # embedding's output is made to require grad; without that they would get none).
    cfg_r, _, ddp_r = _build([f"model.dtype={dtype}", "train.recompute=full"], out["state"], out["adapters"])
    out["recompute_vs_full"] = _worst(_step(cfg_r, ctx, ddp_r, samples, "megatron")["grads"], ref["grads"])
    out["seco_recompute_vs_full"] = _worst(_step(cfg_r, ctx, ddp_r, samples, "seco")["grads"], ref["grads"])

    # Dropout: SeCO's recompute replays the masks of the first pass (K=1 vs K=8).
    cfg_d, _, ddp_d = _build([f"model.dtype={dtype}", "lora.dropout=0.3"], out["state"], out["adapters"])
    a = _step(cfg_d, ctx, ddp_d, samples, "seco")
    b = _step(cfg_d, ctx, ddp_d, samples, "chunkflow", k=8)
    out["dropout_recompute_vs_none"] = _worst(a["grads"], b["grads"])
    out["dropout_vs_no_dropout"] = _worst(a["grads"], seco["grads"])
    # TP=1 references for the tensor-parallel test (same weights, same dropout stream).
    out["tp1"] = {"0.0": {"megatron": ref, "seco": seco},
                  "0.3": {"megatron": _step(cfg_d, ctx, ddp_d, samples, "megatron"), "seco": a}}

    # One optimizer step moves adapters only.
    opt = build_optimizer(ddp, cfg)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _step(cfg, ctx, ddp, samples, "seco")
    opt.step()
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    out["moved"] = sorted(moved)
    out["opt_params"] = sum(p.numel() for g in opt.param_groups for p in g["params"])

    # Adapters alone: save, scramble, load back.
    saved = adapter_state(ddp)
    save_adapters(ddp, f"{tmp}/adapter")
    with torch.no_grad():
        for p in lora_parameters(ddp).values():
            p.zero_()
    out["loaded"] = load_adapters(ddp, f"{tmp}/adapter")
    out["roundtrip"] = max(float((adapter_state(ddp)[n] - t).abs().max()) for n, t in saved.items())

    # Merge: same logits as the adapted model (eval mode: no dropout).
    from chunkflow.model.batch import row_to_tensors
    from chunkflow.data.packing import pack_samples

    (row,) = pack_samples(samples[:3], sum(len(s) for s in samples[:3]))
    b = row_to_tensors(row, ctx.device)
    module.eval()
    with torch.no_grad():
        adapted = module(b.input_ids, b.position_ids, None, packed_seq_params=b.packed_seq_params)
        full_before = {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_" not in n}
        out["merged_layers"] = merge_lora(module)
        merged = module(b.input_ids, b.position_ids, None, packed_seq_params=b.packed_seq_params)
        offline = merge_full_state(full_before, saved, num_attention_heads=cfg.model.num_attention_heads,
                                   num_query_groups=cfg.model.num_query_groups, alpha=cfg.lora.alpha,
                                   rank=cfg.lora.rank)
    out["merge_logits"] = _rel(merged, adapted)
    out["merge_changed"] = _rel(full_before["decoder.layers.0.self_attention.linear_qkv.weight"],
                                module.decoder.layers[0].self_attention.linear_qkv.weight)
    out["merge_full_state"] = max(_rel(offline[n], p) for n, p in module.named_parameters())
    out["after_merge_names"] = sum(".lora_" in n for n, _ in module.named_parameters())
    return out


def tensor_parallel(rank: int, world: int, state: dict, adapters: dict, ref: dict) -> dict:
    """Megatron and SeCO steps at TP=2, with and without dropout, vs the TP=1 ``ref``."""
    from _workers import make_samples
    from chunkflow.model.state import shard_tensor

    samples = make_samples(LENGTHS, seed=3)
    out = {}
    for dropout in ("0.0", "0.3"):
        cfg, ctx, ddp = _build(["parallel.tensor=2", f"lora.dropout={dropout}"], state, adapters)
        params = dict(ddp.module.named_parameters())
        for schedule in ("megatron", "seco"):
            got = _step(cfg, ctx, ddp, samples, schedule)
            want = ref[dropout][schedule]
            shards = {n: shard_tensor(g, params[n], n, ctx.tp_rank, ctx.tp_size) for n, g in want["grads"].items()}
            out[f"{schedule}_dropout{dropout}"] = _worst(got["grads"], shards)
            out[f"{schedule}_dropout{dropout}_loss"] = abs(got["loss"] - want["loss"]) / want["loss"]
    return out


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return run_distributed(single_process, 1, ("fp32", str(tmp_path_factory.mktemp("lora32"))))[0]


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("fp64", 1e-10)])
def test_seco_adapter_grads_equal_full_sequence(dtype, tol, fp32, tmp_path):
    out = fp32 if dtype == "fp32" else run_distributed(single_process, 1, (dtype, str(tmp_path)))[0]
    assert out["seco_vs_full"] < tol, out["seco_vs_full"]
    assert out["recompute_vs_full"] < tol and out["seco_recompute_vs_full"] < tol, out
    assert out["loss_diff"] < tol
    # Recompute replays dropout masks: identical to running without any recompute.
    assert out["dropout_recompute_vs_none"] < tol, out["dropout_recompute_vs_none"]
    assert out["dropout_vs_no_dropout"] > 1e-3  # and the dropout really is on
    assert out["merge_logits"] < tol and out["merge_full_state"] < tol, out
    assert out["merge_changed"] > 1e-4


def test_base_is_frozen_and_only_adapters_train(fp32):
    n_layers, n_targets = 4, 7
    assert len(fp32["trainable"]) == 2 * n_layers * n_targets
    assert all(".lora_A." in n or ".lora_B." in n for n in fp32["trainable"])
    assert fp32["frozen"] > 0 and fp32["frozen_main_grad"] == 0 and fp32["base_grads"] == 0
    assert fp32["moved"] == fp32["trainable"]  # the step moved every adapter and nothing else
    assert fp32["opt_params"] == sum(fp32["adapters"][n].numel() for n in fp32["adapters"])


def test_adapters_save_load_and_merge(fp32):
    assert fp32["loaded"] == len(fp32["adapters"]) and fp32["roundtrip"] == 0.0
    assert fp32["merged_layers"] == 4 * 4 and fp32["after_merge_names"] == 0


def test_tensor_parallel_adapters_match_tp1(fp32):
    per_rank = run_distributed(tensor_parallel, 2, (fp32["state"], fp32["adapters"], fp32["tp1"]))
    for r in per_rank:
        assert all(v < 1e-5 for v in r.values()), r


def trainer_run(rank: int, world: int, out_dir: str) -> dict:
    """configs/seco_cpu.yaml (SpaCO + LoRA) through the Trainer, shrunk to 3 steps."""
    import json
    from pathlib import Path

    import torch

    from chunkflow.config import load_config
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.trainer import Trainer

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/seco_cpu.yaml", [
        "train.steps=3", f"train.output_dir={out_dir}", "data.max_seq_len=1024", "chunkflow.chunk_size=128",
        "data.synthetic.num_samples=64", "data.global_batch_size=4", "model.num_layers=2"])
    ctx = init_distributed(cfg)
    trainer = Trainer(cfg, ctx, log=lambda *_: None)
    base = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters() if ".lora_" not in n}
    summary = trainer.train()
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    unchanged = all(torch.equal(p, base[n]) for n, p in trainer.model.module.named_parameters() if n in base)
    return {"summary": summary, "records": records, "base_unchanged": unchanged,
            "adapter_files": sorted(p.name for p in (Path(out_dir) / "checkpoint_step3/adapter").iterdir())}


def test_trainer_runs_spaco_with_lora(tmp_path):
    out = run_distributed(trainer_run, 1, (str(tmp_path),))[0]
    assert out["base_unchanged"]
    assert out["adapter_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    recs = out["records"]
    assert len(recs) == 3 and all(r["update_ok"] for r in recs)
    assert any(r.get("spaco_chunks", 0) > r.get("spaco_backprop_chunks", 0) for r in recs)  # sparse
