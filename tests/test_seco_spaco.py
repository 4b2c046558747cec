"""SeCO is exact; SpaCO's Bernoulli sampler is unbiased and ``without_replacement`` is
biased exactly as docs/seco_spaco.md predicts (issue 6).

How the SpaCO expectations are checked exactly: with every chunk back-propagated, loss
factor 1 and hop factor h, the gradient is a polynomial in h whose coefficient q is the
sum of all q-hop chain terms g_q (module docstring of ``chunkflow.scheduling.spaco``).
Running h = 0..k-1 and solving the Vandermonde system gives every g_q. Enumerating all
chunk subsets S with their probabilities then gives the sampler's exact expectation,
which must equal sum_q w_q g_q with w_q = ``expected_chain_weight(q)``: 1 for Bernoulli
(so the full gradient), prod_{r=1..q} (1 - r/t)/(1 - r/k) without replacement.
A Monte-Carlo run of the real sampler (new draw per step) is checked with a z-test
whose standard error comes from the draws' own sample variance.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from chunkflow.scheduling.plan import ChunkRef, plan_single_stage, validate_actions
from chunkflow.scheduling.spaco import SpaCOSampler, expected_chain_weight, num_budget_chunks
from chunkflow.parallel.spawn import run_distributed

SPACO = ["train.schedule=chunkflow", "chunkflow.mode=spaco", "chunkflow.chunk_size=32"]
MC_MODEL = ["model.num_layers=2"]  # the Monte-Carlo runs many steps: a 2-layer model
Z_MAX = 4.0  # per direction; 10 directions -> false alarm ~6e-4 for an unbiased sampler


# ----------------------------------------------------------------------------- workers
def _grad(ddp):
    import torch

    return torch.cat([p.main_grad.detach().flatten().double() for p in ddp.module.parameters()
                      if p.requires_grad])


def _step(cfg, ctx, ddp, samples, *, sampler="config", step: int = 0):
    """One global batch through the configured chunk schedule; (grad vector, result)."""
    from chunkflow.data.plan import plan_chunkflow_step
    from chunkflow.train.build import build_schedule

    plan = plan_chunkflow_step(samples, dp_size=ctx.dp_size, chunk_size=cfg.chunkflow.chunk_size)
    ddp.zero_grad_buffer()
    schedule = build_schedule(cfg, ddp, ctx)
    if sampler != "config":
        schedule.sampler = sampler
    schedule.step = step
    res = schedule.run(plan.rows_per_rank[ctx.dp_rank])
    return _grad(ddp), res, schedule


def _hop_terms(cfg, ctx, ddp, samples, k: int):
    """g_q for q = 0..k-1 (g_0 includes the standalone chunks), by polynomial fit in h."""
    import torch

    from chunkflow.scheduling.spaco import FixedSelection

    hs = list(range(k))
    gs = torch.stack([_step(cfg, ctx, ddp, samples, sampler=FixedSelection(range(k), 1.0, float(h)))[0]
                      for h in hs])
    vander = torch.tensor([[float(h) ** q for q in range(k)] for h in hs], dtype=torch.float64)
    return torch.linalg.solve(vander, gs)  # (k, params)


def seco_exact(rank: int, world: int, dtype: str) -> dict:
    """SeCO (chunkflow.mode=seco) vs megatron's full-sequence step on the same weights."""
    import torch

    from _workers import make_samples, run_step, setup

    torch.manual_seed(0)
    cfg, ctx, ddp, _ = setup([f"model.dtype={dtype}", "train.schedule=chunkflow", "chunkflow.mode=seco",
                              "chunkflow.chunk_size=32"])
    samples = make_samples([128, 20, 9, 70, 33], seed=4)  # 4 + 3 + 2 dependent chunks
    ref = run_step(cfg, ctx, ddp, samples, "megatron")
    full = torch.cat([ref["grads"][n].flatten().double() for n, _ in ddp.module.named_parameters()])
    g, res, sch = _step(cfg, ctx, ddp, samples)
    recomputes = sum(type(a).__name__ == "Recompute" for a in sch.last_actions)
    return {"rel": float((g - full).norm() / full.norm()), "k": sch.k, "recomputes": recomputes,
            "loss": res.loss_sum, "ref_loss": ref["loss"] * sum(s.num_loss_tokens for s in samples)}


def spaco_exact(rank: int, world: int) -> dict:
    """Exact expectations of both samplers (and a capped factor) by enumerating subsets."""
    import torch

    from _workers import make_samples, run_step, setup
    from chunkflow.scheduling.spaco import FixedSelection

    torch.manual_seed(0)
    cfg, ctx, ddp, _ = setup(["model.dtype=fp64"] + SPACO)
    k, t = 4, 2
    samples = make_samples([k * 32, 20], seed=5)  # one long sample of k chunks + a short one
    ref = run_step(cfg, ctx, ddp, samples, "megatron")
    full = torch.cat([ref["grads"][n].flatten().double() for n, _ in ddp.module.named_parameters()])
    terms = _hop_terms(cfg, ctx, ddp, samples, k)
    out: dict = {"terms_sum_vs_full": float((terms.sum(0) - full).norm() / full.norm()),
                 "term_norms": [float(x.norm() / full.norm()) for x in terms]}
    short = _step(cfg, ctx, ddp, samples, sampler=FixedSelection([]))[0]  # standalone chunk only
    terms[0] -= short  # long-sample terms only: the short sample is never sampled or scaled
    p = t / k
    for name, factor in (("uncapped", 1 / p), ("capped", 1.5)):
        g = {S: _step(cfg, ctx, ddp, samples, sampler=FixedSelection(S, factor, factor))[0]
             for n in range(k + 1) for S in itertools.combinations(range(k), n)}
        bern = sum(p ** len(S) * (1 - p) ** (k - len(S)) * v for S, v in g.items())
        cap = factor if name == "capped" else 0.0
        want = short + sum(expected_chain_weight(q, k, t, "bernoulli", cap) * terms[q] for q in range(k))
        out[f"bernoulli_{name}_vs_formula"] = float((bern - want).norm() / full.norm())
        out[f"bernoulli_{name}_vs_full"] = float((bern - full).norm() / full.norm())
        if name == "uncapped":
            subsets = list(itertools.combinations(range(k), t))
            wr = sum(g[S] for S in subsets) / len(subsets)
            want = short + sum(expected_chain_weight(q, k, t, "without_replacement") * terms[q] for q in range(k))
            out["wr_vs_formula"] = float((wr - want).norm() / full.norm())
            out["wr_vs_full"] = float((wr - full).norm() / full.norm())
    return out


def spaco_monte_carlo(rank: int, world: int, draws: int) -> dict:
    """Sampled SpaCO gradients of the configured sampler (one draw per step), projected."""
    import torch

    from _workers import make_samples, run_step, setup

    torch.manual_seed(0)
    k = 6
    cfg, ctx, ddp, _ = setup(["model.dtype=fp64", "chunkflow.spaco.budget=2"] + MC_MODEL + SPACO)
    state = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    samples = make_samples([k * 32, 20], seed=6)
    ref = run_step(cfg, ctx, ddp, samples, "megatron")
    full = torch.cat([ref["grads"][n].flatten().double() for n, _ in ddp.module.named_parameters()])
    terms = _hop_terms(cfg, ctx, ddp, samples, k)  # weight 1 at q = 0: the short sample may stay in
    want = {sampler: sum(expected_chain_weight(q, k, 2, sampler) * terms[q] for q in range(k))
            for sampler in ("bernoulli", "without_replacement")}
    bias = want["without_replacement"] - full
    # Directions: 8 random ones, the full gradient's, and the predicted bias's (along
    # which the test has the power to see without_replacement's bias).
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(8, full.numel(), generator=gen, dtype=torch.float64)
    dirs = torch.cat([dirs, full[None], bias[None]])
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    out: dict = {"full": (dirs @ full).numpy(), "state": state}
    for sampler in ("bernoulli", "without_replacement"):
        cfg.chunkflow.spaco.sampler = sampler
        proj, chosen = [], []
        for step in range(draws):
            g, res, sch = _step(cfg, ctx, ddp, samples, step=step)
            proj.append((dirs @ g).numpy())
            chosen.append(res.extra["spaco_backprop_chunks"])
        out[sampler] = {"proj": np.stack(proj), "predicted": (dirs @ want[sampler]).numpy(), "chosen": chosen}
    # One fixed step for the layout checks (TP / DP ranks must draw the same chunks).
    cfg.chunkflow.spaco.sampler = "bernoulli"
    layout_samples = make_samples([k * 32, 20, 100, 9], seed=7)
    g, res, sch = _step(cfg, ctx, ddp, layout_samples, step=11)
    out["layout"] = {"samples": layout_samples, "grads": {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()},
                     "selection": {s: sorted(v.chunks) for s, v in sch.last_selection.items()}}
    return out


def spaco_layouts(rank: int, world: int, layouts: list, state: dict, ref: dict) -> list:
    """SpaCO at step 11 on each 2-rank layout (TP=2, DP=2) vs the single-process run."""
    import torch.distributed as dist

    from _workers import compare_sharded, setup

    results = []
    for layout in layouts:  # setup() rebuilds megatron's groups for each layout
        cfg, ctx, ddp, offset = setup(["model.dtype=fp64", "chunkflow.spaco.budget=2"] + MC_MODEL + SPACO + layout,
                                      state)
        _, res, sch = _step(cfg, ctx, ddp, ref["samples"], step=11)
        grads = {n: p.main_grad for n, p in ddp.module.named_parameters()}
        mine = {s: sorted(v.chunks) for s, v in sch.last_selection.items()}
        every = [None] * world
        dist.all_gather_object(every, mine)
        results.append({"rel": compare_sharded(grads, ref["grads"], ddp, ctx, offset), "selections": every})
    return results


# ----------------------------------------------------------------------------- pure tests
def test_chain_weight_formula():
    # docs/seco_spaco.md: 0.88 for one hop at k = 128, t = 8; Bernoulli is 1 for every q.
    assert expected_chain_weight(1, 128, 8, "without_replacement") == pytest.approx(0.875 / (127 / 128))
    assert round(expected_chain_weight(1, 128, 8, "without_replacement"), 2) == 0.88
    for q in range(6):
        closed = math.prod((1 - r / 8) / (1 - r / 128) for r in range(1, q + 1))
        assert expected_chain_weight(q, 128, 8, "without_replacement") == pytest.approx(closed)
        assert expected_chain_weight(q, 128, 8, "bernoulli") == pytest.approx(1.0)
    assert expected_chain_weight(8, 128, 8, "without_replacement") == 0.0  # q + 1 > t chunks
    assert expected_chain_weight(2, 16, 4, "bernoulli", max_factor=2) == pytest.approx((2 * 4 / 16) ** 3)


def test_sampler_is_deterministic_and_draws_at_rate():
    s = SpaCOSampler(budget=3, sampler="bernoulli", seed=9)
    assert s.select(5, 12, step=4) == s.select(5, 12, step=4)
    draws = [s.select(sid, 12, step) for sid in range(40) for step in range(50)]
    assert len({d.chunks for d in draws}) > 100  # steps and samples draw differently
    rate = np.mean([len(d.chunks) for d in draws]) / 12
    assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / (12 * len(draws)))
    assert {d.loss_factor for d in draws} == {d.hop_factor for d in draws} == {4.0}
    wr = SpaCOSampler(budget=0.25, sampler="without_replacement")
    assert {len(wr.select(i, 12, 0).chunks) for i in range(50)} == {3}
    capped = SpaCOSampler(budget=1, sampler="bernoulli", max_factor=2.0)
    assert capped.select(0, 16, 0).loss_factor == 2.0
    assert SpaCOSampler(budget=20).select(0, 16, 0).chunks == frozenset(range(16))  # t >= k: SeCO
    assert num_budget_chunks(0.5, 7) == 3.5
    with pytest.raises(ValueError, match="whole number"):
        num_budget_chunks(2.5, 7)


def test_sparse_plan_runs_only_chosen_chunks():
    chunks = [ChunkRef()] + [ChunkRef("s", j, 5) for j in range(5)] + [ChunkRef("u", j, 2) for j in range(2)]
    backprop = {"s": [0, 3], "u": []}
    acts = plan_single_stage(chunks, 1, backprop)
    validate_actions(acts, chunks, 1, backprop)
    bwd = [a.mb for a in acts if type(a).__name__ == "Backward"]
    assert bwd == [0, 4, 1]  # standalone, then s3, s0 (descending); nothing of u
    with pytest.raises(AssertionError):
        validate_actions(plan_single_stage(chunks, 1), chunks, 1, backprop)  # the dense plan
    assert plan_single_stage(chunks, 1, None) == plan_single_stage(chunks, 1)


@pytest.mark.parametrize("override, message", [
    (["chunkflow.mode=seco"], "set train.schedule=chunkflow"),
    (["chunkflow.mode=seco", "train.schedule=chunkflow", "chunkflow.k=2"], "K = 1"),
    (["chunkflow.spaco.budget=2.5"], "whole number of chunks"),
    (["chunkflow.spaco.sampler=uniform"], "not one of bernoulli, without_replacement"),
    (["chunkflow.spaco.max_factor=0.5"], "0 (no cap) or >= 1"),
])
def test_config_errors(override, message):
    from chunkflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, override)


# ----------------------------------------------------------------------------- model tests
@pytest.mark.megatron
@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("fp64", 1e-10)])
def test_seco_equals_full_sequence(dtype, tol):
    out = run_distributed(seco_exact, 1, (dtype,))[0]
    assert out["k"] == 1 and out["recomputes"] == 3 + 2 + 1
    assert out["rel"] < tol, out
    assert abs(out["loss"] - out["ref_loss"]) <= tol * abs(out["ref_loss"]) * 10


@pytest.mark.megatron
@pytest.mark.slow
def test_spaco_exact_expectations():
    out = run_distributed(spaco_exact, 1, ())[0]
    assert out["terms_sum_vs_full"] < 1e-10, out
    assert all(x > 1e-3 for x in out["term_norms"][:4]), out  # 0..3-hop terms all present
    assert out["bernoulli_uncapped_vs_full"] < 1e-10, out  # unbiased
    assert out["wr_vs_formula"] < 1e-10, out  # biased exactly as predicted ...
    assert out["wr_vs_full"] > 1e-3, out  # ... and visibly so
    assert out["bernoulli_capped_vs_formula"] < 1e-10, out
    assert out["bernoulli_capped_vs_full"] > 1e-3, out


@pytest.fixture(scope="module")
def monte_carlo():
    return run_distributed(spaco_monte_carlo, 1, (120,))[0]


def _z(proj: np.ndarray, target: np.ndarray) -> np.ndarray:
    se = proj.std(axis=0, ddof=1) / math.sqrt(len(proj))
    return (proj.mean(axis=0) - target) / se


@pytest.mark.megatron
@pytest.mark.slow
def test_spaco_bernoulli_mean_converges_to_full_gradient(monte_carlo):
    b = monte_carlo["bernoulli"]
    z = _z(b["proj"], monte_carlo["full"])
    assert np.abs(z).max() < Z_MAX, z
    np.testing.assert_allclose(b["predicted"], monte_carlo["full"], rtol=1e-9, atol=1e-12)
    assert 0.20 < np.mean(b["chosen"]) / 6 < 0.47  # t/k = 1/3 on average


@pytest.mark.megatron
@pytest.mark.slow
def test_spaco_without_replacement_bias_matches_formula(monte_carlo):
    w = monte_carlo["without_replacement"]
    assert set(w["chosen"]) == {2}  # exactly t chunks per draw
    z = _z(w["proj"], w["predicted"])
    assert np.abs(z).max() < Z_MAX, z
    # The same z-test does reject the full gradient as its mean: along the predicted
    # bias direction (the last one) the bias is many standard errors wide.
    z_full = _z(w["proj"], monte_carlo["full"])
    assert abs(z_full[-1]) > 2 * Z_MAX, z_full


@pytest.mark.megatron
@pytest.mark.slow
def test_spaco_ranks_draw_the_same_chunks(monte_carlo):
    ref = monte_carlo["layout"]
    layouts = [["parallel.tensor=2"], ["parallel.tensor=1"]]  # TP=2, then DP=2
    per_rank = run_distributed(spaco_layouts, 2, (layouts, monte_carlo["state"], ref))
    for r in per_rank:
        assert all(x["rel"] < 1e-10 for x in r), r
    tp, dp = per_rank[0]
    assert tp["selections"][0] == tp["selections"][1] == ref["selection"]  # TP ranks agree
    # Data parallel: each rank draws its own samples' chunks, exactly as one process would.
    assert {s: c for sel in dp["selections"] for s, c in sel.items()} == ref["selection"]
    assert all(sel for sel in dp["selections"])  # both ranks had a long sample to draw for
