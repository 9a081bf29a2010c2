"""Pre-processing: RANSAC plane removal, normalisation, roughness rule, empty pixels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, RANSACRegressor

from deepspm.controller.preprocess import (
    PlaneLeastSquares,
    Preprocessed,
    RoughnessMeasure,
    empty_mask,
    fit_plane_ransac,
    is_bad_sample,
    normalise,
    preprocess,
)

N = 64


def tilted_plane(offset_m: float = 3e-9, row_slope_m: float = 4e-12, col_slope_m: float = -2.5e-12) -> np.ndarray:
    rows, cols = np.indices((N, N))
    return offset_m + row_slope_m * rows + col_slope_m * cols


def molecule_mask() -> np.ndarray:
    """Four square 'molecules' (about 1.5 nm wide at 0.156 nm/px); about 6 % of the frame."""
    mask = np.zeros((N, N), dtype=bool)
    for r, c in [(8, 8), (40, 12), (20, 44), (50, 50)]:
        mask[r : r + 8, c : c + 8] = True
    return mask


def frame_with_molecules(noise_m: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    plane = tilted_plane()
    bumps = np.where(molecule_mask(), 2e-10, 0.0)
    noise = np.random.default_rng(seed).normal(0.0, noise_m, (N, N)) if noise_m else 0.0
    return plane + bumps + noise, plane, bumps


def test_tilted_plane_with_molecules_is_removed_to_within_1_pm() -> None:
    z, plane, bumps = frame_with_molecules()
    result = preprocess(z, seed=1)
    flat = ~molecule_mask()
    assert np.max(np.abs(result.levelled_m[flat])) < 1e-12
    assert np.max(np.abs(result.plane_m - plane)) < 1e-12
    # the molecules keep their 2 A height and map to +1
    assert np.allclose(result.levelled_m[~flat], 2e-10, atol=1e-12)
    assert np.allclose(result.normalised[~flat], 1.0, atol=1e-3)
    assert np.allclose(result.normalised[flat], -1.0, atol=1e-3)


def test_plane_removed_under_pm_noise() -> None:
    z, plane, _ = frame_with_molecules(noise_m=2e-12, seed=3)
    fitted = fit_plane_ransac(z, seed=0)
    assert np.max(np.abs(fitted - plane)) < 1e-12


def test_normalisation_endpoints_and_clipping() -> None:
    h = np.array([0.0, 2e-10, 1e-10, -0.5e-10, 2.5e-10, -3e-10, 9e-10, np.nan])
    v = normalise(h)
    assert v.dtype == np.float32
    assert v[:5] == pytest.approx([-1.0, 1.0, 0.0, -1.5, 1.5])
    assert v[5] == -1.5 and v[6] == 1.5
    assert np.isnan(v[7])


def test_nan_rows_are_ignored() -> None:
    z, plane, _ = frame_with_molecules()
    partial = z.copy()
    partial[40:, :] = np.nan  # the scan stopped at row 40
    partial[5, :] = np.nan
    result = preprocess(partial, seed=0)
    assert np.all(np.isfinite(result.plane_m))
    assert np.max(np.abs(result.plane_m - plane)) < 1e-12
    assert np.all(np.isnan(result.levelled_m[40:]))
    assert not result.valid[40:].any() and result.valid[:5].all()
    # the nets never see NaN; missing pixels are never "empty"
    assert np.all(np.isfinite(result.normalised))
    assert not result.empty_mask()[40:].any() and not result.empty_mask()[5].any()
    assert result.empty_mask()[20:30, 20:30].all()


def test_nan_garbage_would_otherwise_change_the_plane() -> None:
    """Missing pixels must be excluded, not imputed: a huge value there would move a naive fit."""
    z, plane, _ = frame_with_molecules()
    z[60:, :] = np.nan
    assert np.max(np.abs(fit_plane_ransac(z, seed=0) - plane)) < 1e-12
    with pytest.raises(ValueError):
        fit_plane_ransac(np.full((N, N), np.nan), seed=0)


def test_seeded_output_is_identical() -> None:
    z, _, _ = frame_with_molecules(noise_m=1e-11, seed=5)
    a, b = preprocess(z, seed=42), preprocess(z, seed=42)
    for field in ("plane_m", "levelled_m", "normalised", "valid"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert isinstance(a, Preprocessed)
    assert a.normalised.dtype == np.float32 and a.normalised.shape == (N, N)


@pytest.mark.parametrize("noise_m", [0.0, 3e-12, 1e-11])
def test_fast_estimator_matches_linear_regression(noise_m: float) -> None:
    """Our validation-free base estimator gives RANSACRegressor(LinearRegression()) results."""
    z, _, _ = frame_with_molecules(noise_m=noise_m, seed=7)
    ours = fit_plane_ransac(z, seed=9, max_trials=200)
    rows, cols = np.indices(z.shape)
    X = np.column_stack([rows.ravel(), cols.ravel()]).astype(float)
    reference = RANSACRegressor(
        LinearRegression(), min_samples=3, residual_threshold=5e-12, max_trials=200, random_state=9
    ).fit(X, z.ravel())
    np.testing.assert_allclose(ours.ravel(), reference.predict(X), rtol=0, atol=1e-16)


def test_roughness_rule_levelled_vs_raw() -> None:
    # a clean terrace tilted by 1e-11 m/px: 63*1e-11*sqrt(2)... about 8.9 A raw peak-to-peak
    rows, cols = np.indices((N, N))
    tilted_clean = 1e-11 * rows + 1e-11 * cols
    assert is_bad_sample(tilted_clean, measure=RoughnessMeasure.RAW)
    assert not is_bad_sample(tilted_clean)
    pre = preprocess(tilted_clean, seed=0)
    assert not is_bad_sample(tilted_clean, plane_m=pre.plane_m)
    # a genuinely rough patch (7 A cluster) is bad in both measures, whatever the tilt
    rough = tilted_clean.copy()
    rough[30:34, 30:34] += 7e-10
    assert is_bad_sample(rough)
    assert is_bad_sample(rough, measure=RoughnessMeasure.RAW)
    # the threshold is inclusive (>= 6 A) and NaN pixels are ignored
    step = np.zeros((N, N))
    step[10:20, 10:20] = 6e-10
    step[0, :] = np.nan
    assert is_bad_sample(step, measure="raw")
    assert not is_bad_sample(step * 0.99, measure="raw")


def test_empty_mask_tolerance_and_border() -> None:
    v = np.full((6, 6), -1.0, dtype=np.float32)
    v[2, 2] = -0.9  # exactly 10 pm above the plane: empty
    v[2, 3] = -0.85  # 15 pm: occupied
    v[3, 3] = -1.1  # 10 pm below: empty
    v[3, 2] = np.nan
    mask = empty_mask(v)
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    assert mask[2, 2] and not mask[2, 3] and mask[3, 3] and not mask[3, 2]
    assert mask[1, 1] and mask[4, 4]
    valid = np.ones((6, 6), dtype=bool)
    valid[1, 1] = False
    assert not empty_mask(v, valid=valid)[1, 1]
    assert empty_mask(v, tolerance=0.2)[2, 3]


@pytest.mark.parametrize(
    "points",
    [
        [(0, 0), (5, 9), (63, 2)],  # a general triangle: the closed form
        [(0, 0), (1, 1), (2, 2)],  # collinear: minimum-norm least squares
        [(4, 4), (4, 4), (4, 4)],  # one point three times
        [(0, 0), (0, 1), (1, 0), (7, 7), (3, 60)],  # more than three points
    ],
)
def test_plane_estimator_equals_linear_regression(points: list[tuple[int, int]]) -> None:
    X = np.array(points, dtype=float)
    y = np.random.default_rng(len(points)).normal(1e-9, 1e-10, len(points))
    grid = np.indices((64, 64)).reshape(2, -1).T.astype(float)
    ours = PlaneLeastSquares().fit(X, y)
    reference = LinearRegression().fit(X, y)
    np.testing.assert_allclose(ours.predict(grid), reference.predict(grid), rtol=0, atol=1e-18)
    assert ours.score(X, y) == pytest.approx(reference.score(X, y), abs=1e-9)
