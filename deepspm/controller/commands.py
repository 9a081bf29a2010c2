"""Decisions as data: each command the run loop can emit, one `Instrument` operation each.

Policies return these; the executor performs them in one place and journals each command with its
reply or failure. Because every command maps to exactly one `Instrument` method, a `ReplayInstrument`
can answer a run from its journal and check that the controller asks for the same things in order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class Command:
    op: ClassVar[str]  # the Instrument method, or "settle"/"stall" which need no instrument
    touches_instrument: ClassVar[bool] = True
    meta_fields: ClassVar[tuple[str, ...]] = ()  # journaled, but not passed to the instrument

    def instrument_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.meta_fields}

    def to_record(self) -> dict[str, Any]:
        return {"op": self.op, **asdict(self)}


@dataclass(frozen=True)
class ReadZ(Command):
    op = "z_state"


@dataclass(frozen=True)
class Withdraw(Command):
    op = "withdraw"


@dataclass(frozen=True)
class StartApproach(Command):
    op = "start_approach"


@dataclass(frozen=True)
class ApproachRunning(Command):
    op = "approach_running"


@dataclass(frozen=True)
class StopApproach(Command):
    op = "stop_approach"


@dataclass(frozen=True)
class MotorMove(Command):
    """Coarse steps; `purpose` says which procedure they belong to (journal only)."""

    op = "motor_move"
    meta_fields = ("purpose",)
    direction: int
    steps: int
    purpose: str = ""


@dataclass(frozen=True)
class Wait(Command):
    """Let time pass between polls (approach); like `Settle`, not waited out again when a journal is re-lived."""

    op = "wait"
    touches_instrument = False
    seconds: float


@dataclass(frozen=True)
class Settle(Command):
    """Wait for drift and z creep to settle after an approach (the paper: about 120 s)."""

    op = "settle"
    touches_instrument = False
    seconds: float


@dataclass(frozen=True)
class SetBias(Command):
    op = "set_bias"
    bias_V: float


@dataclass(frozen=True)
class SetSetpoint(Command):
    op = "set_setpoint"
    current_A: float


@dataclass(frozen=True)
class StartScan(Command):
    """Start scanning a frame; `purpose` is "creep" (a partial frame, discarded) or "frame" (journal only)."""

    op = "start_scan"
    meta_fields = ("purpose",)
    centre_x_m: float
    centre_y_m: float
    size_m: float
    purpose: str = "frame"


@dataclass(frozen=True)
class WaitScanEnd(Command):
    op = "wait_scan_end"


@dataclass(frozen=True)
class StopScan(Command):
    op = "stop_scan"


@dataclass(frozen=True)
class GrabFrame(Command):
    """The frame's data so far (NaN where not scanned) and the z state now."""

    op = "grab_frame"


@dataclass(frozen=True)
class Pulse(Command):
    op = "pulse"
    meta_fields = ("action",)
    x_m: float
    y_m: float
    bias_V: float
    width_s: float
    action: int


@dataclass(frozen=True)
class Dip(Command):
    op = "dip"
    meta_fields = ("action",)
    x_m: float
    y_m: float
    depth_m: float
    bias_V: float
    duration_s: float
    action: int


@dataclass(frozen=True)
class Stall(Command):
    """The 'do nothing, scan elsewhere' action: nothing reaches the instrument."""

    op = "stall"
    touches_instrument = False
    action: int


COMMANDS: dict[str, type[Command]] = {
    c.op: c for c in (ReadZ, Withdraw, StartApproach, ApproachRunning, StopApproach, MotorMove, Wait, Settle, SetBias,
                      SetSetpoint, StartScan, WaitScanEnd, StopScan, GrabFrame, Pulse, Dip, Stall)
}


def command_from_record(record: dict[str, Any]) -> Command:
    """Rebuild a command from its journal record (for replay)."""
    data = dict(record)
    cls = COMMANDS[data.pop("op")]
    return cls(**data)
