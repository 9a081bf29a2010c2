"""Region planner: blocked cells, forbidden circles, the envelope, the cost rule, persistence."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspm.controller.planner import CentreNorm, PlannerConfig, RegionPlanner, bad_sample_radius_m
from deepspm.io.errors import SafetyError
from deepspm.io.safety import SafetyEnvelope

NM = 1e-9


def cells(xy: tuple[float, float], cell_m: float = 10 * NM) -> tuple[int, int]:
    return round(xy[0] / cell_m), round(xy[1] / cell_m)


def fill(planner: RegionPlanner, start: tuple[float, float] = (0.0, 0.0), limit: int = 10**6) -> list[tuple[float, float]]:
    """Scan the regions the planner proposes until it returns None (or `limit` scans)."""
    picks, previous = [], start
    while len(picks) < limit and (region := planner.next_region(previous)) is not None:
        picks.append(region)
        planner.mark_scanned(region)
        previous = region
    return picks


def test_default_grid_and_envelope_agree_with_the_safety_layer() -> None:
    wire_range = float(np.float32(850 * NM))  # Piezo.RangeGet sends float32
    planner = RegionPlanner(PlannerConfig(piezo_range_xy_m=(wire_range, wire_range)))
    assert planner.shape == (85, 85)
    assert planner.x_m.min() == pytest.approx(-420 * NM) and planner.x_m.max() == pytest.approx(420 * NM)
    usable_x = planner.x_m[planner.usable]
    assert usable_x.max() == pytest.approx(390 * NM) and planner.usable.sum() == 79 * 79
    envelope = SafetyEnvelope(piezo_range_m=(wire_range, wire_range, 1e-6))
    for iy in range(0, 85, 3):
        for ix in range(85):
            frame = {"x_m": planner.x_m[iy, ix], "y_m": planner.y_m[iy, ix], "width_m": 10 * NM, "height_m": 10 * NM,
                     "angle_deg": 0.0}
            if planner.usable[iy, ix]:
                envelope.check("Scan.FrameSet", frame)
            else:
                with pytest.raises(SafetyError):
                    envelope.check("Scan.FrameSet", frame)


def test_margin_shrinks_the_grid() -> None:
    assert RegionPlanner(PlannerConfig(margin_m=25 * NM)).shape == (81, 81)  # N = floor(400 / 10) = 40
    assert RegionPlanner(PlannerConfig(piezo_range_xy_m=(800 * NM, 600 * NM))).shape == (61, 81)


def test_fills_outwards_in_manhattan_diamonds() -> None:
    picks = [cells(p) for p in fill(RegionPlanner())]
    assert picks[0] == (0, 0)
    for k in range(1, 8):
        n = 2 * k * k + 2 * k + 1  # cells with |x| + |y| <= k
        diamond = {(x, y) for x in range(-k, k + 1) for y in range(-k, k + 1) if abs(x) + abs(y) <= k}
        assert set(picks[:n]) == diamond
    # exhaustion: every usable cell exactly once, then None
    assert len(picks) == len(set(picks)) == 79 * 79


def test_first_steps_and_row_major_tie_break() -> None:
    picks = [cells(p) for p in fill(RegionPlanner())][:5]
    # after the centre, four ties at cost 2 cells: the first in row-major order (smallest y) wins
    assert picks == [(0, 0), (0, -1), (-1, 0), (0, 1), (1, 0)]


def test_chebyshev_option_fills_squares() -> None:
    picks = [cells(p) for p in fill(RegionPlanner(PlannerConfig(centre_norm=CentreNorm.CHEBYSHEV)))]
    for k in range(1, 5):
        square = {(x, y) for x in range(-k, k + 1) for y in range(-k, k + 1)}
        assert set(picks[: (2 * k + 1) ** 2]) == square


def test_block_circle_is_strict() -> None:
    planner = RegionPlanner()
    assert planner.block_circle((0.0, 0.0), 10 * NM) == 1  # neighbours at exactly 10 nm stay free
    assert planner.block_circle((0.0, 0.0), 10.001 * NM) == 4
    assert planner.block_circle((0.0, 0.0), 10.001 * NM) == 0
    assert planner.next_region((0.0, 0.0)) is not None
    assert not planner.is_free((0.0, 10 * NM)) and planner.is_free((10 * NM, 10 * NM))


def test_mark_scanned_blocks_the_containing_cell() -> None:
    planner = RegionPlanner()
    planner.mark_scanned((3 * NM, -4 * NM))
    assert not planner.is_free((0.0, 0.0))
    planner.mark_scanned((5000 * NM, 0.0))  # off the grid: ignored
    assert planner.blocked.sum() == 1


def test_travel_limit_returns_none_and_is_inclusive() -> None:
    planner = RegionPlanner()
    planner.blocked[:] = True
    far = planner.cell_index((0.0, 380 * NM))
    assert far is not None
    planner.blocked[far] = False
    assert planner.next_region((0.0, -120 * NM)) == pytest.approx((0.0, 380 * NM))  # exactly 500 nm
    assert planner.next_region((0.0, -121 * NM)) is None  # 501 nm: move to a new area
    assert not planner.exhausted
    planner.blocked[far] = True
    assert planner.exhausted and planner.next_region((0.0, 0.0)) is None
    planner.new_area()
    assert planner.area_index == 1 and planner.next_region((0.0, 0.0)) == (0.0, 0.0)


def test_bad_sample_radius() -> None:
    radii = [bad_sample_radius_m(t) / NM for t in (1, 2, 3, 4)]
    assert radii == pytest.approx([25.0, 35.355, 43.301, 50.0], abs=1e-3)
    with pytest.raises(ValueError):
        bad_sample_radius_m(0)





# -- property test against a brute-force reference -----------------------------------------------------

coordinate = st.floats(-150 * NM, 150 * NM, allow_nan=False)
configs = st.builds(
    PlannerConfig,
    piezo_range_xy_m=st.tuples(st.floats(60 * NM, 260 * NM), st.floats(60 * NM, 260 * NM)),
    margin_m=st.sampled_from([0.0, 5 * NM, 12 * NM]),
    envelope_fraction=st.sampled_from([0.8, 0.95, 1.0]),
    max_travel_m=st.floats(15 * NM, 200 * NM),
    alpha=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    centre_norm=st.sampled_from(list(CentreNorm)),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("circle"), st.tuples(coordinate, coordinate), st.floats(0.0, 60 * NM)),
        st.tuples(st.just("scan"), st.tuples(coordinate, coordinate), st.just(0.0)),
    ),
    max_size=12,
)


def reference_choice(planner: RegionPlanner, cfg: PlannerConfig, circles, scanned, previous):
    """Independent brute force over every cell: (best cost in metres, list of optimal cells)."""
    n_rows, n_cols = planner.shape
    nx, ny = (n_cols - 1) // 2, (n_rows - 1) // 2
    half_x, half_y = (0.5 * r * cfg.envelope_fraction for r in cfg.piezo_range_xy_m)
    scanned_cells = {(round(y / cfg.cell_size_m), round(x / cfg.cell_size_m)) for x, y in scanned}
    best, winners = math.inf, []
    for iy in range(n_rows):
        for ix in range(n_cols):
            x, y = (ix - nx) * cfg.cell_size_m, (iy - ny) * cfg.cell_size_m
            if abs(x) + cfg.frame_size_m / 2 > half_x or abs(y) + cfg.frame_size_m / 2 > half_y:
                continue
            if (iy - ny, ix - nx) in scanned_cells:
                continue
            if any((x - cx) ** 2 + (y - cy) ** 2 < r**2 for (cx, cy), r in circles):
                continue
            travel = math.hypot(x - previous[0], y - previous[1])
            if travel > cfg.max_travel_m * (1 + 1e-9):
                continue
            centre = abs(x) + abs(y) if cfg.centre_norm is CentreNorm.MANHATTAN else max(abs(x), abs(y))
            cost = travel + cfg.alpha * centre
            tie = 1e-9 * cfg.cell_size_m  # the planner's tie tolerance (1e-9 cells)
            if cost < best - tie:
                best, winners = cost, [(x, y)]
            elif cost <= best + tie:
                winners.append((x, y))
    return best, winners


@settings(max_examples=300, deadline=None)
@given(cfg=configs, ops=operations, previous=st.tuples(coordinate, coordinate))
def test_choice_is_valid_and_minimal(cfg: PlannerConfig, ops, previous) -> None:
    planner = RegionPlanner(cfg)
    circles, scanned = [], []
    for kind, xy, radius in ops:
        if kind == "circle":
            planner.block_circle(xy, radius)
            circles.append((xy, radius))
        else:
            planner.mark_scanned(xy)
            scanned.append(xy)
    best, winners = reference_choice(planner, cfg, circles, scanned, previous)
    region = planner.next_region(previous)
    if not winners:
        assert region is None
        return
    assert region is not None
    x, y = region
    for (cx, cy), r in circles:
        assert (x - cx) ** 2 + (y - cy) ** 2 >= r**2
    half_x, half_y = (0.5 * r * cfg.envelope_fraction for r in cfg.piezo_range_xy_m)
    assert abs(x) + cfg.frame_size_m / 2 <= half_x and abs(y) + cfg.frame_size_m / 2 <= half_y
    assert math.hypot(x - previous[0], y - previous[1]) <= cfg.max_travel_m * (1 + 1e-9)
    assert planner.is_free(region)
    # minimal cost, and the first optimum in row-major order (ascending y, then x)
    assert region == pytest.approx(min(winners, key=lambda p: (round(p[1] / NM), round(p[0] / NM))), abs=1e-6 * NM)
    centre = abs(x) + abs(y) if cfg.centre_norm is CentreNorm.MANHATTAN else max(abs(x), abs(y))
    assert math.hypot(x - previous[0], y - previous[1]) + cfg.alpha * centre == pytest.approx(best, abs=1e-6 * NM)
