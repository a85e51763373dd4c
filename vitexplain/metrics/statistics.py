"""Means and their bootstrap intervals."""
from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 1000


def bootstrap_interval(values: Sequence[float], level: float = 0.95, resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values``: ``resamples`` resamples of the same size,
    drawn with replacement by a generator seeded with ``seed``; the ``(1 − level)/2`` and ``(1 + level)/2``
    quantiles of their means."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no values")
    draws = np.random.default_rng(seed).integers(0, data.size, size=(resamples, data.size))
    means = data[draws].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
