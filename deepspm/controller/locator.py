"""Where to apply a conditioning action, and which actions fit (reference section 3.2).

An action goes to the centre of the largest all-empty (clean substrate) axis-aligned square of the
last image; an action is allowed only if its required clean side fits in that square.

Image convention (explicit, reference weakness 13): pixel (row, col) covers the continuous square
[row, row+1) x [col, col+1); columns run along +x. With `row0_at_top=True` (the default, as the
original assumed) row 0 is the +y edge of the frame; with False it is the -y edge.

No empty pixel at all: the free side is 0 and the site is the image centre, i.e. the scan centre.
The original sent the action to the image's top-left corner (weakness 9), the point of the frame
that is furthest from everything the frame tells us about; the centre at least is the middle of
what we have seen, and only the zero-requirement actions (stall, pulses) remain allowed there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepspm.controller.preprocess import EMPTY_TOLERANCE, empty_mask
from deepspm.io.actions import allowed_mask


@dataclass(frozen=True)
class ActionSite:
    """Where to act: the centre (m, scan coordinates) of the largest clean square.

    free_side_m: side of that square in metres (0 if the image has no empty pixel).
    side_px: its side in pixels. corner_rc: its top-left (row, col) in the image, None if empty.
    """

    x_m: float
    y_m: float
    free_side_m: float
    side_px: int
    corner_rc: tuple[int, int] | None


def largest_empty_square(empty: np.ndarray) -> tuple[int, tuple[int, int] | None]:
    """Side (px) and top-left corner (row, col) of the largest all-True axis-aligned square.

    The standard dynamic programme: s(i, j) = 1 + min(s(i, j+1), s(i+1, j), s(i+1, j+1)) for an
    empty pixel, 0 otherwise, filled from the bottom-right; s(i, j) is the side of the largest
    square with top-left corner (i, j). Cells on one anti-diagonal (i + j = d) depend only on the
    diagonals d+1 and d+2, so each diagonal is one vectorised step. Ties: the first maximum in
    row-major order (smallest row, then smallest column). Returns (0, None) if nothing is empty.
    """
    grid = np.asarray(empty, dtype=bool)
    if grid.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {grid.shape}")
    n_rows, n_cols = grid.shape
    side = np.zeros((n_rows + 1, n_cols + 1), dtype=np.int32)  # zero row/column pad bottom-right
    for diagonal in range(n_rows + n_cols - 2, -1, -1):
        rows = np.arange(max(0, diagonal - n_cols + 1), min(n_rows - 1, diagonal) + 1)
        cols = diagonal - rows
        smallest_neighbour = np.minimum(
            np.minimum(side[rows, cols + 1], side[rows + 1, cols]), side[rows + 1, cols + 1]
        )
        side[rows, cols] = np.where(grid[rows, cols], smallest_neighbour + 1, 0)
    side = side[:n_rows, :n_cols]
    best = int(np.argmax(side)) if side.size else 0
    largest = int(side.flat[best]) if side.size else 0
    if largest == 0:
        return 0, None
    row, col = divmod(best, n_cols)
    return largest, (row, col)


def pixel_to_metres(
    row: float,
    col: float,
    shape: tuple[int, int],
    scan_centre_xy_m: tuple[float, float],
    frame_size_m: float,
    *,
    row0_at_top: bool = True,
) -> tuple[float, float]:
    """Continuous pixel coordinates -> (x, y) in metres (reference section 3.2, step 4).

    x = x_s - S/2 + (col / N_cols) * S; with row 0 at the top (+y): y = y_s + S/2 - (row / N_rows) * S,
    else y = y_s - S/2 + (row / N_rows) * S. The frame is square with side S = `frame_size_m`.
    """
    n_rows, n_cols = shape
    x_s, y_s = scan_centre_xy_m
    half = frame_size_m / 2.0
    x = x_s - half + (col / n_cols) * frame_size_m
    y = y_s + half - (row / n_rows) * frame_size_m if row0_at_top else y_s - half + (row / n_rows) * frame_size_m
    return x, y


def locate_action(
    normalised: np.ndarray,
    scan_centre_xy_m: tuple[float, float],
    frame_size_m: float,
    *,
    tolerance: float = EMPTY_TOLERANCE,
    valid: np.ndarray | None = None,
    row0_at_top: bool = True,
) -> ActionSite:
    """The action site for a pre-processed image (`Preprocessed.normalised`; pass its `valid`).

    Empty pixels as `preprocess.empty_mask` (border always occupied). The site is the centre of
    the largest clean square, (r0 + m/2, c0 + m/2) in continuous pixel coordinates; the free side
    is m * S / N. No empty pixel: free side 0 and the site is the image centre (module docstring).
    """
    image = np.asarray(normalised)
    n_rows, n_cols = image.shape
    if n_rows != n_cols:
        raise ValueError(f"expected a square image, got shape {image.shape}")
    side_px, corner = largest_empty_square(empty_mask(image, tolerance, valid=valid))
    if corner is None:
        centre_rc = (n_rows / 2.0, n_cols / 2.0)
    else:
        centre_rc = (corner[0] + side_px / 2.0, corner[1] + side_px / 2.0)
    x, y = pixel_to_metres(*centre_rc, image.shape, scan_centre_xy_m, frame_size_m, row0_at_top=row0_at_top)
    return ActionSite(x_m=x, y_m=y, free_side_m=side_px * frame_size_m / n_cols, side_px=side_px, corner_rc=corner)


def action_mask(free_side_m: float) -> np.ndarray:
    """Boolean mask over the action table: True where the action's required side fits."""
    return np.asarray(allowed_mask(free_side_m), dtype=bool)
