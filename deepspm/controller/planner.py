"""Where to image next inside one approach area (reference section 1.2).

The approach area is a square grid of cells, one frame (10 nm) each, centred on the approach point
(the neutral position of the xy piezo, v = 0). Per axis there are 2N+1 cells with
N = floor((R/2 - margin) / cell), R the full piezo range; for R = 850 nm that is 85 x 85 cells with
centres from -420 to +420 nm. Cells whose frame would leave `envelope_fraction` (0.95) of the piezo
range are never usable: the safety envelope (`deepspm.io.safety`) refuses such frames, so the
planner must never propose one (for +-425 nm only centres within +-390 nm remain).

A cell is blocked once scanned or once its centre lies strictly inside a forbidden circle (bad
sample, conditioning action, crash). The next region is the free cell minimising
    d = ||v - v_prev||_2 + alpha * ||v||_1        (alpha = 1, the paper's Manhattan centre term)
where v_prev is the previous scan centre (or the last action site during an episode). The first
term keeps travel, hence creep, small; the second fills the area outwards from the centre. Cells
more than `max_travel_m` (500 nm) from v_prev are skipped; ties go to the first cell in row-major
order. `None` means: move to a new approach area and call `new_area()`.

Grid layout: `blocked[iy, ix]` with x = (ix - Nx) * cell and y = (iy - Ny) * cell, so row-major order
is ascending y, then ascending x. All geometry is vectorised over the grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np

_NM = 1e-9
_TIE_TOLERANCE_CELLS = 1e-9  # costs equal to this (in cell units) are ties: rounding never reorders them


class CentreNorm(str, Enum):
    """The centre term of the cost: the paper's Manhattan norm, or the original code's Chebyshev."""

    MANHATTAN = "manhattan"
    CHEBYSHEV = "chebyshev"


@dataclass(frozen=True)
class PlannerConfig:
    """Geometry of one approach area, SI units.

    piezo_range_xy_m: full x and y ranges of the fine piezo, as `Piezo.RangeGet` reports them.
    envelope_fraction: frames stay inside this fraction of the range (the safety envelope's value).
    """

    piezo_range_xy_m: tuple[float, float] = (850 * _NM, 850 * _NM)
    cell_size_m: float = 10 * _NM
    frame_size_m: float = 10 * _NM
    margin_m: float = 0.0
    envelope_fraction: float = 0.95
    max_travel_m: float = 500 * _NM
    alpha: float = 1.0
    centre_norm: CentreNorm = CentreNorm.MANHATTAN

    def __post_init__(self) -> None:
        object.__setattr__(self, "piezo_range_xy_m", tuple(float(r) for r in self.piezo_range_xy_m))
        object.__setattr__(self, "centre_norm", CentreNorm(self.centre_norm))
        if len(self.piezo_range_xy_m) != 2 or min(self.piezo_range_xy_m) <= 0:
            raise ValueError(f"piezo_range_xy_m must be two positive ranges, got {self.piezo_range_xy_m}")
        if self.cell_size_m <= 0 or self.frame_size_m <= 0 or self.max_travel_m < 0 or self.alpha < 0:
            raise ValueError("cell and frame sizes must be positive, travel and alpha non-negative")
        if not 0 < self.envelope_fraction <= 1:
            raise ValueError(f"envelope_fraction must be in (0, 1], got {self.envelope_fraction}")

    def half_cells(self) -> tuple[int, int]:
        """N per axis (x, y): floor((R/2 - margin) / cell), robust to rounding of exact multiples."""
        return tuple(  # type: ignore[return-value]
            max(0, math.floor((r / 2 - self.margin_m) / self.cell_size_m + 1e-9)) for r in self.piezo_range_xy_m
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["piezo_range_xy_m"] = list(self.piezo_range_xy_m)
        d["centre_norm"] = self.centre_norm.value
        return d


def bad_sample_radius_m(consecutive_bad: int, base_radius_m: float = 25 * _NM) -> float:
    """Forbidden radius after `consecutive_bad` (t >= 1) bad-sample regions in a row: sqrt(t) * 25 nm."""
    if consecutive_bad < 1:
        raise ValueError(f"the bad-sample count starts at 1, got {consecutive_bad}")
    return math.sqrt(consecutive_bad) * base_radius_m


class RegionPlanner:
    """The blocked-cell map of the current approach area and the next-region rule."""

    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = config or PlannerConfig()
        cfg = self.config
        self._nx, self._ny = cfg.half_cells()
        ix = np.arange(-self._nx, self._nx + 1)
        iy = np.arange(-self._ny, self._ny + 1)
        # offsets from the approach point in cells (integers) and metres, shape (2Ny+1, 2Nx+1)
        self._gx_cells, self._gy_cells = np.meshgrid(ix.astype(np.float64), iy.astype(np.float64))
        self.x_m = self._gx_cells * cfg.cell_size_m
        self.y_m = self._gy_cells * cfg.cell_size_m
        half_frame = cfg.frame_size_m / 2
        limit_x, limit_y = (0.5 * r * cfg.envelope_fraction for r in cfg.piezo_range_xy_m)
        self.usable = (np.abs(self.x_m) + half_frame <= limit_x) & (np.abs(self.y_m) + half_frame <= limit_y)
        self.blocked = np.zeros(self.usable.shape, dtype=bool)
        self.area_index = 0

    # -- the map ----------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.blocked.shape  # type: ignore[return-value]

    @property
    def free(self) -> np.ndarray:
        """Cells that may still be imaged: usable and not blocked."""
        return self.usable & ~self.blocked

    @property
    def exhausted(self) -> bool:
        return not self.free.any()

    def new_area(self) -> None:
        """A coarse move to a fresh approach area: nothing blocked, the next region is the centre."""
        self.blocked[:] = False
        self.area_index += 1

    def block_circle(self, centre_xy_m: tuple[float, float], radius_m: float) -> int:
        """Block every cell whose centre lies strictly inside the circle; returns how many were newly
        blocked."""
        cx, cy = centre_xy_m
        inside = (self.x_m - cx) ** 2 + (self.y_m - cy) ** 2 < radius_m**2
        newly = int(np.count_nonzero(inside & ~self.blocked))
        self.blocked |= inside
        return newly

    def cell_index(self, xy_m: tuple[float, float]) -> tuple[int, int] | None:
        """(iy, ix) of the cell containing `xy_m` (nearest centre), None outside the grid."""
        ix = round(xy_m[0] / self.config.cell_size_m) + self._nx
        iy = round(xy_m[1] / self.config.cell_size_m) + self._ny
        if 0 <= iy < self.shape[0] and 0 <= ix < self.shape[1]:
            return iy, ix
        return None

    def mark_scanned(self, xy_m: tuple[float, float]) -> None:
        """Block the cell that was imaged at `xy_m` (a data scan blocks its own cell)."""
        index = self.cell_index(xy_m)
        if index is not None:
            self.blocked[index] = True

    def is_free(self, xy_m: tuple[float, float]) -> bool:
        index = self.cell_index(xy_m)
        return index is not None and bool(self.free[index])

    # -- the rule ---------------------------------------------------------------------------------------
    def costs(self, previous_xy_m: tuple[float, float]) -> np.ndarray:
        """The cost d of every cell (in cell units, i.e. metres / cell size); inf where not allowed
        (blocked, outside the envelope, or more than `max_travel_m` away)."""
        cfg = self.config
        px, py = previous_xy_m[0] / cfg.cell_size_m, previous_xy_m[1] / cfg.cell_size_m
        travel = np.hypot(self._gx_cells - px, self._gy_cells - py)
        if cfg.centre_norm is CentreNorm.MANHATTAN:
            centre = np.abs(self._gx_cells) + np.abs(self._gy_cells)
        else:
            centre = np.maximum(np.abs(self._gx_cells), np.abs(self._gy_cells))
        cost = travel + cfg.alpha * centre
        reachable = travel <= cfg.max_travel_m / cfg.cell_size_m + _TIE_TOLERANCE_CELLS
        return np.where(self.free & reachable, cost, np.inf)

    def next_region(self, previous_xy_m: tuple[float, float]) -> tuple[float, float] | None:
        """Centre (x, y) in metres of the next region, or None: the area is exhausted or every free
        cell is more than `max_travel_m` away (move to a new approach area)."""
        cost = self.costs(previous_xy_m)
        best = float(cost.min())
        if not math.isfinite(best):
            return None
        first = int(np.argmax(cost <= best + _TIE_TOLERANCE_CELLS))  # first tie in row-major order
        iy, ix = divmod(first, self.shape[1])
        return float(self.x_m[iy, ix]), float(self.y_m[iy, ix])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegionPlanner):
            return NotImplemented
        return (
            self.config == other.config
            and self.area_index == other.area_index
            and np.array_equal(self.blocked, other.blocked)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"RegionPlanner(area={self.area_index}, grid={self.shape}, "
            f"free={int(self.free.sum())}/{int(self.usable.sum())})"
        )
