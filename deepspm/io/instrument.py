"""The high-level operations the controller uses, and `NanonisInstrument`, which performs them over the client.

Conventions (explicit because the original left them unchecked, reference deepspm.md section 8 item 13):
- z is positive away from the sample; `ZState.extension` is 0 at the top of the z range (retracted) and 1 at
  the bottom (fully extended towards the sample). Lost contact = extension near 1, crash = near 0.
- `Frame.data_m` has row 0 at the top (+y) edge and column 0 at the left (-x) edge, whatever the scan
  direction; `FrameOrientation` says how the server orders rows (reference nanonis-tcp.md section 4).
- Nothing here retries an operation that changes the instrument; every step goes through the client and
  therefore through the safety envelope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from deepspm.io.client import NanonisClient, TipShaperProps
from deepspm.io.commands import Release
from deepspm.io.errors import InstrumentError


class ApproachFailed(InstrumentError):
    """The auto-approach did not finish within its deadline (the approach was stopped)."""


class ScanFailed(InstrumentError):
    """A scan did not end within its deadline (the scan was stopped)."""


@dataclass(frozen=True)
class PiezoRange:
    x_m: float
    y_m: float
    z_m: float


@dataclass(frozen=True)
class ZState:
    z_m: float
    z_low_m: float
    z_high_m: float
    controller_on: bool

    @property
    def extension(self) -> float:
        """0 = fully retracted (top of the range), 1 = fully extended towards the sample."""
        span = self.z_high_m - self.z_low_m
        return float((self.z_high_m - self.z_m) / span) if span > 0 else float("nan")


@dataclass(frozen=True)
class Frame:
    data_m: np.ndarray  # (lines, pixels) float32 heights; row 0 = top (+y) edge
    centre_x_m: float
    centre_y_m: float
    size_m: float
    channel_name: str
    scan_up: bool
    complete: bool  # False when lines are missing (NaN)
    z_after: ZState  # the z piezo right after the scan: lost contact and crashes show here


@dataclass(frozen=True)
class FrameOrientation:
    """How the server orders a frame's rows: acquisition order (row 0 = first line scanned) or top first."""

    acquisition_order: bool = True


@dataclass(frozen=True)
class ScanSettings:
    pixels: int = 64
    fwd_speed_mps: float = 80e-9
    bwd_speed_mps: float = 160e-9
    z_channel_name: str = "Z (m)"
    scan_up: bool = True
    timeout_margin_s: float = 30.0


@dataclass(frozen=True)
class ApproachSettings:
    timeout_s: float = 600.0
    poll_s: float = 1.0
    target_extension: float = 0.8
    extension_tolerance: float = 0.08
    z_steps_per_adjust: int = 1
    max_adjustments: int = 20
    towards_sample_direction: int = 5  # Motor direction that closes the gap (5 = Z-)
    away_from_sample_direction: int = 4
    crash_retract_steps: int = 3
    area_move_steps: int = 30  # coarse steps between approach areas
    area_move_direction: int = 0  # Motor direction code towards the next approach area (0 = X+)
    withdraw_timeout_s: float = 10.0


@dataclass(frozen=True)
class DipSettings:
    switch_off_delay_s: float = 0.05
    bias_settling_s: float = 0.05
    end_wait_s: float = 0.5  # the original waited 500 ms after every action
    timeout_s: float = 30.0


# The single instrument operations the controller performs, each one journaled command. Composite procedures
# (approach and poll, set the z extension, retract after a crash, change approach area) are plan stubs in
# `deepspm.controller.plans` built from these, so every step is journaled, replayed and resumable.
OPERATIONS: tuple[str, ...] = (
    "piezo_range", "z_state", "withdraw", "start_approach", "approach_running", "stop_approach", "motor_move",
    "set_bias", "set_setpoint", "start_scan", "wait_scan_end", "stop_scan", "grab_frame", "pulse", "dip",
)


@runtime_checkable
class Instrument(Protocol):
    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def piezo_range(self) -> PiezoRange: ...
    async def z_state(self) -> ZState: ...
    async def withdraw(self) -> None: ...
    async def start_approach(self) -> None: ...
    async def approach_running(self) -> bool: ...
    async def stop_approach(self) -> None: ...
    async def motor_move(self, direction: int, steps: int) -> None: ...
    async def set_bias(self, bias_V: float) -> None: ...
    async def set_setpoint(self, current_A: float) -> None: ...
    async def start_scan(self, centre_x_m: float, centre_y_m: float, size_m: float) -> None: ...
    async def wait_scan_end(self) -> None: ...
    async def stop_scan(self) -> None: ...
    async def grab_frame(self) -> Frame: ...
    async def pulse(self, x_m: float, y_m: float, bias_V: float, width_s: float) -> None: ...
    async def dip(self, x_m: float, y_m: float, depth_m: float, bias_V: float, duration_s: float) -> None: ...


@dataclass
class NanonisInstrument:
    """`Instrument` over the Nanonis TCP client."""

    client: NanonisClient
    scan_settings: ScanSettings = field(default_factory=ScanSettings)
    approach_settings: ApproachSettings = field(default_factory=ApproachSettings)
    dip_settings: DipSettings = field(default_factory=DipSettings)
    orientation: FrameOrientation = field(default_factory=FrameOrientation)
    _z_channel: int | None = None
    _configured: tuple | None = None
    _range: PiezoRange | None = None
    _frame: tuple[float, float, float] | None = None  # (centre x, centre y, size) of the last frame started

    async def connect(self) -> None:
        await self.client.connect()
        await self.piezo_range()
        if self.client.release == Release.R10862:  # scan channels are signal-slot indexes there
            names, _ = await self.client.signals_in_slots()
        else:
            names = await self.client.signal_names()
        try:
            self._z_channel = names.index(self.scan_settings.z_channel_name)
        except ValueError:
            raise InstrumentError(f"signal {self.scan_settings.z_channel_name!r} not among the server's signals") from None

    async def close(self) -> None:
        await self.client.close()

    async def piezo_range(self) -> PiezoRange:
        r = await self.client.piezo_range_get()  # also teaches the safety envelope the range
        self._range = PiezoRange(r.x_m, r.y_m, r.z_m)
        return self._range

    async def z_state(self) -> ZState:
        z = await self.client.z_pos_get()
        high, low = await self.client.z_limits_get()
        on = await self.client.z_ctrl_on_get()
        return ZState(z, low, high, on)

    async def withdraw(self) -> None:
        await self.client.z_withdraw(self.approach_settings.withdraw_timeout_s)

    async def start_approach(self) -> None:
        """Start the auto-approach; it runs on the controller until it ends (poll `approach_running`)."""
        await self.client.auto_approach_set(True)

    async def approach_running(self) -> bool:
        return await self.client.auto_approach_running()

    async def stop_approach(self) -> None:
        await self.client.auto_approach_set(False)

    async def motor_move(self, direction: int, steps: int) -> None:
        """Coarse steps (direction 0 X+, 1 X-, 2 Y+, 3 Y-, 4 Z+, 5 Z-); the safety envelope requires the
        tip withdrawn."""
        await self.client.motor_start_move(direction, steps)

    async def _configure_scan(self, size_m: float) -> None:
        s = self.scan_settings
        key = (size_m, s.pixels, s.fwd_speed_mps, s.bwd_speed_mps)
        if self._configured == key:
            return
        if self._z_channel is None:
            raise InstrumentError("scan before connect(): the z channel is not known yet")
        await self.client.scan_buffer_set([self._z_channel], s.pixels, s.pixels)
        await self.client.scan_speed_set(s.fwd_speed_mps, s.bwd_speed_mps)
        self._configured = key

    def frame_time_s(self, size_m: float) -> float:
        return frame_time_s(self.scan_settings, size_m)

    async def set_bias(self, bias_V: float) -> None:
        await self.client.bias_set(bias_V)

    async def set_setpoint(self, current_A: float) -> None:
        await self.client.z_setpoint_set(current_A)

    async def start_scan(self, centre_x_m: float, centre_y_m: float, size_m: float) -> None:
        """Configure the buffer and speeds (once), set the frame and start scanning; returns at once."""
        await self._configure_scan(size_m)
        await self.client.scan_frame_set(centre_x_m, centre_y_m, size_m, size_m, 0.0)
        await self.client.scan_start(self.scan_settings.scan_up)
        self._frame = (centre_x_m, centre_y_m, size_m)

    async def wait_scan_end(self, poll_s: float = 1.0) -> None:
        """Block until the running frame ends (its frame time plus a margin); a scan that overruns is stopped.

        Scan.WaitEndOfScan waits for the *next* end when no scan runs, so a frame that ended while the run was
        busy (levelling, judging) would look like an overrun: the scan status is checked first, and the wait is
        made in short slices that re-check it (`poll_s`, instrument seconds)."""
        x, y, size = await self._scan_frame()
        timeout_s = self.frame_time_s(size) + self.scan_settings.timeout_margin_s
        for _ in range(max(1, math.ceil(timeout_s / poll_s))):
            if not await self.client.scan_status():
                return
            timed_out, _ = await self.client.scan_wait_end(poll_s)
            if not timed_out:
                return
        await self.client.scan_stop()
        raise ScanFailed(f"scan at ({x:.3g}, {y:.3g}) m did not end within {timeout_s:.0f} s; stopped")

    async def stop_scan(self) -> None:
        await self.client.scan_stop()

    async def grab_frame(self) -> Frame:
        """The forward z data of the frame being scanned, top row first (NaN where not scanned), and z now."""
        if self._z_channel is None:
            raise InstrumentError("grab_frame before connect()")
        where = await self._scan_frame()
        grabbed = await self.client.scan_frame_data_grab(self._z_channel, forward=True)
        return frame_from_buffer(grabbed.data, grabbed.scan_up, grabbed.channel_name, where, self.orientation,
                                 await self.z_state())

    async def _scan_frame(self) -> tuple[float, float, float]:
        """(centre x, centre y, size) of the frame being scanned: the one this process started, or, when a
        resumed run carries on with a scan its killed predecessor started, the instrument's own (Scan.FrameGet)."""
        if self._frame is None:
            f = await self.client.scan_frame_get()
            self._frame = (f.x_m, f.y_m, f.width_m)
        return self._frame

    async def scan(self, centre_x_m: float, centre_y_m: float, size_m: float) -> Frame:
        """One whole frame (start, wait for its end, grab): for scripts and benchmarks. The run scans through
        the plan stub `controller.plans.scan_frame`, which checks z during the frame."""
        await self.start_scan(centre_x_m, centre_y_m, size_m)
        await self.wait_scan_end()
        return await self.grab_frame()

    async def pulse(self, x_m: float, y_m: float, bias_V: float, width_s: float) -> None:
        await self.client.folme_xy_set(x_m, y_m)
        await self.client.bias_pulse(width_s, bias_V, z_hold=1, absolute=True)

    async def dip(self, x_m: float, y_m: float, depth_m: float, bias_V: float, duration_s: float) -> None:
        """Move the tip `depth_m` towards the sample at `bias_V`, hold, and come back (the tip shaper)."""
        d = self.dip_settings
        scan_bias = await self.client.bias_get()
        props = TipShaperProps(
            switch_off_delay_s=d.switch_off_delay_s, change_bias=1, bias_V=bias_V, tip_lift_m=-depth_m,
            lift_time1_s=duration_s, bias_lift_V=scan_bias, bias_settling_s=d.bias_settling_s,
            lift_height_m=depth_m, lift_time2_s=duration_s, end_wait_s=d.end_wait_s, restore_feedback=1,
        )
        await self.client.folme_xy_set(x_m, y_m)
        await self.client.tip_shaper_props_set(props)
        await self.client.tip_shaper_start(d.timeout_s)


def frame_time_s(settings: ScanSettings, size_m: float) -> float:
    """Seconds one square frame takes: `pixels` lines, each forward and back."""
    return settings.pixels * line_time_s(settings, size_m)


def line_time_s(settings: ScanSettings, size_m: float) -> float:
    """Seconds one scan line takes, forward and back (0.1875 s at the paper's 10 nm, 80 and 160 nm/s)."""
    return size_m / settings.fwd_speed_mps + size_m / settings.bwd_speed_mps


def frame_from_buffer(data: np.ndarray, scan_up: bool, channel: str, where: tuple[float, float, float],
           orientation: FrameOrientation, z_after: ZState) -> Frame:
    """A grabbed buffer as a `Frame`: top row first whatever the scan direction, float32, NaN where unscanned."""
    if orientation.acquisition_order and scan_up:
        data = data[::-1]  # an up-scan acquires the bottom line first
    data = np.ascontiguousarray(data, dtype=np.float32)
    x, y, size = where
    return Frame(data, x, y, size, channel, scan_up, not np.isnan(data).any(), z_after)
