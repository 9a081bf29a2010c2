"""The probe-conditioning actions (DeepSPM's action table, reference section 3.1), in SI units.

They live in `io` because they are instrument operations (a bias pulse, a tip-shaper dip): the
controller, the simulator's RL environment and the nets all index the same table. The two rows of the
original that can never pass the area check (+8 V pulse, the measurement row) are dropped, leaving the
paper's 12 actions; `original_row` keeps the link to the original table.

Units: `forbidden_radius_m` is a *radius* (the original used the value as a radius although its README
called it a diameter); `required_side_m` is the side of the clean square the action needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ActionKind(str, Enum):
    STALL = "stall"
    PULSE = "pulse"
    DIP = "dip"


@dataclass(frozen=True)
class ConditioningAction:
    index: int
    name: str
    kind: ActionKind
    bias_V: float  # pulse voltage, or the bias held during a dip
    duration_s: float  # pulse width, or the time spent at the bottom of a dip
    dip_depth_m: float  # how far the tip moves towards the sample (positive = towards); 0 unless a dip
    forbidden_radius_m: float
    required_side_m: float
    reset: bool  # drawn at random to re-damage the probe in training mode
    original_row: int


_NM = 1e-9


def _pulse(i: int, v: float, row: int, reset: bool = False) -> ConditioningAction:
    return ConditioningAction(i, f"pulse {v:+g} V", ActionKind.PULSE, v, 0.2, 0.0, 10 * _NM, 0.0, reset, row)


def _dip(i: int, depth_nm: float, required_nm: float, radius_nm: float, row: int) -> ConditioningAction:
    return ConditioningAction(
        i, f"dip {depth_nm:g} nm", ActionKind.DIP, 0.02, 0.2, depth_nm * _NM, radius_nm * _NM, required_nm * _NM, True, row
    )


ACTIONS: tuple[ConditioningAction, ...] = (
    ConditioningAction(0, "stall", ActionKind.STALL, 0.0, 0.0, 0.0, 50 * _NM, 0.0, False, 0),
    _pulse(1, 2.5, 1),
    _pulse(2, 4.0, 2),
    _pulse(3, -2.5, 4),
    _pulse(4, -4.0, 5),
    _pulse(5, -8.0, 6, reset=True),
    _dip(6, 0.8, 1, 10, 7),
    _dip(7, 1.0, 1, 10, 8),
    _dip(8, 1.2, 2, 10, 9),
    _dip(9, 1.8, 2, 10, 10),
    _dip(10, 2.5, 3, 25, 11),
    _dip(11, 5.0, 4, 25, 12),
)
N_ACTIONS = len(ACTIONS)
RESET_ACTIONS: tuple[int, ...] = tuple(a.index for a in ACTIONS if a.reset)
MEASUREMENT_FORBIDDEN_RADIUS_M = 5 * _NM  # a data scan blocks its own cell (original row 13)


def allowed_mask(free_side_m: float) -> list[bool]:
    """Which actions fit a clean square of side `free_side_m` (reference section 3.2, step 6)."""
    return [a.required_side_m <= free_side_m + 1e-15 for a in ACTIONS]
