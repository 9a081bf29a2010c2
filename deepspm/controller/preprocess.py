"""Image pre-processing (reference section 5): RANSAC plane removal, height normalisation, the
roughness ("bad sample") rule and the empty-pixel test used by the action locator.

Raw frames are heights in metres, rows x columns, possibly with NaN rows (a partial frame). The
plane is z = a + b*row + c*col with pixel indices as coordinates.

Why a hand-written least-squares estimator inside sklearn's RANSACRegressor: the paper's settings
(5 pm residual threshold, up to 1000 trials) make RANSAC run all 1000 trials on any frame whose
noise is a few times the threshold (bad-probe frames often are). With `LinearRegression` as base,
sklearn's per-call input validation costs ~0.6 ms per trial (~0.7 s per such frame), far above the
controller's 120 ms budget per frame. `PlaneLeastSquares` fits the same model (ordinary least
squares with an intercept) without that overhead; a trial then costs ~0.06 ms, about half of it
RANSACRegressor's own loop. Measured on a 64 x 64 frame (2-core machine): ~2-3 ms for noise up to
3 pm, ~9 ms at 10 pm, ~60 ms at 30 pm (all 1000 trials). A test checks that it picks the same
inliers and plane as `LinearRegression` for the same seed. `stop_probability` (library default
0.99) is the knob if a faster, less thorough fit is ever needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import RANSACRegressor

ANGSTROM_M = 1e-10
RANSAC_RESIDUAL_THRESHOLD_M = 5e-12
RANSAC_MAX_TRIALS = 1000
RANSAC_MIN_SAMPLES = 3  # a plane through 3 points; see fit_plane_ransac
CLIP_LIMIT = 1.5  # normalised units: heights from -0.5 A to +2.5 A above the plane
EMPTY_TOLERANCE = 0.1  # normalised units = 0.1 A = 10 pm
BAD_SAMPLE_THRESHOLD_M = 6e-10
_FLOAT32_SLACK = 1e-6


class PlaneLeastSquares(RegressorMixin, BaseEstimator):
    """Ordinary least squares y = intercept + X @ coef, without sklearn's input validation.

    Same model as `LinearRegression(fit_intercept=True)`; solved on centred data, so the tiny
    heights (1e-10 m) and pixel coordinates (0..63) do not meet in one ill-scaled system.
    Degenerate samples (collinear points) get the minimum-norm solution, as LinearRegression does.
    """

    def fit(self, X: np.ndarray, y: np.ndarray) -> PlaneLeastSquares:
        solution = _plane_from_few_points(X, y) if X.shape[1] == 2 and len(y) <= _FEW_POINTS else None
        if solution is None:  # many points, a degenerate sample, or another shape: numpy least squares
            x_mean = X.mean(axis=0)
            y_mean = y.mean()
            coef, *_ = np.linalg.lstsq(X - x_mean, y - y_mean, rcond=None)
            solution = (coef, float(y_mean - x_mean @ coef))
        self.coef_, self.intercept_ = solution
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return X @ self.coef_ + self.intercept_

    def score(self, X: np.ndarray, y: np.ndarray, sample_weight: None = None) -> float:
        """R^2, as sklearn's r2_score (1.0 for a perfect fit of constant data, else 0.0)."""
        residual = y - self.predict(X)
        spread = y - y.mean()
        ss_res = float(residual @ residual)
        ss_tot = float(spread @ spread)
        if ss_tot == 0.0:
            return 1.0 if ss_res == 0.0 else 0.0
        return 1.0 - ss_res / ss_tot


_FEW_POINTS = 8


def _plane_from_few_points(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Least-squares plane through a RANSAC sample (a handful of points), in plain Python floats:
    numpy's per-call overhead on 3-element arrays would dominate the 1000 trials. None if the
    points are (nearly) collinear, where the caller falls back to minimum-norm least squares."""
    points = X.tolist()
    heights = y.tolist()
    n = len(heights)
    r_mean = sum(p[0] for p in points) / n
    c_mean = sum(p[1] for p in points) / n
    h_mean = sum(heights) / n
    srr = src = scc = srh = sch = 0.0
    for (r, c), h in zip(points, heights):
        dr, dc, dh = r - r_mean, c - c_mean, h - h_mean
        srr += dr * dr
        src += dr * dc
        scc += dc * dc
        srh += dr * dh
        sch += dc * dh
    det = srr * scc - src * src
    if det <= 1e-9 * (srr + scc) ** 2:
        return None
    b = (scc * srh - src * sch) / det
    c = (srr * sch - src * srh) / det
    return np.array([b, c]), h_mean - b * r_mean - c * c_mean


def _pixel_coordinates(shape: tuple[int, int]) -> np.ndarray:
    """(rows*cols, 2) float array of (row, col) indices in row-major order."""
    rows, cols = np.indices(shape)
    return np.column_stack([rows.ravel(), cols.ravel()]).astype(np.float64)


def fit_plane_ransac(
    z_m: np.ndarray,
    seed: int,
    residual_threshold_m: float = RANSAC_RESIDUAL_THRESHOLD_M,
    max_trials: int = RANSAC_MAX_TRIALS,
    stop_probability: float = 0.99,
) -> np.ndarray:
    """The RANSAC plane of a height image (metres), evaluated on every pixel.

    NaN pixels are left out of the fit (the returned plane is defined everywhere). The final plane
    is the least-squares fit to the inliers of the best trial (RANSACRegressor's refit).
    `stop_probability` is the library default 0.99 (RANSAC stops once it is this sure it has drawn
    an all-inlier sample); lower it to trade robustness for time.

    The minimum sample is 3 points (a plane). The original's 4 came from its polynomial-feature
    layout (a constant column counted as a feature); 3 is the true minimum, and it guarantees every
    trial has a consensus set (its own sample), so RANSAC cannot fail on a frame with >= 3 pixels.
    """
    z = np.asarray(z_m, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"expected a 2-D height image, got shape {z.shape}")
    coordinates = _pixel_coordinates(z.shape)
    heights = z.ravel()
    finite = np.isfinite(heights)
    if np.count_nonzero(finite) < RANSAC_MIN_SAMPLES:
        raise ValueError(f"need at least {RANSAC_MIN_SAMPLES} finite pixels to fit a plane")
    ransac = RANSACRegressor(
        PlaneLeastSquares(),
        min_samples=RANSAC_MIN_SAMPLES,
        residual_threshold=residual_threshold_m,
        max_trials=max_trials,
        stop_probability=stop_probability,
        random_state=seed,
    )
    ransac.fit(coordinates[finite], heights[finite])
    return ransac.estimator_.predict(coordinates).reshape(z.shape)


def normalise(levelled_m: np.ndarray) -> np.ndarray:
    """Levelled heights (m) -> float32 `h / 1 A - 1`, clipped to [-1.5, 1.5]; NaN stays NaN.

    The plane maps to -1 and a 2 A molecule to +1 (the paper's "[-1, 1]"), with no per-image
    scaling, so the nets see absolute heights.
    """
    v = np.asarray(levelled_m, dtype=np.float64) / ANGSTROM_M - 1.0
    return np.clip(v, -CLIP_LIMIT, CLIP_LIMIT).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """One frame after pre-processing.

    plane_m: the fitted plane (m), defined on every pixel.
    levelled_m: raw - plane (m); NaN where the frame had no data.
    normalised: float32 input for the nets; pixels without data are set to -1 (the plane level)
        so the nets never see NaN. They are NOT empty: use `empty_mask()`, which knows `valid`.
    valid: True where the raw frame had a finite height.
    """

    plane_m: np.ndarray
    levelled_m: np.ndarray
    normalised: np.ndarray
    valid: np.ndarray

    def empty_mask(self, tolerance: float = EMPTY_TOLERANCE) -> np.ndarray:
        """Clean-substrate pixels of this frame (see `empty_mask`), excluding missing pixels."""
        return empty_mask(self.normalised, tolerance, valid=self.valid)


def preprocess(
    z_m: np.ndarray,
    seed: int,
    *,
    residual_threshold_m: float = RANSAC_RESIDUAL_THRESHOLD_M,
    max_trials: int = RANSAC_MAX_TRIALS,
    stop_probability: float = 0.99,
) -> Preprocessed:
    """Plane removal and normalisation of a raw height image (m); the RANSAC settings are
    `fit_plane_ransac`'s."""
    z = np.asarray(z_m, dtype=np.float64)
    plane = fit_plane_ransac(z, seed, residual_threshold_m, max_trials, stop_probability)
    levelled = z - plane
    valid = np.isfinite(z)
    normalised = np.where(valid, normalise(levelled), np.float32(-1.0)).astype(np.float32)
    return Preprocessed(plane_m=plane, levelled_m=levelled, normalised=normalised, valid=valid)


UNSCANNED_FILL = -1.0  # normalised units: the plane; equals deepspm.nets.linewindow.UNSCANNED_FILL (a test pins it)


class PartialFrameError(ValueError):
    """A partial frame cannot be judged: no complete scan line at its start, or not a 2-D image."""


def scan_order(data_m: np.ndarray, scan_up: bool) -> np.ndarray:
    """A `Frame`'s heights (row 0 = top edge, whatever the scan direction) in the line-window net's orientation:
    row 0 = the first line scanned. An up-scan starts at the bottom edge, so its rows are reversed; a down-scan's
    are already in order. A view, not a copy. Its own inverse: `scan_order(scan_order(d, up), up)` is `d`."""
    data = np.asarray(data_m)
    if data.ndim != 2:
        raise PartialFrameError(f"expected a 2-D height image, got shape {data.shape}")
    return data[::-1] if scan_up else data


def scanned_lines(frame_m: np.ndarray) -> int:
    """How many complete scan lines a frame in scan order holds: its leading rows without NaN. A line being
    scanned (some pixels still NaN) does not count."""
    z = np.asarray(frame_m)
    if z.ndim != 2:
        raise PartialFrameError(f"expected a 2-D height image, got shape {z.shape}")
    complete = np.isfinite(z).all(axis=1)
    return int(z.shape[0]) if complete.all() else int(np.argmin(complete))


def preprocess_partial(
    frame_m: np.ndarray,
    seed: int,
    *,
    residual_threshold_m: float = RANSAC_RESIDUAL_THRESHOLD_M,
    max_trials: int = RANSAC_MAX_TRIALS,
    stop_probability: float = 0.99,
) -> tuple[np.ndarray, int]:
    """A partial raw frame (m) in scan order (see `scan_order`) -> (the nets' input float32, visible lines n).

    The first n rows are the complete scanned lines (`scanned_lines`); everything after them (NaN rows, and a
    line still being scanned) is unscanned. The RANSAC plane is fitted on the n scanned rows only (the same
    estimator and settings as `preprocess`), they are levelled and normalised as `preprocess` does
    (h / 1 Å - 1, clipped to [-1.5, 1.5]), and the unscanned rows are set to `UNSCANNED_FILL` (-1, the plane:
    what `preprocess` puts where a frame has no data). A complete frame gives exactly `preprocess`'s
    `normalised` image and n = rows. `PartialFrameError` when no complete line is at the start (for example a
    frame of an up-scan passed top row first: map it with `scan_order`), or finite data after the first gap.
    """
    z = np.asarray(frame_m, dtype=np.float64)
    n = scanned_lines(z)
    if n == 0:
        raise PartialFrameError("no complete scan line at row 0: is the frame in scan order (see scan_order)?")
    if np.isfinite(z[n + 1 :]).any():
        raise PartialFrameError(f"finite data after the first unscanned row ({n}): the rows are not in scan order")
    scanned = z[:n]
    plane = fit_plane_ransac(scanned, seed, residual_threshold_m, max_trials, stop_probability)
    image = np.full(z.shape, np.float32(UNSCANNED_FILL), np.float32)
    image[:n] = normalise(scanned - plane)
    return image, n


def truncate_rows(frame_m: np.ndarray, lines: int) -> np.ndarray:
    """A copy of a full raw frame (m, scan order) as a partial `Scan.FrameDataGrab` returns it after `lines` lines:
    rows 0..lines-1 kept, the rest NaN."""
    z = np.array(frame_m, dtype=np.float64, copy=True)
    if z.ndim != 2:
        raise PartialFrameError(f"expected a 2-D height image, got shape {z.shape}")
    if not 1 <= lines <= z.shape[0]:
        raise PartialFrameError(f"visible lines must be in 1..{z.shape[0]}, got {lines}")
    z[lines:] = np.nan
    return z


def preprocess_truncated(frame_m: np.ndarray, lines: int, seed: int) -> np.ndarray:
    """The nets' input for a full raw frame (scan order) of which only the first `lines` lines are visible:
    `preprocess_partial(truncate_rows(frame_m, lines), seed)`'s image (the evaluation by lines; picklable for a
    process pool). The frame's own NaN, if any, still count: fewer lines may be visible."""
    return preprocess_partial(truncate_rows(frame_m, lines), seed)[0]


class RoughnessMeasure(str, Enum):
    """What the bad-sample rule measures the peak-to-peak height of.

    LEVELLED (default): the plane residual. A clean but tilted terrace is not rough: a 3.4 degree
        tilt alone gives 6 A peak-to-peak over a 10 nm frame, which the raw rule would reject.
    RAW: the un-levelled frame, as the original code did (reference section 5.2, weakness 8).
    """

    LEVELLED = "levelled"
    RAW = "raw"


def is_bad_sample(
    z_raw_m: np.ndarray,
    threshold_m: float = BAD_SAMPLE_THRESHOLD_M,
    *,
    measure: RoughnessMeasure = RoughnessMeasure.LEVELLED,
    plane_m: np.ndarray | None = None,
    seed: int = 0,
) -> bool:
    """The roughness rule: peak-to-peak height >= `threshold_m` (6 A) means "bad sample".

    For the LEVELLED measure pass the frame's `plane_m` (from `preprocess`) to avoid a second
    RANSAC fit; without it the plane is fitted here with `seed`. NaN pixels are ignored.
    """
    z = np.asarray(z_raw_m, dtype=np.float64)
    if not np.isfinite(z).any():
        raise ValueError("the frame has no finite pixel")
    if RoughnessMeasure(measure) is RoughnessMeasure.LEVELLED:
        z = z - (fit_plane_ransac(z, seed) if plane_m is None else plane_m)
    return bool(np.nanmax(z) - np.nanmin(z) >= threshold_m)


def empty_mask(normalised: np.ndarray, tolerance: float = EMPTY_TOLERANCE, *, valid: np.ndarray | None = None) -> np.ndarray:
    """Clean-substrate pixels: |v + 1| <= tolerance (0.1 = within 10 pm of the plane).

    The outer one-pixel border is always occupied (reference section 3.2), as are NaN pixels and
    pixels where `valid` is False. The bound is inclusive; 1e-6 of slack (1e-16 m) absorbs float32
    rounding, so a pixel stored as exactly -0.9 or -1.1 counts as empty.
    """
    v = np.asarray(normalised, dtype=np.float64)
    empty = np.abs(v + 1.0) <= tolerance + _FLOAT32_SLACK
    if valid is not None:
        empty &= np.asarray(valid, dtype=bool)
    empty[0, :] = empty[-1, :] = False
    empty[:, 0] = empty[:, -1] = False
    return empty
