"""The benchmark's statistics: a median ratio with a bootstrap 95% interval.

Each timed global batch runs on both sides, so each batch gives one paired ratio
``megatron seconds / chunkflow seconds``. The report's headline is the median of these
ratios and a percentile bootstrap interval of that median: resample the n ratios with
replacement ``resamples`` times (a seeded numpy generator, so the interval is the same
on every run of the same numbers), take each resample's median, and report the 2.5th and
97.5th percentiles. With n = 8 the interval is wide on purpose: it says how far a ratio
measured on 8 batches of a loaded machine can be trusted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["bootstrap_median_ci"]


def bootstrap_median_ci(values: Sequence[float], *, resamples: int = 10000, seed: int = 0,
                        level: float = 0.95) -> dict:
    """``{"median", "low", "high", "level", "resamples", "seed", "n"}`` of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_median_ci needs at least one value")
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(medians, [tail, 100.0 - tail])
    return {"median": float(np.median(x)), "low": float(low), "high": float(high), "level": level,
            "resamples": int(resamples), "seed": int(seed), "n": int(x.size)}
