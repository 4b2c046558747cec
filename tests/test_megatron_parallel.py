"""The Megatron baseline on 2 gloo processes equals the single-process run (issue 2)."""

from __future__ import annotations

import pytest

from _workers import layout_check, make_samples
from chunkflow.parallel.spawn import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

LENGTHS = [300, 40, 17, 90, 5, 130, 64, 200]


@pytest.mark.parametrize(
    "layout",
    [["parallel.pipeline=2"], ["parallel.tensor=2"], ["parallel.pipeline=1"]],
    ids=["pp2", "tp2", "dp2"],
)
def test_layout_matches_single_process(layout, reference_of):
    samples = make_samples(LENGTHS, seed=3)
    ref = reference_of(LENGTHS, 3)
    per_rank = run_distributed(layout_check, 2, (layout, samples, ref, [("megatron", None, None)]))
    losses = [r[0]["loss"] for r in per_rank if r[0]["loss"] is not None]
    assert losses and all(abs(x - ref["loss"]) < 1e-5 * ref["loss"] for x in losses)
    for results in per_rank:
        assert results[0]["grad"] < 1e-5, results
