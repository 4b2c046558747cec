"""chunkflow.chunk_size / k = auto: config, the memory walk, the chooser, and the real model."""

from __future__ import annotations

import pytest

from chunkflow.config import ConfigError, load_config
from chunkflow.config.validate import require_chunking
from chunkflow.data.assignment import CostModel
from chunkflow.pipeline.plan import build_pipeline_plan
from chunkflow.pipeline.simulate import chunk_rows, samples_of_lengths
from chunkflow.train.autotune import (MEMORY_MARGIN, MIB, Candidate, StageMemory, StageTime, candidate_grid, choose,
                                      evaluate, fit_memory, needs_autotune)

AUTO = ["train.schedule=chunkflow", "chunkflow.chunk_size=auto", "chunkflow.k=auto"]


# ---------------------------------------------------------------------- config
def test_config_accepts_auto_for_each_field_independently(tmp_path):
    assert load_config(None, AUTO).chunkflow.chunk_size == "auto"
    cfg = load_config(None, ["chunkflow.chunk_size=AUTO", "chunkflow.k=3"])
    assert (cfg.chunkflow.chunk_size, cfg.chunkflow.k) == ("auto", 3)
    assert load_config(None, ["chunkflow.k=auto"]).chunkflow.chunk_size == 256
    path = tmp_path / "c.yaml"
    path.write_text("train: {schedule: chunkflow}\nchunkflow: {chunk_size: auto, k: 2}\n")
    assert needs_autotune(load_config(str(path)))
    assert not needs_autotune(load_config(None, ["chunkflow.chunk_size=auto"]))  # megatron schedule
    # seco fixes K = 1, so k=auto is accepted there
    assert load_config(None, ["train.schedule=chunkflow", "chunkflow.mode=seco", "chunkflow.k=auto"]).chunkflow.k == "auto"


@pytest.mark.parametrize("override, message", [
    ("chunkflow.chunk_size=atuo", "chunkflow.chunk_size: expected an integer or 'auto', got 'atuo'"),
    ("chunkflow.k=2.5", "chunkflow.k: expected an integer or 'auto', got 2.5"),
    ("chunkflow.k=0", "chunkflow.k=0 is invalid: use an integer >= 1"),
    ("chunkflow.chunk_size=4096", "no larger than data.max_seq_len=1024"),
    ("train.memory_budget_mb=-1", "train.memory_budget_mb=-1.0 is invalid"),
])
def test_config_rejects_typos_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_code_built_config_with_a_bad_string_is_refused_and_tools_need_numbers():
    from chunkflow.config.schema import Config
    from chunkflow.config.validate import validate_config

    cfg = Config()
    cfg.chunkflow.k = "fast"
    with pytest.raises(ConfigError, match="chunkflow.k='fast' is invalid: use a positive integer or auto"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match="chunkflow.chunk_size=auto is resolved by the trainer"):
        require_chunking(load_config(None, AUTO), "verify")


def test_candidate_grid():
    cfg = load_config(None, AUTO + ["data.max_seq_len=4096"])
    sizes, ks = candidate_grid(cfg)
    assert sizes == [64, 128, 256, 512, 1024, 2048, 4096] and ks == [1, 2, 3, 4, 6, 8]
    assert candidate_grid(cfg, pad_multiple=128)[0] == [128, 256, 512, 1024, 2048, 4096]
    fixed = load_config(None, ["train.schedule=chunkflow", "chunkflow.chunk_size=128", "chunkflow.k=auto"])
    assert candidate_grid(fixed)[0] == [128]
    seco = load_config(None, AUTO + ["chunkflow.mode=seco"])
    assert candidate_grid(seco)[1] == [1]


# ---------------------------------------------------------------------- memory walk
MEM = StageMemory(act_base=1000.0, act_per_token=10.0, kv_saved_per_token=2.0, kv_state_per_token=3.0,
                  kv_grad_per_token=1.0, input_per_token=5.0)  # a later stage: caches inputs
FIRST = StageMemory(1000.0, 10.0, 2.0, 3.0, 1.0, 0.0)  # the first stage recomputes from token ids


def test_memory_walk_of_one_long_sample_k1_by_hand():
    # one sample of 3 chunks of 100, K = 1, PP = 1: f0 f1 F2 B2 R1 B1 R0 B0 x(s)
    rows = chunk_rows([300], 100)
    actions = build_pipeline_plan(rows, 1, 1).actions(0)
    live = 1000 + 10 * 100 + 2 * 300  # chunk 2's graph: act(100) + its 300 keys (prefix 200 + own)
    state = (3 + 1) * 300  # all three chunks stored
    assert FIRST.peak(actions, rows) == pytest.approx(live + state)
    # offload: about one chunk's K/V on the device
    assert FIRST.peak(actions, rows, offload_kv=True) == pytest.approx(live + (3 + 1) * 100)
    # as a later stage it also holds the inputs of chunks 0 and 1 until their recompute
    assert MEM.peak(actions, rows) == pytest.approx(live + state + 5.0 * 200)
    # ... unless offloaded: the stashed inputs live in the host pool with the K/V state
    assert MEM.peak(actions, rows, offload_kv=True) == pytest.approx(live + (3 + 1) * 100)


def test_each_row_kind_is_charged_its_own_activation_slope_fitted_from_the_profile():
    """A dependent chunk saves a1 bytes a token, a packed standalone row its own slope;
    a model that charges every row the larger of the two (over-estimating dependent
    chunks, and with them the long samples that decide the budget) fails here."""
    c1, a0, dep, packed, kv = 100, 500.0, 10.0, 14.0, 4.0

    def extras(act_tokens, slope, kv_tokens):  # what the profile's K = 1 runs would measure
        return {"saved_activation_peak_bytes": a0 + slope * act_tokens, "saved_kv_peak_bytes": 0.0,
                "kv_state_peak_bytes": kv * kv_tokens}

    fit = fit_memory(c1, extras(c1, dep, 3 * c1), extras(2 * c1, dep, 4 * c1), extras(2 * c1, packed, 0),
                     input_per_token=0.0)
    assert (fit.act_base, fit.act_per_token, fit.packed_per_token) == pytest.approx((a0, dep, packed))
    assert fit.kv_state_per_token + fit.kv_grad_per_token == pytest.approx(kv)
    long_rows = chunk_rows([300], 100)  # 3 dependent chunks, K = 1: chunk 2's graph + 300 stored tokens
    short_rows = chunk_rows([60, 40], 100)  # one packed row of 100 tokens
    for rows, slope in ((long_rows, dep), (short_rows, packed)):
        actions = build_pipeline_plan(rows, 1, 1).actions(0)
        stored = 300 if rows is long_rows else 0
        assert fit.peak(actions, rows) == pytest.approx(a0 + slope * 100 + kv * stored), slope
    # the store sizes a sample's buffers for all its chunks at the first one: 250 tokens
    # in chunks of 100 hold 300 from the start (the live peak: a 100-token chunk recomputed)
    rows = chunk_rows([250], 100)
    assert fit.peak(build_pipeline_plan(rows, 1, 1).actions(0), rows) == pytest.approx(a0 + dep * 100 + kv * 300)
    max_of_kinds = StageMemory(a0, packed, 0.0, kv, 0.0, 0.0)
    long_actions = build_pipeline_plan(long_rows, 1, 1).actions(0)
    assert max_of_kinds.peak(long_actions, long_rows) > fit.peak(long_actions, long_rows)


def test_memory_walk_counts_the_input_cache_on_later_stages_and_k_live_graphs():
    rows = chunk_rows([400], 100)  # 4 chunks
    plan = build_pipeline_plan(rows, 2, 1)
    stage1 = plan.actions(1)
    # stage 1 caches the inputs of the 3 no-graph forwards (100 tokens each) until recomputed
    assert MEM.peak(stage1, rows) - FIRST.peak(stage1, rows) == pytest.approx(5.0 * 300)
    k1, k4 = (FIRST.peak(build_pipeline_plan(rows, 1, k).actions(0), rows) for k in (1, 4))
    # K = 4: all four graphs alive; their saved K/V blocks are the sample's, counted once
    # (the longest: 400 keys, as for K = 1's last chunk)
    assert k4 - k1 == pytest.approx(3 * (1000 + 10 * 100))


# ---------------------------------------------------------------------- chooser
def test_chooser_picks_the_fastest_pair_that_fits_a_cost_table():
    table = [Candidate(256, 1, 100 * MIB, 9.0, 0.2), Candidate(512, 1, 150 * MIB, 7.0, 0.2),
             Candidate(512, 2, 250 * MIB, 6.0, 0.1), Candidate(1024, 1, 300 * MIB, 5.0, 0.1),
             Candidate(256, 4, 140 * MIB, 7.0, 0.1)]
    best, others = choose(table, 260 * MIB)
    assert (best.chunk_size, best.k) == (512, 2)
    assert [(c.chunk_size, c.k) for c in others] == [(256, 4), (512, 1), (256, 1)]  # tie on time: less memory
    assert choose(table, 1e12)[0].chunk_size == 1024
    assert choose(table, 150 * MIB)[0] == table[4]  # exactly at the budget fits


def test_a_budget_nothing_fits_names_the_smallest_memory_that_would():
    table = [Candidate(256, 1, 100.2 * MIB, 9.0, 0.2), Candidate(512, 1, 150 * MIB, 7.0, 0.2)]
    with pytest.raises(ConfigError, match=r"smallest predicted memory is 101 MiB \(chunk_size=256, k=1\); raise "
                                          r"train.memory_budget_mb to at least 101"):
        choose(table, 64 * MIB)


def test_evaluate_respects_the_budget_on_a_synthetic_memory_model():
    lengths = [4096, 1500, 700, 300, 120, 90, 64, 40, 33, 20, 2048, 16, 8, 500, 260, 900]
    batches = [samples_of_lengths(lengths[i:] + lengths[:i]) for i in (0, 5)]
    time = StageTime(0.01, 1e-4, 0.02, 2e-4)
    memory = [FIRST, StageMemory(500.0, 12.0, 2.0, 3.0, 1.0, 5.0)]
    cands = evaluate(batches, chunk_sizes=[256, 512, 1024, 2048], ks=[1, 2, 3, 4, 8], dp_size=1, num_stages=2,
                     memory=memory, time=time, cost_model=CostModel.for_hidden_size(256))
    assert {(c.chunk_size, c.k) for c in cands} >= {(256, 1), (256, 8), (2048, 1), (2048, 2)}
    assert (2048, 3) not in {(c.chunk_size, c.k) for c in cands}  # K above the most chunks (2) is K = 2
    for c in cands:  # every prediction is the worst stage over the batches' walks
        from chunkflow.data.plan import plan_chunkflow_step
        worst = 0.0
        for b in batches:
            rows = [r for r in plan_chunkflow_step(b, dp_size=1, chunk_size=c.chunk_size,
                                                   cost_model=CostModel.for_hidden_size(256)).rows_per_rank[0] if len(r)]
            plan = build_pipeline_plan(rows, 2, c.k)
            worst = max(worst, *(memory[s].peak(plan.actions(s), rows) for s in range(2)))
        assert c.memory_bytes == pytest.approx((1 + MEMORY_MARGIN) * worst)
    by = {(c.chunk_size, c.k): c for c in cands}
    assert by[(256, 4)].memory_bytes > by[(256, 1)].memory_bytes  # K bounds live chunks
    budget = sorted(c.memory_bytes for c in cands)[len(cands) // 2]
    best, _ = choose(cands, budget)
    assert best.memory_bytes <= budget
    assert best.time_s == min(c.time_s for c in cands if c.memory_bytes <= budget)


# ---------------------------------------------------------------------- the real model
def _autotune_worker(rank: int, world: int) -> dict:
    import dataclasses
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from chunkflow.bench.measure import input_cache_peak_bytes
    from chunkflow.data.plan import plan_chunkflow_step
    from chunkflow.data.dataset import load_samples
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.scheduling.memory import SavedTensorMeter
    from chunkflow.train.autotune import autotune
    from chunkflow.train.build import build_model_and_ddp, build_schedule

    torch.manual_seed(0)
    cfg = load_config(None, [
        "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=160", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.vocab_size=256", "data.max_seq_len=512", "data.global_batch_size=8",
        "data.synthetic.num_samples=32", "data.synthetic.short_fraction=0.5", "data.synthetic.medium_fraction=0.25",
        "data.synthetic.long_fraction=0.25", "data.synthetic.max_len_fraction=0.1", "parallel.pipeline=2",
        "train.memory_budget_mb=6", *AUTO])
    ctx = init_distributed(cfg)
    ddp, _ = build_model_and_ddp(cfg, ctx)
    samples, _ = load_samples(cfg.data, vocab_size=cfg.model.vocab_size)
    import time

    t0 = time.perf_counter()
    resolved, report = autotune(cfg, ddp, ctx, samples, log=lambda *_: None)
    took = time.perf_counter() - t0
    from chunkflow.data.loader import GlobalBatchLoader

    batch = next(GlobalBatchLoader(samples, global_batch_size=8, seed=cfg.data.seed))
    out = {"chosen": report["chosen"], "budget": report["budget_bytes"], "measured": {}, "took": took}
    for c, k in {(resolved.chunkflow.chunk_size, resolved.chunkflow.k), (64, 4)}:  # (64, 4): 8 chunks, 4 live
        run = dataclasses.replace(resolved, chunkflow=dataclasses.replace(resolved.chunkflow, chunk_size=c, k=k))
        rows = plan_chunkflow_step(batch, dp_size=1, chunk_size=c).rows_per_rank[0]
        schedule = build_schedule(run, ddp, ctx)
        ddp.zero_grad_buffer()
        with SavedTensorMeter(exclude=ddp.module) as meter:
            res = schedule.run(rows)
        cache = input_cache_peak_bytes(schedule.last.plan.actions(ctx.pp_rank), rows, first_stage=ctx.is_first_stage,
                                       hidden=64, bytes_per_value=4)
        predicted = [x for x in report["candidates"] if (x["chunk_size"], x["k"]) == (c, k)]
        out["measured"][(c, k)] = (meter.peak_bytes + meter.peak_kv_bytes + res.extra["kv_state_peak_bytes"] + cache,
                                   predicted[0]["memory_bytes"] if predicted else None)
    return out


@pytest.mark.megatron
@pytest.mark.once  # the chooser and its memory walk are ours; the model hook is tested in both passes
@pytest.mark.slow
def test_autotune_on_the_real_model_predicts_an_upper_bound_that_fits():
    from chunkflow.parallel.spawn import run_distributed

    outs = run_distributed(_autotune_worker, 2)
    assert outs[0]["chosen"] == outs[1]["chosen"]  # every rank takes the same decision
    chosen = (outs[0]["chosen"]["chunk_size"], outs[0]["chosen"]["k"])
    for key in outs[0]["measured"]:
        measured = max(o["measured"][key][0] for o in outs)
        predicted = outs[0]["measured"][key][1]
        if predicted is None:  # not a candidate (K above the most chunks of any sample)
            continue
        # an upper bound, and not a loose one
        assert measured <= predicted <= 1.6 * measured, (key, measured, predicted)
    measured = max(o["measured"][chosen][0] for o in outs)
    assert measured <= outs[0]["budget"]


def test_a_resumed_run_keeps_the_pair_its_checkpoint_trained_with(tmp_path):
    """Resume reuses the saved (C, K) instead of choosing again on other batches, so the
    float order and hence the resume stay exact; anything else chooses anew."""
    import json

    from chunkflow.train.trainer import _saved_chunking

    def ckpt(name, config):
        d = tmp_path / name
        d.mkdir()
        (d / "trainer.json").write_text(json.dumps({"step": 3, "config": config}))
        return str(d)

    chunkflow_run = {"train": {"schedule": "chunkflow"}, "chunkflow": {"chunk_size": 512, "k": 3}}
    assert _saved_chunking(ckpt("a", chunkflow_run)) == (512, 3)
    assert _saved_chunking(ckpt("b", {"train": {"schedule": "megatron"}, "chunkflow": {"chunk_size": 512, "k": 3}})) is None
    assert _saved_chunking(ckpt("c", {})) is None  # e.g. an imported HF model
    assert _saved_chunking("") is None and _saved_chunking(str(tmp_path / "missing")) is None
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "trainer.json").write_text("{not json")
    assert _saved_chunking(str(tmp_path / "torn")) is None  # the checkpoint check names it later
