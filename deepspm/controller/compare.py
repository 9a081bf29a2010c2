"""Comparing two conditioning policies by their actions per episode (agent versus random)."""

from __future__ import annotations

import numpy as np


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of mean(a) / mean(b), resampling the episodes of each policy."""
    rng = np.random.default_rng([seed, 0xB007])
    ratios = rng.choice(a, (n, a.size)).mean(axis=1) / rng.choice(b, (n, b.size)).mean(axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)
