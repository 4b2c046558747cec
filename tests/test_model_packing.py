"""Packed (THD) micro-batches: no token attends across samples, positions restart."""

from __future__ import annotations

import pytest

from _workers import packing_logits
from chunkflow.parallel.spawn import run_distributed

pytestmark = pytest.mark.megatron


def test_packed_logits_equal_each_sample_alone():
    out = run_distributed(packing_logits, 1, ([37, 5, 64, 1, 20],))[0]
    assert out["max_diff"] < 1e-5, out
    # Changing every token after the first sample leaves the first sample's logits
    # bit-identical (no attention across the boundary) and does change the rest.
    assert out["first_sample_moved"] == 0.0
    assert out["rest_moved"] > 1e-3
