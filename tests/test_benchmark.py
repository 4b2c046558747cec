"""scripts/benchmark.py on a tiny model: report structure, memory-budget decisions, and the
loss-equality check (including that it fails when one side's math differs). Never timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chunkflow.bench import check_losses, chunkflow_points, megatron_candidates, validate_bench
from chunkflow.bench.breakdown import PARTS
from chunkflow.bench.config import batch_roles, recompute_setting
from chunkflow.config import ConfigError, load_config
from chunkflow.parallel.spawn import run_distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=160", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.vocab_size=256", "data.max_seq_len=256", "data.global_batch_size=6",
    "data.synthetic.num_samples=64", "data.synthetic.long_fraction=0.2", "data.synthetic.max_len_fraction=0.1",
    "data.synthetic.short_fraction=0.6", "data.synthetic.medium_fraction=0.2",
    "chunkflow.chunk_size=64", "chunkflow.k=1", "bench.warmup_steps=1", "bench.timed_steps=2",
]
SIDE_KEYS = {"tokens_per_s", "tflops_per_s", "peak_mem_bytes", "peak_activation_bytes", "bubble_fraction",
             "recompute_overhead", "tokens_per_s_spread", "fits_budget", "losses", "grad_norms", "step_time_s"}


# ---------------------------------------------------------------- pure parts
def test_config_choices_and_errors():
    cfg = load_config(None, TINY)
    assert megatron_candidates(cfg) == ["full", "block:1", "selective", "none"]  # 2 layers, PP=1
    four = load_config(None, TINY + ["model.num_layers=8", "parallel.pipeline=2"])  # 4 layers per stage
    assert megatron_candidates(four) == ["full", "block:3", "block:2", "block:1", "selective", "none"]
    assert recompute_setting("block:3") == ("block", 3) and recompute_setting("full") == ("full", 1)
    forced = load_config(None, TINY + ["bench.megatron_recompute=block", "train.recompute_num_layers=2"])
    assert megatron_candidates(forced) == ["block:2"]
    assert chunkflow_points(cfg) == [(64, 1)]
    cfg = load_config(None, TINY + ["bench.sweep=true", "bench.sweep_k=2,1", "bench.megatron_recompute=full"])
    assert megatron_candidates(cfg) == ["full"]
    assert chunkflow_points(cfg) == [(32, 1), (32, 2), (64, 1), (64, 2), (128, 1), (128, 2)]
    for bad, message in [("bench.warmup_steps=0", "bench.warmup_steps=0"),
                         ("bench.megatron_recompute=most", "bench.megatron_recompute='most'"),
                         ("bench.sweep_chunk_sizes=64,512", "bench.sweep_chunk_sizes has [512]"),
                         ("bench.memory_budget_mb=-1", "bench.memory_budget_mb=-1"),
                         ("bench.selection_steps=0", "bench.selection_steps=0")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            validate_bench(load_config(None, TINY + ["bench.sweep=true", bad]))
    with pytest.raises(ConfigError, match="train.recompute_num_layers=3 exceeds the 2 layers"):
        load_config(None, TINY + ["train.recompute=block", "train.recompute_num_layers=3"])


@pytest.mark.megatron
@pytest.mark.once
def test_block_recompute_maps_onto_megatron():
    from chunkflow.model.provider import build_transformer_config

    tc = build_transformer_config(load_config(None, TINY + ["train.recompute=block", "train.recompute_num_layers=2"]))
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "block", 2)
    tc = build_transformer_config(load_config(None, TINY + ["train.recompute=full"]))
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "uniform", 1)


def test_batch_roles_keep_selection_apart_from_scoring():
    cfg = load_config(None, TINY + ["bench.sweep=true", "bench.selection_steps=3", "bench.timed_steps=8"])
    warmup, selection, timed = batch_roles(cfg)
    assert (warmup, selection, timed) == ([0], [1, 2, 3], list(range(4, 12)))
    assert not set(selection) & set(timed) and not set(warmup) & (set(selection) | set(timed))
    assert batch_roles(load_config(None, TINY))[1] == []  # no sweep: nothing to select


def test_bootstrap_interval_of_the_median():
    from chunkflow.bench.stats import bootstrap_median_ci

    values = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]
    ci = bootstrap_median_ci(values, resamples=10000, seed=3)
    assert ci["median"] == pytest.approx(1.35) and ci["n"] == 8
    # resample medians are medians of 8 of the values: the interval lies inside their range,
    # brackets the median, and is reproducible from the seed
    assert 1.0 <= ci["low"] < 1.35 < ci["high"] <= 1.7
    assert bootstrap_median_ci(values, resamples=10000, seed=3) == ci
    assert bootstrap_median_ci([2.0] * 8)["low"] == bootstrap_median_ci([2.0] * 8)["high"] == 2.0
    wide = bootstrap_median_ci([0.5, 3.0] * 4, seed=3)
    assert wide["high"] - wide["low"] > ci["high"] - ci["low"]


def test_llama3_sft_lengths():
    from chunkflow.data.synthetic import LLAMA3_SFT, synthetic_lengths

    cfg = load_config(None, ["data.synthetic.distribution=llama3_sft", "data.synthetic.length_scale=16",
                             "data.max_seq_len=8192", "data.synthetic.num_samples=20000"])
    lengths = synthetic_lengths(cfg.data.synthetic, max_seq_len=8192, seed=5)
    assert len(lengths) == 20000 and lengths.min() >= 8 and lengths.max() <= 8192
    assert (lengths == synthetic_lengths(cfg.data.synthetic, max_seq_len=8192, seed=5)).all()
    # 22 of 20000 are long context (mean 38136 / 16 = 2383); the rest average 846 / 16 = 53
    assert sum(f for f, _ in LLAMA3_SFT) == pytest.approx(1.0)
    assert 40 < lengths[lengths < 1024].mean() < 60 and 15 <= (lengths > 1024).sum() <= 22


def test_out_of_memory_is_caught_and_reported():
    import torch

    from chunkflow.bench.driver import guarded

    def boom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert guarded(lambda: 7, torch.device("cpu")) == (7, None)
    value, message = guarded(boom, torch.device("cpu"))
    assert value is None and "Tried to allocate" in message
    with pytest.raises(ValueError):  # other errors are not swallowed
        guarded(lambda: int("x"), torch.device("cpu"))


def test_safe_probes_order_and_predictions():
    """Where an out-of-memory probe could strand other ranks, a candidate is not run if it
    keeps all that an over-budget one keeps, or its predicted device peak is too high."""
    import torch

    from chunkflow.bench.probe import chunkflow_keeps_all_of, keeps_all_of, predicted_mem_peak, probes_unrecoverable

    order = megatron_candidates(load_config(None, TINY + ["model.num_layers=8", "parallel.pipeline=2"]))
    for i, a in enumerate(order):  # each candidate is probed after every one it keeps all of
        assert not any(keeps_all_of(order[j], a, 4) and order[j] != a for j in range(i))
    assert keeps_all_of("none", "block:1", 4) and keeps_all_of("block:1", "block:3", 4)
    assert keeps_all_of("block:3", "full", 4) and keeps_all_of("selective", "full", 4)
    assert keeps_all_of("none", "selective", 4) and not keeps_all_of("full", "block:3", 4)
    assert not keeps_all_of("block:1", "selective", 4) and not keeps_all_of("selective", "block:3", 4)
    assert chunkflow_keeps_all_of((512, 2), (256, 2)) and not chunkflow_keeps_all_of((512, 1), (256, 2))
    # device peak bound: the highest measured point below, plus per layer more the
    # in-flight micro-batches times full's activation peak (4 layers per stage)
    measured = {"full": (100, 1000), "block:3": (300, 1400)}
    assert predicted_mem_peak("block:1", measured, 4, in_flight=2) == 1400 + 2 * 100 * 2
    assert predicted_mem_peak("none", measured, 4, in_flight=2) == predicted_mem_peak("selective", measured, 4, 2) == 1400 + 3 * 200
    assert predicted_mem_peak("full", measured, 4, in_flight=2) == 1000
    assert predicted_mem_peak("block:3", {"full": (100, 1000)}, 4, in_flight=2) == 1000 + 100 * 2
    assert predicted_mem_peak("block:3", {}, 4, in_flight=2) is None
    # the bound holds on both measured long-tail benchmarks (2 layers per stage, PP=2),
    # where the growth is not linear in the layers kept
    for name in ("bench_longtail_cpu.json", "bench_longtail_cpu_loaded2.json", "bench_longtail_cpu_repeat.json"):
        lt = json.loads((ROOT / "docs" / "results" / name).read_text())
        peaks = {c["recompute"]: (c["peak_activation_bytes"], c["peak_mem_bytes"]) for c in lt["megatron_candidates"]}
        for target, known in (("block:1", ["full"]), ("none", ["full"]), ("none", ["full", "block:1"]),
                              ("selective", ["full", "block:1"])):
            bound = predicted_mem_peak(target, {k: peaks[k] for k in known}, 2, in_flight=2)
            assert bound >= peaks[target][1], (name, target, known)
    assert probes_unrecoverable(torch.device("cuda"), 2)
    assert not probes_unrecoverable(torch.device("cuda"), 1) and not probes_unrecoverable(torch.device("cpu"), 8)


def test_check_losses_flags_differences():
    ref = {"name": "m", "steps": [0, 1], "losses": [2.0, 3.0], "grad_norms": [1.0, 1.0]}
    same = {"name": "a", "steps": [0, 1], "losses": [2.0 * (1 + 1e-7), 3.0], "grad_norms": [1.0, 1.0]}
    off = {"name": "b", "steps": [1], "losses": [3.003], "grad_norms": [1.0]}
    assert check_losses(ref, [same], 1e-5)["ok"]
    out = check_losses(ref, [same, off], 1e-5)
    assert not out["ok"] and [s["ok"] for s in out["sides"]] == [True, False]
    assert out["max_rel_loss_diff"] == pytest.approx(1e-3)


def test_recompute_flops_and_input_cache():
    from chunkflow.bench.measure import chunkflow_recompute_flops, input_cache_peak_bytes, megatron_recompute_flops
    from chunkflow.data.flops import causal_pairs, forward_flops
    from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
    from chunkflow.pipeline.plan import build_pipeline_plan
    from chunkflow.pipeline.simulate import samples_of_lengths

    m = load_config(None, TINY).model
    samples = samples_of_lengths([256, 20, 30])  # one sample of 4 chunks of 64, two short ones
    cplan = plan_chunkflow_step(samples, dp_size=1, chunk_size=64)
    # K=1 recomputes chunks 0, 1, 2: their attention against the prefix adds up to (3C)^2
    want = forward_flops(m, num_tokens=192, num_pairs=causal_pairs(192))
    assert chunkflow_recompute_flops(m, cplan, 1) == pytest.approx(want)
    assert chunkflow_recompute_flops(m, cplan, 4) == 0.0
    mplan = plan_megatron_step(samples, dp_size=1, max_seq_len=256)
    full = megatron_recompute_flops(m, mplan, "full")
    pairs = causal_pairs(256) + causal_pairs(20) + causal_pairs(30)
    assert full == pytest.approx(forward_flops(m, num_tokens=306, num_pairs=pairs, output_layer=False))
    assert 0 < megatron_recompute_flops(m, mplan, "selective") < full
    assert megatron_recompute_flops(m, mplan, "block:1", layers_per_stage=2) == pytest.approx(full / 2)
    assert megatron_recompute_flops(m, mplan, "block:2", layers_per_stage=2) == pytest.approx(full)
    # forward FLOPs per stage: the layers split evenly, the output layer on the last stage
    from chunkflow.bench.breakdown import stage_flops
    from chunkflow.data.flops import matmul_params

    cfg2 = load_config(None, TINY + ["parallel.pipeline=2"])
    rows2 = cplan.rows_per_rank[0]
    per_stage = stage_flops(cfg2, rows2)
    head = 2.0 * m.hidden_size * m.vocab_size
    for j, row in enumerate(rows2):
        pairs = sum(causal_pairs(e - a, int(row.position_ids[a]))
                    for a, e in zip(row.cu_seqlens[:-1].tolist(), row.cu_seqlens[1:].tolist()))
        assert per_stage[0][j] + per_stage[1][j] == pytest.approx(forward_flops(m, num_tokens=len(row), num_pairs=pairs))
        assert per_stage[1][j] - per_stage[0][j] == pytest.approx(head * len(row))
    assert matmul_params(m) - matmul_params(m, output_layer=False) == m.hidden_size * m.vocab_size
    # stage 1 of 2 caches the inputs of the 3 no-graph chunks until their recompute
    rows = cplan.rows_per_rank[0]
    actions = build_pipeline_plan(rows, 2, 1).actions(1)
    assert input_cache_peak_bytes(actions, rows, first_stage=False, hidden=64, bytes_per_value=4) == 3 * 64 * 64 * 4
    assert input_cache_peak_bytes(actions, rows, first_stage=True, hidden=64, bytes_per_value=4) == 0


# ---------------------------------------------------------------- runs
def _bench(rank: int, world: int, overrides: list, perturb: bool = False, oom: str = "") -> dict:
    if oom:  # the Megatron candidate `oom` runs out of device memory in its first step
        import torch

        from chunkflow.bench import driver

        original_step = driver._Bench.step

        def step(self, side, i):
            if side.schedule == "megatron" and side.recompute == oom:
                raise torch.OutOfMemoryError("injected: CUDA out of memory")
            return original_step(self, side, i)

        driver._Bench.step = step
    if perturb:  # one side computes different math: ChunkFlow's loss (and gradient) scaled
        import chunkflow.pipeline.executor as ex

        original = ex.masked_loss
        ex.masked_loss = lambda mask, out: original(mask, out * 1.001)
    from chunkflow.bench import bench_worker

    return bench_worker(rank, world, None, overrides)


def _check_side(side: dict, timed: int, untimed: int = 1) -> None:
    assert SIDE_KEYS <= set(side), SIDE_KEYS - set(side)
    assert side["tokens_per_s"] > 0 and side["peak_activation_bytes"] > 0 and side["peak_mem_bytes"] > 0
    assert 0.0 <= side["bubble_fraction"] <= 1.0
    assert len(side["step_time_s"]) == timed and len(side["losses"]) == timed + untimed


@pytest.mark.megatron
@pytest.mark.once
@pytest.mark.slow
def test_script_sweep_pp2_writes_report_and_png(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--sweep", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
           *TINY, "bench.sweep_chunk_sizes=64,128", "bench.sweep_k=1,2", "bench.selection_steps=1", f"bench.output={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "speedup" in proc.stdout and "loss check: OK" in proc.stdout
    assert "timed  batch 2/2:" in proc.stdout and "eta 0:00:00)" in proc.stdout  # progress with ETA
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert report["mode"] == "sweep" and report["machine"]["world_size"] == 2
    assert report["config"]["parallel"]["pipeline"] == 2 and report["config"]["bench"]["sweep"] is True
    assert report["speedup"] == pytest.approx(report["chunkflow"]["tokens_per_s"] / report["megatron"]["tokens_per_s"])
    assert len(report["sweep"]) == 4 and {(s["chunk_size"], s["k"]) for s in report["sweep"]} == {
        (64, 1), (64, 2), (128, 1), (128, 2)}
    _check_side(report["megatron"], timed=2)
    _check_side(report["chunkflow"], timed=2, untimed=2)  # warm-up and selection batches
    for side in report["sweep"]:  # timed on the selection batches only
        assert len(side["step_time_s"]) == 1 and len(side["losses"]) == 2 + (2 if side.get("chosen") else 0)
    b = report["batches"]
    assert b["selection"] == [1] and b["timed"] == [2, 3] and "selection" in b["note"]
    assert report["command"].startswith("scripts/benchmark.py")
    assert report["megatron"]["recompute"] == "none" and report["megatron"]["recompute_overhead"] == 0.0
    # the other candidates (selective, full: 1 layer per stage, no block:n) and the 4 points
    assert report["loss_check"]["ok"] and len(report["loss_check"]["sides"]) == 6
    k1 = next(s for s in report["sweep"] if s["k"] == 1 and s["chunk_size"] == 64)
    assert k1["recompute_overhead"] > 0  # the tiny data has samples longer than 2 chunks


@pytest.mark.megatron
@pytest.mark.once
@pytest.mark.slow
def test_budget_decides_recompute_and_fit():
    report = run_distributed(_bench, 1, (TINY + ["parallel.pipeline=1", "bench.memory_budget_mb=0.001"],
                                          False, "selective"), timeout_s=600)[0]
    tried = report["megatron_candidates"]
    assert [c["recompute"] for c in tried] == ["full", "block:1", "selective", "none"]
    assert not any(c["fits_budget"] for c in tried)
    # the injected out-of-memory probe is reported as not fitting, and the run went on
    assert tried[2]["out_of_memory"] and tried[2]["peak_activation_bytes"] is None
    assert not any(c["out_of_memory"] or c["skipped"] for c in tried if c["recompute"] != "selective")
    assert report["megatron"]["recompute"] == "full" and not report["both_fit_budget"]
    assert report["megatron"]["recompute_overhead"] > 0.2  # one extra forward of every layer
    # block:1 (first of 2 layers) keeps less than none and more than full
    full, block, none = (tried[j]["peak_activation_bytes"] for j in (0, 1, 3))
    assert full < block < none
    # every candidate that ran computed the same loss as the chosen one
    assert report["loss_check"]["ok"] and len(report["loss_check"]["sides"]) == 3
    ci = report["speedup_median_ci"]
    assert ci["n"] == 2 and ci["low"] <= ci["median"] <= ci["high"]
    tb = report["megatron"]["time_breakdown_s"]
    assert tb["recompute"] > 0 and tb["wall"] == pytest.approx(sum(tb[k] for k in PARTS))


@pytest.mark.megatron
@pytest.mark.once
@pytest.mark.slow
def test_loss_check_fails_when_math_differs():
    report = run_distributed(_bench, 1, (TINY + ["parallel.pipeline=1"], True), timeout_s=600)[0]
    lc = report["loss_check"]
    assert not lc["ok"]
    assert lc["max_rel_loss_diff"] == pytest.approx(1e-3, rel=1e-3)
    _check_side(report["chunkflow"], timed=2)


@pytest.mark.megatron
@pytest.mark.once
@pytest.mark.slow
def test_safe_probes_never_run_what_cannot_fit_pp2():
    """PP=2 with safe probing (on by default where a device OOM would strand a peer): the
    over-budget full recompute rules out selective and none, the over-budget smallest
    (C, K) rules out the larger ones; nothing else runs, and the run completes."""
    report = run_distributed(_bench, 2, (TINY + [
        "parallel.pipeline=2", "bench.safe_probes=always", "bench.memory_budget_mb=0.001", "bench.timed_steps=1",
        "bench.sweep=true", "bench.sweep_chunk_sizes=64,128", "bench.sweep_k=1,2", "bench.selection_steps=1"],),
        timeout_s=600)[0]
    tried = {c["recompute"]: c for c in report["megatron_candidates"]}
    assert list(tried) == ["full", "selective", "none"]
    assert tried["full"]["peak_activation_bytes"] > 0 and not tried["full"]["skipped"]
    for name in ("selective", "none"):
        assert "keeps all that megatron recompute=full keeps, which is over budget" in tried[name]["skipped"]
        assert tried[name]["peak_activation_bytes"] is None and not tried[name]["fits_budget"]
    points = {(p["chunk_size"], p["k"]): p for p in report["sweep"]}
    assert not points[(64, 1)]["skipped"] and points[(64, 1)].get("chosen")
    for ck in ((64, 2), (128, 1), (128, 2)):
        assert "chunkflow C=64 K=1" in points[ck]["skipped"] and points[ck]["peak_activation_bytes"] is None
    assert report["megatron"]["recompute"] == "full" and report["loss_check"]["ok"]
    assert len(report["loss_check"]["sides"]) == 1  # only the two sides that ran are compared
