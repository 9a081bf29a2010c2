"""Seeded toy images for training tests (numpy only: tests/parallel_worker.py imports it before JAX starts)."""

from __future__ import annotations

import numpy as np


def toy_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """'Good' images carry bright blobs on a flat plane, 'bad' ones only noise: learnable by `tiny`."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.int64)
    x = rng.normal(-1.0, 0.1, (n, 64, 64)).astype(np.float32)
    for i in np.flatnonzero(labels):
        for r, c in rng.integers(4, 60, (6, 2)):
            x[i, r - 2 : r + 3, c - 2 : c + 3] = 1.0
    return np.clip(x, -1.5, 1.5), labels
