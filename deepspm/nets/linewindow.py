"""The line-window classifier: judge a frame from its first n scan lines, for any n (issue 11).

Design (measured against alternatives in docs/training.md): a *masked full-frame net*. It is an ordinary probe
classifier of any preset (same `NetDef`, `Predictor`, serving path, one fixed input shape (B, 64, 64, 1)),
trained with random truncation: every training image keeps its first n rows, n drawn uniformly from
`min_lines..64` per image and step, and the rows not yet scanned are set to `UNSCANNED_FILL` (-1, the levelled
plane: what `preprocess` already puts where a frame has no data). No second input channel: a row of one exact
constant never occurs in a scanned, noisy frame, so the net can tell scanned from unscanned rows without one, and
the shipped serving path stays unchanged.

Orientation convention (the net's): rows 0..n-1 of the array are the first n lines *scanned*, the rest are
unscanned. A `Frame` stores the top row first whatever the scan direction, so an up-scan's scanned rows are at
the bottom of `Frame.data_m`; `deepspm.controller.preprocess.scan_order` maps a frame to this orientation and
`preprocess_partial` levels it from its scanned rows only.

A checkpoint says it is a line-window net in its metadata: `{"lines": true, "line_window": {...}}`
(`LINE_WINDOW_KEY`, `is_line_window`). Any classifier (line-window or full-frame) can judge a partial frame;
the line-window one was trained for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

UNSCANNED_FILL = -1.0
"""The value of unscanned pixels in the nets' input (normalised units): the levelled plane (v = h / 1 Å - 1)."""

DEFAULT_MIN_LINES = 4
LINE_WINDOW_KEY = "lines"
ORIENTATION = "rows 0..n-1 are the first n lines scanned; later rows unscanned (NaN raw, -1 after levelling)"


@dataclass(frozen=True)
class LineWindowSpec:
    """How a line-window net was trained (stored in its checkpoint metadata under `line_window`)."""

    min_lines: int = DEFAULT_MIN_LINES
    fill: float = UNSCANNED_FILL
    orientation: str = ORIENTATION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_line_window(metadata: dict[str, Any]) -> bool:
    """True when a classifier checkpoint's caller metadata marks it as a line-window net."""
    return bool(metadata.get(LINE_WINDOW_KEY, False))


def check_lines(lines: int, side_px: int) -> int:
    """`lines` as an int in 1..side_px, else ValueError naming it."""
    n = int(lines)
    if not 1 <= n <= side_px:
        raise ValueError(f"visible lines must be in 1..{side_px}, got {lines}")
    return n


def mask_rows(images: Any, lines: int | Sequence[int] | np.ndarray, fill: float = UNSCANNED_FILL) -> np.ndarray:
    """Normalised images (N, S, S) or (S, S) with rows >= lines set to `fill` (a copy, float32).

    `lines`: one count for every image, or one per image. This is what a partial frame looks like to the net
    once levelled (for images that are already normalised, such as the H:Si(100) set).
    """
    batch = np.array(images, dtype=np.float32, copy=True)
    single = batch.ndim == 2
    if single:
        batch = batch[None]
    if batch.ndim != 3:
        raise ValueError(f"expected images (N, S, S) or (S, S), got shape {np.shape(images)}")
    side = batch.shape[1]
    counts = np.broadcast_to(np.asarray(lines, dtype=np.int64), (batch.shape[0],))
    for n in np.unique(counts):
        check_lines(int(n), side)
    rows = np.arange(side)[None, :] >= counts[:, None]  # (N, S): unscanned rows
    batch[rows] = fill
    return batch[0] if single else batch


def random_truncation(images: jax.Array, key: jax.Array, min_lines: int, fill: float = UNSCANNED_FILL) -> jax.Array:
    """A (B, H, W, C) batch with each image truncated to its first n rows, n ~ uniform in min_lines..H (per image).

    Pure and jittable (the training step's augmentation, applied after the random flips so the scanned rows are
    always at the top, as the net's orientation convention says).
    """
    side = images.shape[1]
    lines = jax.random.randint(key, (images.shape[0],), min_lines, side + 1)
    unscanned = jnp.arange(side)[None, :] >= lines[:, None]  # (B, H)
    return jnp.where(unscanned[:, :, None, None], jnp.asarray(fill, images.dtype), images)


def seeded_line_counts(n: int, min_lines: int, side_px: int, seed: int) -> np.ndarray:
    """One visible-line count per image, uniform in min_lines..side_px, from a seeded generator (validation
    during training sees the same truncations every epoch)."""
    rng = np.random.default_rng([seed, 0x11AE])
    return rng.integers(min_lines, side_px + 1, size=n)


__all__ = [
    "UNSCANNED_FILL", "DEFAULT_MIN_LINES", "LINE_WINDOW_KEY", "ORIENTATION", "LineWindowSpec", "is_line_window",
    "check_lines", "mask_rows", "random_truncation", "seeded_line_counts",
]
