"""The simulated STM: the whole instrument state that the fake Nanonis server reads and changes.

Methods mirror what Nanonis commands do, in SI units, synchronously. Nothing here sleeps: operations that
take time (pulse, tip shaper, withdraw, motor, FolMe moves) change the state at once and return their
duration in seconds, which the server awaits on the shared `SimClock` when the client asked to wait; the
auto-approach and scans run in simulated time and are polled (`auto_approach_running`, `scan_running`,
`scan_time_remaining`). Invalid requests raise `MicroscopeError` (the server answers with a Nanonis error).

Conventions (documented once, tested):
- z is positive away from the sample. Z range `z_range_m` (default 1 um): limits +z_range/2 (top = fully
  retracted, where Withdraw goes) and -z_range/2 (fully extended). Extension = (high - z) / (high - low).
  Lost contact: the feedback needs z below the low limit; z reads exactly the low limit and the current ~0.
  Crash: the sample is closer than the fully retracted tip can tunnel; z reads exactly the high limit, the
  current saturates (10 nA) and the probe is damaged once per contact.
- Lateral fine-piezo range +-425 nm (`piezo_range()` reports 850e-9 for X and Y). A scan frame must lie
  inside it.
- Coarse motor directions as Nanonis: 0 X+, 1 X-, 2 Y+, 3 Y-, 4 Z+ (away from the sample), 5 Z- (towards).
  A Z step moves the sample `motor_step_z_m` (default 50 nm) relative to the piezo; X/Y steps move
  `motor_step_xy_m` (30 nm); the approach area index is round(coarse offset / 850 nm) per axis, each index
  with its own surface (moving less than half an area keeps the same surface).
- Auto-approach: coarse Z- steps (one per `approach_cycle_s`) until the sample is within the fully extended
  piezo's reach, so it ends with z inside the last step of the range (extension ~0.95-1.0, as a real
  approach), the z-controller on, and fresh z creep. If the sample is already within reach it ends at once.
- Scan timing: a frame takes lines * (width / fwd speed + width / bwd speed) of simulated time; forward line
  k is available after k * T + T_fwd, backward line k after (k + 1) * T; unscanned lines are NaN (whole
  lines, not pixels).
- Row order of frame data: acquisition order (row 0 = first line scanned: the bottom line of an up-scan)
  by default; `SimConfig.acquisition_order=False` returns row 0 = top (+y) edge for both directions. This
  is the simulator's side of the switch `deepspm.io.instrument.FrameOrientation.acquisition_order`.
  Columns run left to right (-x to +x) for forward and backward data alike.
- Channel (signal) indexes follow the RT-signal convention of the vendor examples: 0 = "Current (A)",
  24 = "Bias (V)", 30 = "Z (m)" (see `SIGNAL_NAMES`). Other indexes return zeros.
- State changes while a scan runs (setpoint, bias, pulses) take effect from the next frame; withdraw,
  home, approach and motor moves stop the running scan. Pausing does not shift the rendered drift.
- Ground truth (probe kind, good or not) only through `ground_truth()`, never through the Nanonis path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from deepspm.io.client import ScanFrame
from deepspm.simulator.clock import SimClock
from deepspm.simulator.conditioning import (
    REFERENCE_GAP_M,
    DipEvent,
    Event,
    PulseEvent,
    apply_event,
    crash_damage,
    debris_for,
    spontaneous_change,
)
from deepspm.simulator.hsi import HsiSample, HsiSampleArea, HsiSampleConfig
from deepspm.simulator.hsi_probe import (
    HsiTipState,
    apply_hsi_event,
    hsi_crash_damage,
    hsi_spontaneous_change,
    make_hsi_probe,
)
from deepspm.simulator.piezo import SurfaceZ
from deepspm.simulator.probe import BETA_PER_M, ProbeKind, ProbeState, make_probe
from deepspm.simulator.render import CURRENT_SATURATION_A, FrameGeometry, ScanPlan, Streak
from deepspm.simulator.sample import AREA_PITCH_M, Sample, SampleArea, SampleConfig, area_rng

NM = 1e-9
REFERENCE_SETPOINT_A = 25e-12
CURRENT_INDEX, BIAS_INDEX, Z_INDEX = 0, 24, 30


def _signal_names() -> tuple[str, ...]:
    names = [f"Internal {i} (V)" for i in range(128)]
    names[0] = "Current (A)"
    for i in range(1, 8):
        names[i] = f"Input {i + 1} (V)"
    for i in range(8, 16):
        names[i] = f"Output {i - 7} (V)"
    names[BIAS_INDEX] = "Bias (V)"
    names[Z_INDEX] = "Z (m)"
    return tuple(names)


SIGNAL_NAMES: tuple[str, ...] = _signal_names()

# purposes for keyed generators (each random stream is keyed by (seed, purpose, counter))
_P_PROBE0, _P_SCAN, _P_EVENT, _P_APPROACH, _P_READ, _P_JUMPS, _P_MOTOR = 101, 102, 103, 104, 105, 106, 107


class MicroscopeError(Exception):
    """A request the instrument refuses (the fake server turns it into a Nanonis error reply)."""


class ScanAction(IntEnum):
    START = 0
    STOP = 1
    PAUSE = 2
    RESUME = 3
    FREEZE = 4
    UNFREEZE = 5
    GO_TO_CENTRE = 6


class MotorDirection(IntEnum):
    X_PLUS = 0
    X_MINUS = 1
    Y_PLUS = 2
    Y_MINUS = 3
    Z_PLUS = 4  # away from the sample
    Z_MINUS = 5  # towards the sample


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the simulated instrument. Defaults describe a well-behaved LT-STM; tests turn them up."""

    sample: SampleConfig = field(default_factory=SampleConfig)
    # which surface is imaged: "ag_mgpc" (MgPc on Ag(100), `sample`) or "hsi" (H:Si(100)-(2x1), `hsi_sample`,
    # with its own tip states and conditioning table, see `hsi_probe`)
    surface: str = "ag_mgpc"
    hsi_sample: HsiSampleConfig = field(default_factory=HsiSampleConfig)
    # probe (on H:Si a ProbeKind maps to a tip state: good -> dimers, any bad kind -> blurry)
    initial_probe_kind: ProbeKind | HsiTipState = ProbeKind.GOOD
    degradation_per_frame: float = 0.01  # P(good -> bad) per 64-line frame of scanning
    spontaneous_changes: bool = True  # bad probes also change by themselves while scanning
    # piezo, z
    piezo_xy_range_m: float = 850e-9
    z_range_m: float = 1e-6
    initial_extension: float = 0.8  # the instrument starts in feedback at this extension, creep settled
    z_drift_rate_m_per_s: float | None = None  # None: drawn per approach, N(0, z_drift_rate_rms)
    z_drift_rate_rms_m_per_s: float = 3e-12
    z_creep_amplitude_m: float = 3e-9  # rms creep amplitude after an approach
    z_creep_tau_s: float = 60.0
    z_jump_rate_per_s: float = 1.0 / 7200.0  # sudden z jumps (can cause lost contact or a crash)
    z_jump_scale_m: float = 60e-9
    withdraw_rate_m_per_s: float = 2e-6
    # coarse motor and approach
    motor_step_xy_m: float = 30e-9
    motor_step_z_m: float = 50e-9
    motor_frequency_hz: float = 200.0
    approach_cycle_s: float = 0.5
    area_height_jitter_per_step_m: float = 1e-9
    # xy creep of the fine piezo after a lateral move
    xy_creep_fraction: float = 0.04
    xy_creep_tau_s: float = 5.0
    # scanning and data
    noise_scale: float = 1.0  # multiplies every probe's noise
    acquisition_order: bool = True
    default_pixels: int = 64
    default_frame_m: float = 10e-9
    default_speed_fwd_m_per_s: float = 80e-9
    default_speed_bwd_m_per_s: float = 160e-9

    def __post_init__(self) -> None:
        if self.surface not in SURFACES:
            raise ValueError(f"unknown simulated surface {self.surface!r}; one of {', '.join(SURFACES)}")


SURFACES = ("ag_mgpc", "hsi")


@dataclass(frozen=True)
class GroundTruth:
    kind: ProbeKind | HsiTipState
    is_good: bool
    probe: ProbeState
    area_index: tuple[int, int]
    in_contact: bool  # crashed: the apex touches the sample
    lost_contact: bool  # the feedback cannot reach the sample


@dataclass(frozen=True)
class TipShaperSettings:
    """TipShaper.PropsSet's 11 fields with semantic flags (the server maps the wire codings)."""

    switch_off_delay_s: float = 0.05
    change_bias: bool = True
    bias_V: float = 0.02
    tip_lift_m: float = -1e-9  # first ramp, relative; negative = towards the sample (the dip depth)
    lift_time1_s: float = 0.2
    bias_lift_V: float = -1.0
    bias_settling_s: float = 0.05
    lift_height_m: float = 1e-9  # second ramp, relative, away from the sample
    lift_time2_s: float = 0.2
    end_wait_s: float = 0.05
    restore_feedback: bool = True

    @property
    def duration_s(self) -> float:
        return self.switch_off_delay_s + self.lift_time1_s + self.bias_settling_s + self.lift_time2_s + self.end_wait_s


@dataclass(frozen=True)
class ScanSpeed:
    fwd_m_per_s: float
    bwd_m_per_s: float
    fwd_line_s: float
    bwd_line_s: float
    keep_line_time: bool  # which of speed / time per line stays constant when the frame width changes


@dataclass
class _ScanRun:
    plan: ScanPlan
    paused_since: float | None = None
    paused_total_s: float = 0.0
    stopped_progress_s: float | None = None  # progress when stopped; None while running or completed

    def progress(self, now: float) -> float:
        if self.stopped_progress_s is not None:
            return self.stopped_progress_s
        paused = self.paused_total_s + (now - self.paused_since if self.paused_since is not None else 0.0)
        return min(max(now - self.plan.t_start_s - paused, 0.0), self.plan.duration_s)


@dataclass
class _Approach:
    t_start: float
    t_end: float
    surface_start_m: float
    steps: int


class SimulatedMicroscope:
    """A deterministic simulated STM (same seed and same command sequence -> same data, byte for byte)."""

    def __init__(self, seed: int, clock: SimClock, config: SimConfig | None = None) -> None:
        self.seed = int(seed)
        self.clock = clock
        self.config = c = config or SimConfig()
        self._hsi = c.surface == "hsi"
        self.sample = HsiSample(self.seed, c.hsi_sample) if self._hsi else Sample(self.seed, c.sample)
        self._read_rng = area_rng(self.seed, _P_READ)
        self._local_height_cache: tuple[object, float] = (None, 0.0)
        self._counter = {"scan": 0, "event": 0, "approach": 0, "motor": 0}
        now = clock.now()
        # probe
        self._probe = self._make_probe(c.initial_probe_kind, area_rng(self.seed, _P_PROBE0))
        self._pending_probe: list[tuple[float, int, ProbeState]] = []  # (time, scan id, probe)
        # coarse position and z
        self._coarse_m = [0.0, 0.0, 0.0]
        self._motor_steps = [0, 0, 0]
        self._area_index = (0, 0)
        high, low = c.z_range_m / 2, -c.z_range_m / 2
        self._z_high, self._z_low = high, low
        z_start = high - c.initial_extension * (high - low)
        self._surface = SurfaceZ(z_start, now, self._draw_drift_rate(), c.z_creep_tau_s, c.z_jump_rate_per_s, c.z_jump_scale_m,
                                 area_rng(self.seed, _P_JUMPS))
        self._z_on = True
        self._z_hold_m = z_start
        self._setpoint_A = REFERENCE_SETPOINT_A
        self._bias_V = -1.0
        self._gains = (1e-11, 1.2e-4, 1e-11 / 1.2e-4)
        self._home = (False, 0.0)  # (relative, z)
        self._switch_off_delay_s = 0.05
        self._tip_lift_m = 0.0
        self._in_contact = False
        self._approach: _Approach | None = None
        self._busy_until = now
        # lateral
        self._tip_xy = (0.0, 0.0)
        self._creep_vec = (0.0, 0.0)
        self._creep_t0 = now
        self._folme_speed = (50e-9, False)  # (m/s, custom speed on)
        # scan settings
        self._channels: list[int] = [CURRENT_INDEX, Z_INDEX]
        self._pixels = c.default_pixels
        self._lines = c.default_pixels
        self._frame = ScanFrame(0.0, 0.0, c.default_frame_m, c.default_frame_m, 0.0)
        self._speed_fwd = c.default_speed_fwd_m_per_s
        self._speed_bwd = c.default_speed_bwd_m_per_s
        self._keep_line_time = False
        self._line_time = (c.default_frame_m / self._speed_fwd, c.default_frame_m / self._speed_bwd)
        self._continuous = False
        self._bouncy = False
        self._scan: _ScanRun | None = None
        self._tip_shaper = TipShaperSettings()

    # ==================================================================================== internals ====
    def _rng(self, purpose: int, counter_name: str) -> np.random.Generator:
        self._counter[counter_name] += 1
        return area_rng(self.seed, purpose, self._counter[counter_name])

    def _make_probe(self, kind: ProbeKind | HsiTipState, rng: np.random.Generator) -> ProbeState:
        """A fresh probe of a kind on this surface (a ProbeKind on H:Si: good -> dimers, bad -> blurry)."""
        if not self._hsi:
            if not isinstance(kind, ProbeKind):
                raise ValueError(f"{kind!r} is an H:Si tip state; this simulator images the {self.config.surface} surface")
            return make_probe(kind, rng)
        if isinstance(kind, ProbeKind):
            kind = HsiTipState.DIMERS if kind.is_good else HsiTipState.BLURRY
        return make_hsi_probe(kind, rng)

    def _crash_damage(self, rng: np.random.Generator) -> ProbeState:
        return hsi_crash_damage(rng) if self._hsi else crash_damage(rng)

    def _draw_drift_rate(self) -> float:
        c = self.config
        if c.z_drift_rate_m_per_s is not None:
            return c.z_drift_rate_m_per_s
        n = self._counter["approach"]
        return float(area_rng(self.seed, _P_APPROACH, n, 1).normal(0.0, c.z_drift_rate_rms_m_per_s))

    @property
    def area(self) -> SampleArea | HsiSampleArea:
        return self.sample.area(self._area_index)

    def _gap_shift_m(self, bias_V: float | None = None) -> float:
        """How much further from the sample the setpoint puts the tip than the reference 25 pA / 1 V."""
        v = max(abs(self._bias_V if bias_V is None else bias_V), 1e-4)
        return math.log(v * REFERENCE_SETPOINT_A / max(self._setpoint_A, 1e-15)) / BETA_PER_M

    def _local_height(self, x: float, y: float) -> float:
        """Terrace height and tilt under the tip (molecules ignored), cached per area and position."""
        key = (self._area_index, x, y)
        if self._local_height_cache[0] != key:
            a = self.area
            h = float(a.terrace_height(np.array(x), np.array(y))) + a.tilt[0] * x + a.tilt[1] * y
            self._local_height_cache = (key, h)
        return self._local_height_cache[1]

    def _z_needed(self, t: float) -> float:
        """Piezo z for the setpoint at the tip's position."""
        return self._surface.value(t) + self._gap_shift_m() + self._local_height(*self._tip_xy)

    def _approach_surface(self, t: float) -> float:
        ap = self._approach
        assert ap is not None
        done = min(1.0, (t - ap.t_start) / max(ap.t_end - ap.t_start, 1e-9))
        return ap.surface_start_m + math.floor(done * ap.steps) * self.config.motor_step_z_m

    def _tip_z(self, t: float) -> float:
        if self._z_on or self._approach is not None:
            # in feedback; while approaching that means fully extended until the surface comes within reach
            return min(max(self._z_needed(t), self._z_low), self._z_high)
        return self._z_hold_m

    def _gap_m(self, t: float) -> float:
        """Tip-sample distance (metres) at time t; <= 0 means contact."""
        return REFERENCE_GAP_M + self._tip_z(t) - (self._surface.value(t) + self._local_height(*self._tip_xy))

    def _update(self) -> float:
        """Bring the state up to clock.now(): finished scans and approaches, due tip changes, crashes."""
        now = self.clock.now()
        if self._approach is not None and now >= self._approach.t_end:
            self._finish_approach(self._approach.t_end)
        self._advance_scan(now)
        while self._pending_probe and self._pending_probe[0][0] <= now:
            self._probe = self._pending_probe.pop(0)[2]
        self._check_contact(now)
        return now

    def _check_contact(self, now: float) -> None:
        touching = self._gap_m(now) <= 0.0
        if touching and not self._in_contact:
            self._probe = self._crash_damage(self._rng(_P_EVENT, "event"))
            self._pending_probe.clear()
        self._in_contact = touching

    def _stop_motion(self, now: float) -> None:
        if self._scan is not None and self._scan.stopped_progress_s is None and self._scan_active(now):
            self._stop_scan(now)
        if self._approach is not None:
            self._abort_approach(now)

    # ========================================================================================= bias ====
    def bias_V(self) -> float:
        self._update()
        return self._bias_V

    def set_bias(self, bias_V: float) -> None:
        self._update()
        self._bias_V = float(bias_V)
        self._check_contact(self.clock.now())

    def pulse(self, width_s: float, bias_V: float, z_hold: bool = True, absolute: bool = True) -> float:
        """Bias.Pulse: a pulse of `bias_V` (or bias + bias_V when not absolute) for `width_s`. Returns its duration."""
        now = self._update()
        if not 0 < width_s <= 10.0:
            raise MicroscopeError(f"pulse width {width_s} s out of range (0, 10]")
        volts = float(bias_V) if absolute else self._bias_V + float(bias_V)
        gap = self._gap_m(now)
        if not z_hold and self._z_on:
            gap += self._gap_shift_m(volts) - self._gap_shift_m()  # the feedback follows the pulse bias
        self._apply_event(PulseEvent(volts, float(width_s), gap), now)
        return float(width_s)

    # ==================================================================================== tip shaper ===
    def tip_shaper_props(self) -> TipShaperSettings:
        return self._tip_shaper

    def set_tip_shaper_props(self, props: TipShaperSettings) -> None:
        if props.duration_s < 0 or props.duration_s > 60:
            raise MicroscopeError(f"tip shaper sequence of {props.duration_s} s out of range")
        self._tip_shaper = props

    def tip_shaper_start(self) -> float:
        """TipShaper.Start: run the dip sequence now. Returns its duration."""
        now = self._update()
        p = self._tip_shaper
        self._stop_motion(now)
        z_start = self._tip_z(now)
        gap = self._gap_m(now)
        depth = -p.tip_lift_m
        if depth > 0:
            bias = p.bias_V if p.change_bias else self._bias_V
            self._apply_event(DipEvent(depth, gap, bias, p.lift_time1_s), now)
        if p.change_bias:
            self._bias_V = p.bias_lift_V
        if p.restore_feedback:
            self._z_on = True
        else:
            self._z_on = False
            self._z_hold_m = min(max(z_start + p.tip_lift_m + p.lift_height_m, self._z_low), self._z_high)
        self._in_contact = self._gap_m(now) <= 0.0
        return p.duration_s

    def _apply_event(self, event: Event, now: float) -> None:
        rng = self._rng(_P_EVENT, "event")
        self._pending_probe.clear()
        self._probe = apply_hsi_event(self._probe, event, rng) if self._hsi else apply_event(self._probe, event, rng)
        radius, height = debris_for(event)
        if radius > 0:
            self.area.add_debris(self._tip_xy[0], self._tip_xy[1], radius, height, rng)

    # ========================================================================================= scan ====
    def set_scan_buffer(self, channels: list[int], pixels: int, lines: int) -> None:
        """Scan.BufferSet: pixels are coerced to a multiple of 16; lines = 0 keeps the frame's aspect ratio."""
        self._update()
        channels = [int(ch) for ch in channels]
        if not channels or any(not 0 <= ch < len(SIGNAL_NAMES) for ch in channels):
            raise MicroscopeError(f"invalid channel list {channels}")
        if not 8 <= pixels <= 4096 or lines < 0 or lines > 4096:
            raise MicroscopeError(f"invalid buffer size {pixels} x {lines}")
        pixels = max(16, int(round(pixels / 16)) * 16)
        if lines == 0:
            lines = max(1, int(round(pixels * self._frame.height_m / self._frame.width_m)))
        self._channels, self._pixels, self._lines = channels, pixels, int(lines)

    def scan_buffer(self) -> tuple[list[int], int, int]:
        return list(self._channels), self._pixels, self._lines

    def set_scan_frame(
        self, centre_x_m: float, centre_y_m: float, width_m: float, height_m: float, angle_deg: float = 0.0
    ) -> None:
        self._update()
        if width_m <= 0 or height_m <= 0:
            raise MicroscopeError(f"frame size must be positive, got {width_m} x {height_m}")
        geom = FrameGeometry(centre_x_m, centre_y_m, width_m, height_m, angle_deg, 16, 16)
        xmin, xmax, ymin, ymax = geom.corners()
        half = self.config.piezo_xy_range_m / 2
        if xmin < -half - 1e-12 or xmax > half + 1e-12 or ymin < -half - 1e-12 or ymax > half + 1e-12:
            raise MicroscopeError("scan frame outside the piezo range")
        old_width = self._frame.width_m
        self._frame = ScanFrame(float(centre_x_m), float(centre_y_m), float(width_m), float(height_m), float(angle_deg))
        if self._keep_line_time:
            self._speed_fwd = width_m / self._line_time[0]
            self._speed_bwd = width_m / self._line_time[1]
        elif width_m != old_width:
            self._line_time = (width_m / self._speed_fwd, width_m / self._speed_bwd)

    def scan_frame(self) -> ScanFrame:
        return self._frame

    def set_scan_speed(self, fwd_m_per_s: float, bwd_m_per_s: float, keep_line_time: bool | None = None) -> None:
        if fwd_m_per_s <= 0 or bwd_m_per_s <= 0:
            raise MicroscopeError("scan speeds must be positive")
        self._speed_fwd, self._speed_bwd = float(fwd_m_per_s), float(bwd_m_per_s)
        w = self._frame.width_m
        self._line_time = (w / self._speed_fwd, w / self._speed_bwd)
        if keep_line_time is not None:
            self._keep_line_time = bool(keep_line_time)

    def set_scan_line_time(self, fwd_s: float, bwd_s: float, keep_line_time: bool | None = None) -> None:
        if fwd_s <= 0 or bwd_s <= 0:
            raise MicroscopeError("times per line must be positive")
        w = self._frame.width_m
        self.set_scan_speed(w / fwd_s, w / bwd_s, keep_line_time)

    def scan_speed(self) -> ScanSpeed:
        return ScanSpeed(self._speed_fwd, self._speed_bwd, self._line_time[0], self._line_time[1], self._keep_line_time)

    def set_scan_props(self, continuous: bool | None = None, bouncy: bool | None = None) -> None:
        if continuous is not None:
            self._continuous = bool(continuous)
        if bouncy is not None:
            self._bouncy = bool(bouncy)

    def scan_props(self) -> tuple[bool, bool]:
        return self._continuous, self._bouncy

    def frame_time_s(self) -> float:
        """Duration of one frame with the current buffer, frame and speeds."""
        return self._lines * (self._line_time[0] + self._line_time[1])

    def scan_action(self, action: int, direction_up: bool = True) -> None:
        """Scan.Action: 0 start, 1 stop, 2 pause, 3 resume, 4 freeze, 5 unfreeze, 6 go to centre."""
        now = self._update()
        action = ScanAction(int(action))
        run = self._scan
        active = run is not None and self._scan_active(now)
        if action is ScanAction.START:
            if active:
                self._stop_scan(now)
            self._start_scan(now, bool(direction_up))
        elif action is ScanAction.STOP:
            if active:
                self._stop_scan(now)
        elif action in (ScanAction.PAUSE, ScanAction.FREEZE):
            if active and run is not None and run.paused_since is None:
                run.paused_since = now
        elif action in (ScanAction.RESUME, ScanAction.UNFREEZE):
            if active and run is not None and run.paused_since is not None:
                run.paused_total_s += now - run.paused_since
                run.paused_since = None
        elif action is ScanAction.GO_TO_CENTRE:
            if active:
                self._stop_scan(now)
            self._move_tip(self._frame.x_m, self._frame.y_m, now)

    def scan_running(self) -> bool:
        now = self._update()
        return self._scan is not None and self._scan_active(now)

    def scan_paused(self) -> bool:
        now = self._update()
        return self._scan is not None and self._scan_active(now) and self._scan.paused_since is not None

    def scan_time_remaining(self) -> float:
        """Simulated seconds until the running frame completes (0 when no scan runs; inf while paused)."""
        now = self._update()
        run = self._scan
        if run is None or not self._scan_active(now):
            return 0.0
        if run.paused_since is not None:
            return math.inf
        return run.plan.duration_s - run.progress(now)

    def scan_progress(self) -> tuple[float, float, int] | None:
        """(seconds scanned so far, seconds per line (fwd + bwd), lines) of the running frame; None if none runs."""
        now = self._update()
        run = self._scan
        if run is None or not self._scan_active(now):
            return None
        return run.progress(now), run.plan.line_s, run.plan.geometry.lines

    def scan_direction_up(self) -> bool:
        return self._scan.plan.geometry.scan_up if self._scan is not None else True

    def _scan_active(self, now: float) -> bool:
        run = self._scan
        return run is not None and run.stopped_progress_s is None and run.progress(now) < run.plan.duration_s

    def _stop_scan(self, now: float) -> None:
        run = self._scan
        assert run is not None
        run.stopped_progress_s = run.progress(now)
        run.paused_since = None
        self._pending_probe = [p for p in self._pending_probe if p[0] <= now]
        self._tip_xy = (self._frame.x_m, self._frame.y_m)

    def _advance_scan(self, now: float) -> None:
        """Continuous scanning: start the next frame(s) when one completes."""
        run = self._scan
        while (
            self._continuous and run is not None and run.stopped_progress_s is None and run.paused_since is None
            and run.progress(now) >= run.plan.duration_s
        ):
            end = run.plan.t_start_s + run.paused_total_s + run.plan.duration_s
            up = run.plan.geometry.scan_up
            self._start_scan(end, (not up) if self._bouncy else up)
            run = self._scan

    def _move_tip(self, x: float, y: float, now: float) -> None:
        """Record a lateral fine-piezo move: the creep still to come grows along the move."""
        dx, dy = x - self._tip_xy[0], y - self._tip_xy[1]
        if math.hypot(dx, dy) < 1e-10:
            return
        c = self.config
        decay = math.exp(-max(now - self._creep_t0, 0.0) / c.xy_creep_tau_s) if c.xy_creep_tau_s > 0 else 0.0
        self._creep_vec = (self._creep_vec[0] * decay + c.xy_creep_fraction * dx,
                           self._creep_vec[1] * decay + c.xy_creep_fraction * dy)
        self._creep_t0 = now
        self._tip_xy = (x, y)

    def _start_scan(self, t0: float, scan_up: bool) -> None:
        c = self.config
        f = self._frame
        self._move_tip(f.x_m, f.y_m, t0)
        geom = FrameGeometry(f.x_m, f.y_m, f.width_m, f.height_m, f.angle_deg, self._pixels, self._lines, scan_up)
        self._counter["scan"] += 1
        scan_id = self._counter["scan"]
        rng = area_rng(self.seed, _P_SCAN, scan_id)
        fwd_s, bwd_s = self._line_time
        line_s = fwd_s + bwd_s
        probe = self._probe
        kernels: list[tuple] = []
        buckling: list[float] = []
        kernel_map = np.zeros((geom.lines, geom.pixels), dtype=np.int8)
        streaks: list[Streak] = []

        def add_segment(p: ProbeState, row0: int, col0: int) -> None:
            base = len(kernels)
            kernels.append(p.apices)
            buckling.append(p.buckling)
            rows = np.arange(row0, geom.lines)
            if p.flicker_apices and p.flicker_rate > 0 and len(rows):
                kernels.append(p.flicker_apices)
                buckling.append(p.buckling)
                flips = rng.random(len(rows)) < p.flicker_rate
                state = np.cumsum(flips) % 2
                idx = base + state
            else:
                idx = np.full(len(rows), base)
            if len(rows):
                kernel_map[row0 + 1 :, :] = idx[1:, None]
                kernel_map[row0, col0:] = idx[0]
            if p.streak_rate > 0:
                for r in rows:
                    for _ in range(int(rng.poisson(p.streak_rate))):
                        amp = float(rng.uniform(0.5, 2.5)) * 1e-10 * (1.0 if rng.random() < 0.7 else -0.6)
                        streaks.append(Streak(int(r), int(rng.integers(0, geom.pixels)), int(rng.geometric(1 / 6)), amp))

        add_segment(probe, 0, 0)
        new_probe = None
        if self._hsi:
            if c.spontaneous_changes:
                new_probe = hsi_spontaneous_change(probe, geom.lines / 64.0, rng)
        elif probe.is_good or c.spontaneous_changes:
            new_probe = spontaneous_change(probe, c.degradation_per_frame, geom.lines / 64.0, rng)
        self._pending_probe = [p for p in self._pending_probe if p[0] <= t0]
        if new_probe is not None:
            row = int(rng.integers(0, geom.lines))
            col = int(rng.integers(0, geom.pixels))
            add_segment(new_probe, row, col)
            t_change = t0 + row * line_s + (col + 0.5) / geom.pixels * fwd_s
            self._pending_probe.append((t_change, scan_id, new_probe))
        noise = c.noise_scale
        surface = self._surface
        gap_shift = self._gap_shift_m()
        z_mode = "feedback" if (self._z_on and self._approach is None) else "hold"
        z_hold = self._z_low if self._approach is not None else self._z_hold_m
        plan = ScanPlan(
            seed=self.seed, scan_id=scan_id, area=self.area, geometry=geom, t_start_s=t0,
            fwd_line_s=fwd_s, bwd_line_s=bwd_s, kernels=tuple(kernels), kernel_map=kernel_map,
            noise_m=probe.noise_m * noise, line_noise_m=probe.line_noise_m * noise, streaks=tuple(streaks),
            z_needed=lambda t: surface(t) + gap_shift, z_low_m=self._z_low, z_high_m=self._z_high,
            z_mode=z_mode, z_hold_m=z_hold, setpoint_A=self._setpoint_A, bias_V=self._bias_V,
            creep_m=self._creep_vec, creep_t0_s=self._creep_t0, creep_tau_s=c.xy_creep_tau_s,
            debris_count=len(self.area.debris_sites),
            kernel_buckling=tuple(buckling) if any(buckling) else (),
        )
        self._scan = _ScanRun(plan)

    def _visible_rows(self, run: _ScanRun, forward: bool, now: float) -> int:
        plan = run.plan
        progress = run.progress(now)
        if progress >= plan.duration_s and run.stopped_progress_s is None:
            return plan.geometry.lines
        offset = plan.fwd_line_s if forward else plan.line_s
        if progress < offset:
            return 0
        return min(plan.geometry.lines, int((progress - offset) // plan.line_s) + 1)

    def frame_data(self, channel_index: int, forward: bool = True) -> tuple[str, np.ndarray, bool]:
        """Scan.FrameDataGrab: (channel name, (lines, pixels) float32 with NaN for unscanned lines, scan up?)."""
        now = self._update()
        channel_index = int(channel_index)
        if channel_index not in self._channels:
            raise MicroscopeError(f"channel {channel_index} is not in the scan buffer {self._channels}")
        name = SIGNAL_NAMES[channel_index]
        run = self._scan
        if run is None:
            return name, np.full((self._lines, self._pixels), np.nan, dtype=np.float32), True
        plan = run.plan
        g = plan.geometry
        n = self._visible_rows(run, forward, now)
        data = np.full((g.lines, g.pixels), np.nan, dtype=np.float32)
        if n:
            if channel_index == Z_INDEX:
                full = plan.z(forward)
            elif channel_index == CURRENT_INDEX:
                full = plan.current(forward)
            elif channel_index == BIAS_INDEX:
                full = np.full((g.lines, g.pixels), plan.bias_V, dtype=np.float32)
            else:
                full = np.zeros((g.lines, g.pixels), dtype=np.float32)
            data[:n] = full[:n]
        if not self.config.acquisition_order and g.scan_up:
            data = data[::-1].copy()
        return name, data, g.scan_up

    # ================================================================================== z-controller ===
    def z_controller_on(self) -> bool:
        self._update()
        return self._z_on or self._approach is not None

    def set_z_controller(self, on: bool) -> None:
        now = self._update()
        if bool(on) == self._z_on:
            return
        if not on:
            self._z_hold_m = self._tip_z(now)
        self._z_on = bool(on)
        self._check_contact(now)

    def z_status(self) -> int:
        """ZCtrl.StatusGet coding: 1 off, 2 on."""
        return 2 if self.z_controller_on() else 1

    def z_position_m(self) -> float:
        """ZCtrl.ZPosGet: the piezo z; exactly at a limit when saturated, otherwise with ~3 pm of noise."""
        now = self._update()
        z = self._tip_z(now)
        if self._z_on and self._approach is None and self._z_low < z < self._z_high:
            z += float(self._read_rng.normal(0.0, 3e-12))
            z = min(max(z, self._z_low), self._z_high)
        return z

    def set_z_position(self, z_m: float) -> None:
        """ZCtrl.ZPosSet: only with the z-controller off."""
        now = self._update()
        if self._z_on:
            raise MicroscopeError("ZPosSet needs the Z-controller off")
        self._z_hold_m = min(max(float(z_m), self._z_low), self._z_high)
        self._check_contact(now)

    def z_limits(self) -> tuple[float, float]:
        """(high, low) in metres."""
        return self._z_high, self._z_low

    def set_z_limits(self, high_m: float, low_m: float) -> None:
        half = self.config.z_range_m / 2
        if not -half <= low_m < high_m <= half:
            raise MicroscopeError(f"z limits must satisfy -{half} <= low < high <= {half}")
        self._update()
        self._z_high, self._z_low = float(high_m), float(low_m)
        self._z_hold_m = min(max(self._z_hold_m, self._z_low), self._z_high)
        self._check_contact(self.clock.now())

    def setpoint_A(self) -> float:
        return self._setpoint_A

    def set_setpoint(self, current_A: float) -> None:
        if current_A <= 0 or current_A > CURRENT_SATURATION_A:
            raise MicroscopeError(f"setpoint {current_A} A out of range")
        self._update()
        self._setpoint_A = float(current_A)
        self._check_contact(self.clock.now())

    def z_gains(self) -> tuple[float, float, float]:
        """(P gain, time constant s, I gain) as ZCtrl.GainGet reports them (stored; the simulated loop is ideal)."""
        return self._gains

    def set_z_gains(self, p: float, time_constant_s: float, i: float | None = None) -> None:
        self._gains = (float(p), float(time_constant_s), float(i) if i is not None else float(p) / max(time_constant_s, 1e-12))

    def withdraw(self) -> float:
        """ZCtrl.Withdraw: controller off, tip to the top of the range. Returns the time it takes."""
        now = self._update()
        self._stop_motion(now)
        z = self._tip_z(now)
        self._z_on = False
        self._z_hold_m = self._z_high
        self._check_contact(now)
        return max(self._z_high - z, 0.0) / self.config.withdraw_rate_m_per_s

    def withdrawn(self) -> bool:
        """Ground truth for audits: the z-controller is off, no approach runs, and the tip is held at (or on its
        way to) the top of the z range. Reads state only: no time passes, no random number is drawn."""
        return not self._z_on and self._approach is None and self._z_hold_m >= self._z_high - 1e-12

    def home_props(self) -> tuple[bool, float]:
        """(relative, z_m)."""
        return self._home

    def set_home_props(self, relative: bool, z_m: float) -> None:
        self._home = (bool(relative), float(z_m))

    def home(self) -> float:
        """ZCtrl.Home: controller off, z to the home position. Returns the time it takes."""
        now = self._update()
        self._stop_motion(now)
        z = self._tip_z(now)
        relative, target = self._home
        target = z + target if relative else target
        self._z_on = False
        self._z_hold_m = min(max(target, self._z_low), self._z_high)
        self._check_contact(now)
        return abs(self._z_hold_m - z) / self.config.withdraw_rate_m_per_s

    def switch_off_delay_s(self) -> float:
        return self._switch_off_delay_s

    def set_switch_off_delay(self, delay_s: float) -> None:
        self._switch_off_delay_s = float(delay_s)

    def tip_lift_m(self) -> float:
        return self._tip_lift_m

    def set_tip_lift(self, lift_m: float) -> None:
        self._tip_lift_m = float(lift_m)

    # ==================================================================================== approach ====
    def auto_approach_start(self) -> None:
        """AutoApproach.OnOffSet(1): returns at once; poll `auto_approach_running`."""
        now = self._update()
        if self._approach is not None:
            return
        self._stop_motion(now)
        c = self.config
        self._counter["approach"] += 1
        needed = self._z_needed(now)
        if needed >= self._z_low:
            steps = 0
            duration = c.approach_cycle_s
        else:
            steps = int(math.ceil((self._z_low - needed) / c.motor_step_z_m))
            duration = steps * c.approach_cycle_s + c.approach_cycle_s
        self._approach = _Approach(now, now + duration, self._surface.value(now), steps)
        self._z_on = True

    def auto_approach_stop(self) -> None:
        now = self._update()
        if self._approach is not None:
            self._abort_approach(now)

    def auto_approach_running(self) -> bool:
        self._update()
        return self._approach is not None

    def auto_approach_time_remaining(self) -> float:
        """Simulated seconds until the running auto-approach ends (0 when none runs)."""
        now = self._update()
        return 0.0 if self._approach is None else max(self._approach.t_end - now, 0.0)

    def _abort_approach(self, now: float) -> None:
        surface = self._approach_surface(now)
        self._approach = None
        self._surface.rebase(now, surface - self._surface.value(now))
        self._check_contact(now)

    def _finish_approach(self, t_end: float) -> None:
        c = self.config
        ap = self._approach
        assert ap is not None
        steps_done = ap.steps
        self._approach = None
        delta = ap.surface_start_m + steps_done * c.motor_step_z_m - self._surface.value(t_end)
        rng = area_rng(self.seed, _P_APPROACH, self._counter["approach"])
        creep = float(rng.normal(0.0, c.z_creep_amplitude_m)) if steps_done else 0.0
        self._surface.rebase(t_end, delta, creep)
        self._surface.rate_m_per_s = self._draw_drift_rate()
        self._motor_steps[2] -= steps_done
        self._coarse_m[2] += steps_done * c.motor_step_z_m
        self._z_on = True
        self._check_contact(t_end)

    # ======================================================================================= motor =====
    def motor_move(self, direction: int, steps: int) -> float:
        """Motor.StartMove: coarse steps. Returns the time the move takes."""
        now = self._update()
        direction = MotorDirection(int(direction))
        steps = int(steps)
        if steps < 0 or steps > 65535:
            raise MicroscopeError(f"invalid step count {steps}")
        if steps == 0:
            return 0.0
        c = self.config
        self._stop_motion(now)
        rng = self._rng(_P_MOTOR, "motor")
        if direction in (MotorDirection.Z_PLUS, MotorDirection.Z_MINUS):
            sign = -1.0 if direction is MotorDirection.Z_PLUS else 1.0  # Z+ takes the sample away: more extension needed
            self._surface.rebase(now, sign * steps * c.motor_step_z_m, float(rng.normal(0.0, 0.3 * c.z_creep_amplitude_m)))
            self._motor_steps[2] += steps if direction is MotorDirection.Z_PLUS else -steps
            self._coarse_m[2] -= sign * steps * c.motor_step_z_m
        else:
            if self._gap_m(now) < 2 * NM:
                # dragging the tip over the surface
                self._probe = self._crash_damage(rng)
                self._pending_probe.clear()
            axis = 0 if direction in (MotorDirection.X_PLUS, MotorDirection.X_MINUS) else 1
            sign = 1.0 if direction in (MotorDirection.X_PLUS, MotorDirection.Y_PLUS) else -1.0
            self._motor_steps[axis] += int(sign) * steps
            self._coarse_m[axis] += sign * steps * c.motor_step_xy_m * float(1.0 + 0.05 * rng.normal())
            old_area = self.area
            self._area_index = (int(round(self._coarse_m[0] / AREA_PITCH_M)), int(round(self._coarse_m[1] / AREA_PITCH_M)))
            new_area = self.area
            jitter = float(rng.normal(0.0, c.area_height_jitter_per_step_m * math.sqrt(steps)))
            self._surface.rebase(now, new_area.base_z_m - old_area.base_z_m + jitter,
                                 float(rng.normal(0.0, 0.3 * c.z_creep_amplitude_m)))
        self._check_contact(now)
        return steps / c.motor_frequency_hz

    def motor_stop(self) -> None:
        """Motor.StopMove: moves complete at once in the simulator, so there is nothing to stop."""
        self._update()

    def motor_step_counter(self, reset: tuple[bool, bool, bool] = (False, False, False)) -> tuple[int, int, int]:
        counts = tuple(self._motor_steps)
        for i, r in enumerate(reset):
            if r:
                self._motor_steps[i] = 0
        return counts  # type: ignore[return-value]

    def motor_position_m(self) -> tuple[float, float, float]:
        return tuple(self._coarse_m)  # type: ignore[return-value]

    def approach_area(self) -> tuple[int, int]:
        return self._area_index

    # ===================================================================================== piezo, xy ===
    def piezo_range(self) -> tuple[float, float, float]:
        """Piezo.RangeGet: (x, y, z) in metres."""
        c = self.config
        return c.piezo_xy_range_m, c.piezo_xy_range_m, c.z_range_m

    def folme_xy(self) -> tuple[float, float]:
        """FolMe.XYPosGet: the tip position (along the scan line while a scan runs)."""
        now = self._update()
        run = self._scan
        if run is not None and self._scan_active(now):
            g = run.plan.geometry
            progress = run.progress(now)
            line = min(int(progress // run.plan.line_s), g.lines - 1)
            within = progress - line * run.plan.line_s
            fwd = run.plan.fwd_line_s
            frac = within / fwd if within < fwd else 1.0 - (within - fwd) / run.plan.bwd_line_s
            u = (frac - 0.5) * g.width_m
            v = float(g.v()[line])
            (ux, uy), (vx, vy) = g.axes()
            return g.centre_x_m + u * ux + v * vx, g.centre_y_m + u * uy + v * vy
        return self._tip_xy

    def set_folme_xy(self, x_m: float, y_m: float) -> float:
        """FolMe.XYPosSet: move the tip (stops a running scan). Returns the time the move takes."""
        now = self._update()
        half = self.config.piezo_xy_range_m / 2
        if abs(x_m) > half or abs(y_m) > half:
            raise MicroscopeError("position outside the piezo range")
        if self._scan is not None and self._scan_active(now):
            self._stop_scan(now)
        distance = math.hypot(x_m - self._tip_xy[0], y_m - self._tip_xy[1])
        self._move_tip(float(x_m), float(y_m), now)
        speed = self._folme_speed[0] if self._folme_speed[1] else self._speed_fwd
        return distance / speed

    def folme_speed(self) -> tuple[float, bool]:
        return self._folme_speed

    def set_folme_speed(self, speed_m_per_s: float, custom: bool) -> None:
        if speed_m_per_s <= 0:
            raise MicroscopeError("speed must be positive")
        self._folme_speed = (float(speed_m_per_s), bool(custom))

    # =================================================================================== signals ======
    def current_A(self) -> float:
        """Current.Get: the tunnelling current (setpoint in feedback, ~0 out of range, saturated in contact)."""
        now = self._update()
        gap = self._gap_m(now)
        if gap <= 0.0:
            return math.copysign(CURRENT_SATURATION_A, self._bias_V or 1.0)
        i = REFERENCE_SETPOINT_A * max(abs(self._bias_V), 1e-4) * math.exp(-BETA_PER_M * min(gap - REFERENCE_GAP_M, 3e-8))
        i = min(i, CURRENT_SATURATION_A) * (1.0 + 0.02 * float(self._read_rng.normal()))
        i += float(self._read_rng.normal(0.0, 2e-14))  # preamplifier noise floor
        return math.copysign(abs(i), self._bias_V or 1.0)

    def signal_names(self) -> list[str]:
        return list(SIGNAL_NAMES)

    def signal_value(self, index: int) -> float:
        index = int(index)
        if not 0 <= index < len(SIGNAL_NAMES):
            raise MicroscopeError(f"signal index {index} out of range 0-127")
        if index == CURRENT_INDEX:
            return self.current_A()
        if index == BIAS_INDEX:
            return self.bias_V()
        if index == Z_INDEX:
            return self.z_position_m()
        return 0.0

    # ============================================================================ ground truth, hooks ===
    def ground_truth(self) -> GroundTruth:
        """The probe's true state (for evaluation code and tests; never reachable through Nanonis)."""
        now = self._update()
        lost = self._approach is None and self._z_on and self._z_needed(now) < self._z_low
        return GroundTruth(self._probe.kind, self._probe.is_good, self._probe, self._area_index, self._in_contact, lost)

    def set_probe(self, probe: ProbeState | ProbeKind | HsiTipState, rng: np.random.Generator | None = None) -> None:
        """Replace the probe (tests, data-set synthesis). A kind draws fresh parameters."""
        self._update()
        if isinstance(probe, (ProbeKind, HsiTipState)):
            probe = self._make_probe(probe, rng if rng is not None else self._rng(_P_EVENT, "event"))
        self._probe = probe
        self._pending_probe.clear()

    def inject_z_jump(self, dz_m: float) -> None:
        """Shift the sample by `dz_m` in z now (positive = closer to the tip): forces lost contact or a crash."""
        now = self._update()
        self._surface.rebase(now, float(dz_m))
        self._check_contact(now)

    def z_extension(self) -> float:
        """0 = fully retracted (top of the range), 1 = fully extended; as `deepspm.io.instrument.ZState`."""
        return (self._z_high - self.z_position_m()) / (self._z_high - self._z_low)
