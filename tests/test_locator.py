"""Action locator: largest clean square, its site in metres, and the allowed-action mask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from deepspm.controller.locator import action_mask, largest_empty_square, locate_action, pixel_to_metres
from deepspm.io.actions import ACTIONS

S = 10e-9  # frame side (m)


def brute_force_square(empty: np.ndarray) -> tuple[int, tuple[int, int] | None]:
    """Try every corner in row-major order and every side; keep the first strict improvement."""
    n_rows, n_cols = empty.shape
    best_side, best_corner = 0, None
    for r in range(n_rows):
        for c in range(n_cols):
            k = 0
            while r + k < n_rows and c + k < n_cols and empty[r : r + k + 1, c : c + k + 1].all():
                k += 1
            if k > best_side:
                best_side, best_corner = k, (r, c)
    return best_side, best_corner


@settings(max_examples=300, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.booleans()))
def test_dp_matches_brute_force(empty: np.ndarray) -> None:
    assert largest_empty_square(empty) == brute_force_square(empty)


@settings(max_examples=100, deadline=None)
@given(st.integers(3, 16).flatmap(lambda n: arrays(bool, (n, n), elements=st.booleans())))
def test_dense_images_and_border_never_used(flags: np.ndarray) -> None:
    """Build a normalised image (True = clean, -1; False = a molecule, +1); the chosen square is
    all clean, strictly inside the border, and as large as brute force says."""
    image = np.where(flags, -1.0, 1.0).astype(np.float32)
    site = locate_action(image, (0.0, 0.0), S)
    interior = flags.copy()
    interior[0, :] = interior[-1, :] = interior[:, 0] = interior[:, -1] = False
    assert (site.side_px, site.corner_rc) == brute_force_square(interior)
    if site.corner_rc is not None:
        r0, c0 = site.corner_rc
        m = site.side_px
        assert r0 >= 1 and c0 >= 1 and r0 + m <= flags.shape[0] - 1 and c0 + m <= flags.shape[1] - 1
        assert flags[r0 : r0 + m, c0 : c0 + m].all()


def test_all_clean_64_px_frame() -> None:
    site = locate_action(np.full((64, 64), -1.0, np.float32), (100e-9, -50e-9), S)
    assert site.side_px == 62 and site.corner_rc == (1, 1)
    assert site.free_side_m == pytest.approx(62 * S / 64)  # 9.6875 nm, the maximum
    assert (site.x_m, site.y_m) == pytest.approx((100e-9, -50e-9))  # symmetric square: frame centre
    assert action_mask(site.free_side_m).all()


def test_corner_centre_and_metres_by_hand() -> None:
    image = np.full((8, 8), -1.0, np.float32)
    image[1:7, 3] = 1.0  # a wall at column 3: left part cols 1-2 (2 wide), right part cols 4-6 (3 wide)
    image[1, 4:7] = 1.0  # right part: rows 2-6 x cols 4-6 -> a 3x3 square, first at (2, 4)
    site = locate_action(image, (0.0, 0.0), S)
    assert site.side_px == 3 and site.corner_rc == (2, 4)
    # centre (3.5, 5.5) px; pixel pitch S/8
    assert site.x_m == pytest.approx(-S / 2 + 5.5 / 8 * S)
    assert site.y_m == pytest.approx(S / 2 - 3.5 / 8 * S)  # row 0 at +y
    assert site.free_side_m == pytest.approx(3 / 8 * S)
    flipped = locate_action(image, (0.0, 0.0), S, row0_at_top=False)
    assert flipped.x_m == pytest.approx(site.x_m) and flipped.y_m == pytest.approx(-site.y_m)


def test_pixel_to_metres_corners() -> None:
    shape = (64, 64)
    centre = (200e-9, 300e-9)
    assert pixel_to_metres(0, 0, shape, centre, S) == pytest.approx((195e-9, 305e-9))  # top-left
    assert pixel_to_metres(64, 64, shape, centre, S) == pytest.approx((205e-9, 295e-9))  # bottom-right
    assert pixel_to_metres(0, 0, shape, centre, S, row0_at_top=False) == pytest.approx((195e-9, 295e-9))
    assert pixel_to_metres(32, 32, shape, centre, S) == pytest.approx(centre)


def test_ties_go_to_the_first_square_in_row_major_order() -> None:
    empty = np.zeros((6, 9), dtype=bool)
    empty[3:5, 1:3] = True  # 2x2 lower left
    empty[1:3, 6:8] = True  # 2x2 upper right: smaller row wins
    assert largest_empty_square(empty) == (2, (1, 6))
    empty[1:3, 6:8] = False
    empty[3:5, 5:7] = True  # same row, larger column loses
    assert largest_empty_square(empty) == (2, (3, 1))


def test_no_empty_pixel_acts_at_the_image_centre() -> None:
    image = np.full((64, 64), 1.0, np.float32)
    site = locate_action(image, (12e-9, -7e-9), S)
    assert site.side_px == 0 and site.corner_rc is None and site.free_side_m == 0.0
    assert (site.x_m, site.y_m) == pytest.approx((12e-9, -7e-9))
    assert action_mask(site.free_side_m).tolist() == [a.required_side_m == 0.0 for a in ACTIONS]


def test_invalid_pixels_are_not_empty() -> None:
    image = np.full((10, 10), -1.0, np.float32)
    valid = np.ones((10, 10), dtype=bool)
    valid[5:, :] = False  # a partial frame: rows 5.. were never scanned
    site = locate_action(image, (0.0, 0.0), S, valid=valid)
    assert site.side_px == 4 and site.corner_rc == (1, 1)


@pytest.mark.parametrize(
    ("side_nm", "allowed"),
    [
        (0.0, {0, 1, 2, 3, 4, 5}),
        (0.99, {0, 1, 2, 3, 4, 5}),
        (1.0, {0, 1, 2, 3, 4, 5, 6, 7}),
        (1.99, {0, 1, 2, 3, 4, 5, 6, 7}),
        (2.0, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}),
        (3.5, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}),
        (4.0, set(range(12))),
        (9.6875, set(range(12))),
    ],
)
def test_action_mask_matches_required_sides(side_nm: float, allowed: set[int]) -> None:
    mask = action_mask(side_nm * 1e-9)
    assert mask.dtype == bool and mask.shape == (len(ACTIONS),)
    assert set(np.flatnonzero(mask).tolist()) == allowed


def test_free_side_in_pixels_maps_to_allowed_dips() -> None:
    """A 7 px square (1.09 nm at 64 px / 10 nm) allows the 1 nm dips but not the 2 nm ones."""
    image = np.full((64, 64), 1.0, np.float32)
    image[10:17, 20:27] = -1.0
    site = locate_action(image, (0.0, 0.0), S)
    assert site.side_px == 7 and site.free_side_m == pytest.approx(7 * S / 64)
    mask = action_mask(site.free_side_m)
    assert mask[6] and mask[7] and not mask[8]
