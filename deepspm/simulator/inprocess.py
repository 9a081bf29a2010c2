"""The instrument operations performed directly on a `SimulatedMicroscope`, synchronously (no TCP, no event
loop): what the synchronous engine drives when the run's plans train or evaluate in simulation.

Each method does what `io.instrument.NanonisInstrument` asks of a Nanonis over TCP, with the same conventions
(extension, frame orientation, the tip shaper for dips), and advances the simulated clock by the time the
operation takes. Ground truth stays available through `ground_truth()` for reports, never for a decision.
"""

from __future__ import annotations

from deepspm.io.instrument import (
    DipSettings,
    Frame,
    FrameOrientation,
    PiezoRange,
    ScanSettings,
    ZState,
    frame_from_buffer,
)
from deepspm.simulator.clock import SimClock
from deepspm.simulator.microscope import Z_INDEX, GroundTruth, SimConfig, SimulatedMicroscope, TipShaperSettings


class InProcessInstrument:
    """`io.instrument.OPERATIONS` on an in-process simulated microscope, plus `wait` (simulated seconds)."""

    def __init__(self, seed: int, config: SimConfig | None = None, *, scan: ScanSettings | None = None,
                 dip: DipSettings | None = None, orientation: FrameOrientation | None = None) -> None:
        self.clock = SimClock(0.0)
        self.microscope = SimulatedMicroscope(seed, self.clock, config)
        self.scan_settings = scan or ScanSettings()
        self.dip_settings = dip or DipSettings()
        self.orientation = orientation or FrameOrientation()
        self._configured: tuple[float, ...] | None = None
        self._frame: tuple[float, float, float] | None = None

    def ground_truth(self) -> GroundTruth:
        return self.microscope.ground_truth()

    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # -- the operations ------------------------------------------------------------------------------------------
    def piezo_range(self) -> PiezoRange:
        return PiezoRange(*self.microscope.piezo_range())

    def z_state(self) -> ZState:
        m = self.microscope
        high, low = m.z_limits()
        return ZState(m.z_position_m(), low, high, m.z_controller_on())

    def withdraw(self) -> None:
        self.clock.advance(self.microscope.withdraw())

    def start_approach(self) -> None:
        self.microscope.auto_approach_start()

    def approach_running(self) -> bool:
        return self.microscope.auto_approach_running()

    def stop_approach(self) -> None:
        self.microscope.auto_approach_stop()

    def motor_move(self, direction: int, steps: int) -> None:
        self.clock.advance(self.microscope.motor_move(direction, steps))

    def set_bias(self, bias_V: float) -> None:
        self.microscope.set_bias(bias_V)

    def set_setpoint(self, current_A: float) -> None:
        self.microscope.set_setpoint(current_A)

    def start_scan(self, centre_x_m: float, centre_y_m: float, size_m: float) -> None:
        m, s = self.microscope, self.scan_settings
        key = (size_m, s.pixels, s.fwd_speed_mps, s.bwd_speed_mps)
        if self._configured != key:
            m.set_scan_buffer([Z_INDEX], s.pixels, s.pixels)
            m.set_scan_speed(s.fwd_speed_mps, s.bwd_speed_mps)
            self._configured = key
        m.set_scan_frame(centre_x_m, centre_y_m, size_m, size_m, 0.0)
        m.scan_action(0, s.scan_up)
        self._frame = (centre_x_m, centre_y_m, size_m)

    def wait_scan_end(self) -> None:
        self.clock.advance(self.microscope.scan_time_remaining())

    def stop_scan(self) -> None:
        self.microscope.scan_action(1)

    def grab_frame(self) -> Frame:
        if self._frame is None:
            raise RuntimeError("grab_frame before start_scan")
        name, data, up = self.microscope.frame_data(Z_INDEX, True)
        return frame_from_buffer(data, up, name, self._frame, self.orientation, self.z_state())

    def pulse(self, x_m: float, y_m: float, bias_V: float, width_s: float) -> None:
        m = self.microscope
        self.clock.advance(m.set_folme_xy(x_m, y_m))
        self.clock.advance(m.pulse(width_s, bias_V, z_hold=True, absolute=True))

    def dip(self, x_m: float, y_m: float, depth_m: float, bias_V: float, duration_s: float) -> None:
        m, d = self.microscope, self.dip_settings
        m.set_tip_shaper_props(TipShaperSettings(
            switch_off_delay_s=d.switch_off_delay_s, change_bias=True, bias_V=bias_V, tip_lift_m=-depth_m,
            lift_time1_s=duration_s, bias_lift_V=m.bias_V(), bias_settling_s=d.bias_settling_s,
            lift_height_m=depth_m, lift_time2_s=duration_s, end_wait_s=d.end_wait_s, restore_feedback=True,
        ))
        self.clock.advance(m.set_folme_xy(x_m, y_m))
        self.clock.advance(m.tip_shaper_start())
