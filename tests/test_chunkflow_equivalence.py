"""ChunkFlow's gradients equal full-sequence training (docs/chunkflow.md, issue 4).

Reference: megatron-core's stock schedule over packed micro-batches of whole samples on
a TP=1/PP=1 model. Every ChunkFlow run loads the same weights into its own layout and
must reproduce the loss and every parameter gradient (relative norm difference).
"""

from __future__ import annotations

import pytest

from _workers import layout_check, make_samples, reference_then_check
from chunkflow.parallel.spawn import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

# C = 64 below: exactly C (standalone), C + 1 (two chunks, the second of 1 token),
# N = 4 exactly (256), a length C does not divide (200), and short samples to pack.
LENGTHS = [64, 65, 256, 200, 30, 12, 7, 100, 41]
GRID = [
    ("chunkflow", 1, 64),   # K = 1: recompute every chunk but the last
    ("chunkflow", 2, 64),
    ("chunkflow", 8, 64),   # K >= N: no recompute at all
    ("chunkflow", 1, 48),   # C divides none of the long lengths
    ("chunkflow", 3, 50),
    ("chunkflow", 1, 256),  # C = the longest dividing length
]


def _check(results, ref, tol):
    for r in results:
        assert r["grad"] < tol, f"{r['run']}: max relative gradient difference {r['grad']:.2e}"
        if r["loss"] is not None:
            assert abs(r["loss"] - ref["loss"]) <= tol * abs(ref["loss"]), r


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("fp64", 1e-10)])
def test_grid_single_process(dtype, tol):
    samples = make_samples(LENGTHS, seed=1)
    ov = [f"model.dtype={dtype}"]
    out = run_distributed(reference_then_check, 1, (ov, ov, samples, GRID))[0]
    _check(out["results"], out["ref"], tol)


def test_random_long_tailed_batches():
    from chunkflow.config.schema import SyntheticConfig
    from chunkflow.data.synthetic import synthetic_lengths

    syn = SyntheticConfig(num_samples=24, short_fraction=0.6, medium_fraction=0.2,
                          long_fraction=0.2, max_len_fraction=0.05, min_len=4)
    for seed in (3, 4):
        lengths = synthetic_lengths(syn, max_seq_len=512, seed=seed).tolist()
        samples = make_samples(lengths, seed=seed)
        runs = [("chunkflow", 1, 64), ("chunkflow", 2, 96)]
        out = run_distributed(reference_then_check, 1, ([], [], samples, runs))[0]
        _check(out["results"], out["ref"], 1e-5)


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.tensor=1"]], ids=["tp2", "dp2"])
def test_two_ranks_match_the_full_reference(layout, reference_of):
    samples = make_samples(LENGTHS, seed=2)
    ref = reference_of(LENGTHS, 2)
    runs = [("megatron", None, None), ("chunkflow", 1, 64), ("chunkflow", 2, 48)]
    per_rank = run_distributed(layout_check, 2, (layout + ["parallel.pipeline=1"], samples, ref, runs))
    for results in per_rank:
        _check(results, ref, 1e-5)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_megatron_activation_recompute_inside_chunks(recompute):
    """megatron's recompute re-runs a chunk's forward inside backward: the chunk context
    (K/V prefix, RoPE offset) must still be in force then, or gradients go wrong."""
    samples = make_samples(LENGTHS, seed=4)
    out = run_distributed(reference_then_check, 1, ([], [f"train.recompute={recompute}"], samples,
                                                    [("chunkflow", 1, 64), ("chunkflow", 2, 48)]))[0]
    _check(out["results"], out["ref"], 1e-5)
