"""SimulatedMicroscope: the instrument state behind the fake Nanonis server (timing, z, approach, motor, probe)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepspm.simulator.clock import SimClock
from deepspm.simulator.dataset import level
from deepspm.simulator.microscope import (
    BIAS_INDEX,
    CURRENT_INDEX,
    SIGNAL_NAMES,
    Z_INDEX,
    MicroscopeError,
    MotorDirection,
    ScanAction,
    SimConfig,
    SimulatedMicroscope,
    TipShaperSettings,
)
from deepspm.simulator.probe import ProbeKind

NM = 1e-9
QUIET = SimConfig(degradation_per_frame=0.0, spontaneous_changes=False, z_jump_rate_per_s=0.0, z_drift_rate_m_per_s=0.0)


def make(config: SimConfig = QUIET, seed: int = 1) -> tuple[SimulatedMicroscope, SimClock]:
    clock = SimClock(0.0)
    return SimulatedMicroscope(seed, clock, config), clock


def nan_rows(data: np.ndarray) -> int:
    return int(np.isnan(data).all(axis=1).sum())


# --- scan timing and frame data -----------------------------------------------------------------------------
def test_default_frame_takes_twelve_seconds_and_fills_line_by_line() -> None:
    m, clock = make()
    assert m.frame_time_s() == pytest.approx(64 * (10 / 80 + 10 / 160))
    assert m.frame_time_s() == pytest.approx(12.0)
    _, data, _ = m.frame_data(Z_INDEX, True)
    assert np.isnan(data).all()  # nothing scanned yet
    m.scan_action(ScanAction.START, True)
    assert m.scan_running()
    clock.advance(0.125)  # exactly one forward line
    assert nan_rows(m.frame_data(Z_INDEX, True)[1]) == 63
    assert nan_rows(m.frame_data(Z_INDEX, False)[1]) == 64  # its backward pass is not done yet
    clock.advance(6.0 - 0.125)
    name, fwd, up = m.frame_data(Z_INDEX, True)
    assert (name, up, fwd.shape, fwd.dtype) == ("Z (m)", True, (64, 64), np.dtype(np.float32))
    assert nan_rows(fwd) == 32 and not np.isnan(fwd[:32]).any()  # acquisition order: scanned rows first
    assert m.scan_time_remaining() == pytest.approx(6.0)
    clock.advance(6.0)
    assert not m.scan_running() and m.scan_time_remaining() == 0.0
    assert not np.isnan(m.frame_data(Z_INDEX, True)[1]).any()
    assert not np.isnan(m.frame_data(Z_INDEX, False)[1]).any()


def test_stop_keeps_the_lines_scanned_and_pause_freezes_progress() -> None:
    m, clock = make()
    m.scan_action(ScanAction.START, False)
    clock.advance(3.0)
    m.scan_action(ScanAction.PAUSE)
    assert m.scan_paused() and m.scan_time_remaining() == math.inf
    clock.advance(100.0)
    assert nan_rows(m.frame_data(Z_INDEX, True)[1]) == 64 - 16
    m.scan_action(ScanAction.RESUME)
    clock.advance(3.0)
    assert m.scan_time_remaining() == pytest.approx(6.0)
    m.scan_action(ScanAction.STOP)
    assert not m.scan_running()
    clock.advance(100.0)
    _, data, up = m.frame_data(Z_INDEX, True)
    assert nan_rows(data) == 32 and up is False


def test_timing_follows_buffer_frame_and_speed() -> None:
    m, clock = make()
    m.set_scan_buffer([Z_INDEX], 100, 0)  # pixels -> multiple of 16; lines 0 keeps the aspect ratio
    assert m.scan_buffer() == ([Z_INDEX], 96, 96)
    m.set_scan_frame(0.0, 0.0, 20 * NM, 10 * NM, 0.0)  # speed is kept: longer lines take longer
    m.set_scan_speed(100 * NM, 200 * NM)
    assert m.scan_speed().fwd_line_s == pytest.approx(0.2)
    assert m.frame_time_s() == pytest.approx(96 * (0.2 + 0.1))
    m.set_scan_line_time(0.5, 0.5, keep_line_time=True)
    m.set_scan_frame(0.0, 0.0, 40 * NM, 40 * NM, 0.0)
    assert m.scan_speed().fwd_m_per_s == pytest.approx(80 * NM)
    m.scan_action(ScanAction.START, True)
    clock.advance(96.0)
    assert not m.scan_running()


def test_up_scan_rows_are_acquisition_order_and_the_switch_gives_top_first() -> None:
    frames = {}
    for acquisition in (True, False):
        for up in (True, False):
            m, clock = make(SimConfig(**{**QUIET.__dict__, "acquisition_order": acquisition}))
            m.scan_action(ScanAction.START, up)
            clock.advance(12.0)
            frames[acquisition, up] = level(m.frame_data(Z_INDEX, True)[1])
    same = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9  # noqa: E731 (same image up to noise)
    assert same(frames[True, True][::-1], frames[True, False])  # up-scan row 0 = bottom line
    assert not same(frames[True, True], frames[True, False])
    assert same(frames[False, True], frames[False, False])  # top first whatever the direction
    assert same(frames[False, True], frames[True, False])


def test_frame_must_fit_the_piezo_range_and_channels_must_be_buffered() -> None:
    m, _ = make()
    assert m.piezo_range() == (850e-9, 850e-9, 1e-6)
    m.set_scan_frame(400 * NM, -400 * NM, 50 * NM, 50 * NM, 0.0)
    with pytest.raises(MicroscopeError):
        m.set_scan_frame(410 * NM, 0.0, 50 * NM, 50 * NM, 0.0)
    with pytest.raises(MicroscopeError):
        m.frame_data(BIAS_INDEX, True)
    assert (SIGNAL_NAMES[CURRENT_INDEX], SIGNAL_NAMES[BIAS_INDEX], SIGNAL_NAMES[Z_INDEX]) == ("Current (A)", "Bias (V)", "Z (m)")
    assert len(m.signal_names()) == 128


def test_continuous_scanning_starts_the_next_frame_and_bouncy_flips_direction() -> None:
    m, clock = make()
    m.set_scan_props(continuous=True, bouncy=True)
    m.scan_action(ScanAction.START, True)
    clock.advance(12.0 + 1.0)
    assert m.scan_running() and m.scan_direction_up() is False
    assert nan_rows(m.frame_data(Z_INDEX, True)[1]) > 56


def test_current_and_bias_channels() -> None:
    m, clock = make()
    m.set_scan_buffer([CURRENT_INDEX, BIAS_INDEX, Z_INDEX], 64, 64)
    m.scan_action(ScanAction.START, True)
    clock.advance(12.0)
    current = m.frame_data(CURRENT_INDEX, True)[1]
    assert np.median(current) == pytest.approx(-25e-12, rel=0.1)  # the setpoint; sign follows the bias (-1 V)
    assert np.all(m.frame_data(BIAS_INDEX, True)[1] == np.float32(-1.0))
    assert m.current_A() == pytest.approx(-25e-12, rel=0.15)
    assert m.signal_value(BIAS_INDEX) == -1.0


# --- z: drift, lost contact, crash ----------------------------------------------------------------------------
def test_drift_away_ends_in_lost_contact_with_z_at_the_extended_limit() -> None:
    m, clock = make(SimConfig(**{**QUIET.__dict__, "z_drift_rate_m_per_s": -1e-9}))
    high, low = m.z_limits()
    assert m.z_extension() == pytest.approx(0.8, abs=0.01)
    clock.advance(100.0)
    assert low < m.z_position_m() < high and not m.ground_truth().lost_contact
    clock.advance(150.0)
    assert m.z_position_m() == low  # saturated: exactly the limit
    assert abs(m.current_A()) < 1e-12
    assert m.ground_truth().lost_contact
    m.scan_action(ScanAction.START, True)
    clock.advance(12.0)
    data = m.frame_data(Z_INDEX, True)[1]
    assert np.ptp(data) == 0.0 and abs(float(data.mean()) - low) <= 0.3 * NM  # the original's lost-contact test


def test_drift_towards_the_sample_ends_in_a_crash_that_damages_the_probe() -> None:
    m, clock = make(SimConfig(**{**QUIET.__dict__, "z_drift_rate_m_per_s": 2e-9}))
    high, _ = m.z_limits()
    clock.advance(390.0)  # z needs 400 s to drift from 80 % extension to the top of the range
    assert m.ground_truth().is_good and m.z_position_m() < high
    m.scan_action(ScanAction.START, True)
    clock.advance(20.0)
    assert m.z_position_m() == high
    assert abs(m.current_A()) == pytest.approx(1e-8)
    gt = m.ground_truth()
    assert gt.in_contact and not gt.is_good
    _, data, _ = m.frame_data(Z_INDEX, True)  # the frame that ran into it ends constant at the high limit
    assert np.all(data[-10:] == np.float32(high)) and data.mean() > 0


def test_z_jumps_eventually_take_the_tip_out_of_range() -> None:
    config = SimConfig(**{**QUIET.__dict__, "z_jump_rate_per_s": 1 / 300, "z_jump_scale_m": 300e-9})
    m, clock = make(config, seed=4)
    high, low = m.z_limits()
    outcomes = set()
    for _ in range(100):
        clock.advance(60.0)
        z = m.z_position_m()
        if z in (high, low):
            outcomes.add("crash" if z == high else "lost")
            break
    assert outcomes


def test_withdraw_home_and_z_position_set() -> None:
    m, clock = make()
    high, low = m.z_limits()
    z0 = m.z_position_m()
    duration = m.withdraw()
    assert duration == pytest.approx((high - z0) / m.config.withdraw_rate_m_per_s, rel=1e-3)
    assert not m.z_controller_on() and m.z_position_m() == high and abs(m.current_A()) < 1e-12
    m.set_home_props(relative=False, z_m=0.0)
    m.home()
    assert m.z_position_m() == 0.0
    m.set_z_position(z0 + 0.5 * NM)  # a little further than the setpoint gap: less current
    assert 0 < abs(m.current_A()) < 25e-12
    m.set_z_controller(True)
    with pytest.raises(MicroscopeError):
        m.set_z_position(0.0)
    assert m.z_position_m() == pytest.approx(z0, abs=0.05 * NM)
    m.set_z_controller(False)
    m.set_z_position(z0 - 2 * NM)  # pushed into the sample
    assert m.ground_truth().in_contact and not m.ground_truth().is_good
    with pytest.raises(MicroscopeError):
        m.set_z_limits(1e-6, 0.0)


# --- approach and motor ---------------------------------------------------------------------------------------
def test_approach_takes_coarse_steps_and_ends_near_full_extension() -> None:
    m, clock = make()
    clock.advance(m.withdraw())
    clock.advance(m.motor_move(MotorDirection.Z_PLUS, 10))  # 500 nm further away: out of reach
    m.auto_approach_start()
    assert m.auto_approach_running() and m.z_controller_on()
    t0 = clock.now()
    while m.auto_approach_running():
        clock.advance(0.5)
    assert clock.now() - t0 >= 5 * m.config.approach_cycle_s
    assert 0.95 <= m.z_extension() < 1.0
    assert m.current_A() == pytest.approx(-25e-12, rel=0.15)
    # within reach: the approach ends at once, where the surface is
    clock.advance(m.withdraw())
    clock.advance(m.motor_move(MotorDirection.Z_MINUS, 2))
    m.auto_approach_start()
    clock.advance(m.config.approach_cycle_s)
    assert not m.auto_approach_running()
    assert 0.85 <= m.z_extension() < 0.91
    assert m.ground_truth().is_good and not m.ground_truth().in_contact  # finding the surface is not a crash


def test_stopping_an_approach_leaves_the_tip_searching() -> None:
    m, clock = make()
    clock.advance(m.withdraw())
    clock.advance(m.motor_move(MotorDirection.Z_PLUS, 20))
    m.auto_approach_start()
    clock.advance(2.0)
    m.auto_approach_stop()
    assert not m.auto_approach_running()
    assert m.ground_truth().lost_contact and m.z_position_m() == m.z_limits()[1]


def test_lateral_coarse_moves_change_the_approach_area_and_surface() -> None:
    m, clock = make()
    m.scan_action(ScanAction.START, True)
    clock.advance(12.0)
    before = level(m.frame_data(Z_INDEX, True)[1])
    clock.advance(m.withdraw())
    duration = m.motor_move(MotorDirection.X_PLUS, 30)
    assert duration == pytest.approx(30 / m.config.motor_frequency_hz)
    assert m.approach_area() == (1, 0) and m.motor_step_counter() == (30, 0, 0)
    assert m.ground_truth().is_good  # withdrawn: the move did not touch the sample
    m.auto_approach_start()
    while m.auto_approach_running():
        clock.advance(0.5)
    m.scan_action(ScanAction.START, True)
    clock.advance(12.0)
    after = level(m.frame_data(Z_INDEX, True)[1])
    assert np.corrcoef(before.ravel(), after.ravel())[0, 1] < 0.5


def test_lateral_move_in_tunnelling_range_damages_the_probe() -> None:
    m, _ = make()
    m.motor_move(MotorDirection.Y_MINUS, 1)
    assert not m.ground_truth().is_good


# --- probe conditioning through the instrument ----------------------------------------------------------------
def test_tip_shaper_props_round_trip_and_duration() -> None:
    m, _ = make()
    props = TipShaperSettings(0.1, True, 0.02, -1.2e-9, 0.2, -1.0, 0.05, 1.2e-9, 0.3, 0.5, True)
    m.set_tip_shaper_props(props)
    assert m.tip_shaper_props() == props
    assert m.tip_shaper_start() == pytest.approx(0.1 + 0.2 + 0.05 + 0.3 + 0.5)
    assert m.bias_V() == -1.0 and m.z_controller_on()


def test_dips_and_big_pulses_usually_damage_a_good_probe_small_pulses_rarely() -> None:
    damaged = {"dip 1.2 nm": 0, "pulse -8 V": 0, "pulse +2.5 V": 0}
    for seed in range(60):
        m, _ = make(seed=seed)
        m.set_tip_shaper_props(TipShaperSettings(tip_lift_m=-1.2e-9, lift_height_m=1.2e-9))
        m.tip_shaper_start()
        damaged["dip 1.2 nm"] += not m.ground_truth().is_good
        m, _ = make(seed=seed)
        m.pulse(0.2, -8.0)
        damaged["pulse -8 V"] += not m.ground_truth().is_good
        m, _ = make(seed=seed)
        m.pulse(0.2, 2.5)
        damaged["pulse +2.5 V"] += not m.ground_truth().is_good
    assert damaged["dip 1.2 nm"] > 40 and damaged["pulse -8 V"] > 40
    assert damaged["pulse +2.5 V"] < 6


def test_actions_far_from_the_sample_do_nothing() -> None:
    for seed in range(20):
        m, clock = make(seed=seed)
        clock.advance(m.withdraw())
        m.set_tip_shaper_props(TipShaperSettings(tip_lift_m=-5e-9, lift_height_m=5e-9, restore_feedback=False))
        m.tip_shaper_start()
        m.pulse(0.2, -8.0)
        assert m.ground_truth().is_good
        assert m.area.debris_sites == []


def test_a_deep_dip_leaves_debris_seen_in_the_next_frame_but_not_the_previous() -> None:
    m, clock = make()
    m.set_scan_frame(0.0, 0.0, 10 * NM, 10 * NM, 0.0)
    m.scan_action(ScanAction.START, True)
    clock.advance(12.0)
    clock.advance(m.set_folme_xy(2 * NM, 1 * NM))
    m.set_tip_shaper_props(TipShaperSettings(tip_lift_m=-5e-9, lift_height_m=5e-9))
    m.tip_shaper_start()
    assert len(m.area.debris_sites) == 1
    before = level(m.frame_data(Z_INDEX, True)[1])  # the frame scanned before the dip stays as it was
    m.set_probe(ProbeKind.GOOD)
    m.scan_action(ScanAction.START, True)
    clock.advance(12.0)
    after = level(m.frame_data(Z_INDEX, True)[1])
    assert np.ptp(after) > np.ptp(before) + 3e-10  # a mound several Angstrom high


def test_folme_position_and_ground_truth_hooks() -> None:
    m, clock = make()
    assert m.set_folme_xy(30 * NM, -40 * NM) == pytest.approx(50 * NM / m.scan_speed().fwd_m_per_s)
    assert m.folme_xy() == (30 * NM, -40 * NM)
    m.scan_action(ScanAction.START, True)
    clock.advance(3.0)
    x, y = m.folme_xy()
    assert abs(x) <= 5 * NM and -5 * NM <= y <= 0.0  # a quarter into an up-scan: lower half of the frame
    m.set_probe(ProbeKind.DOUBLE)
    gt = m.ground_truth()
    assert gt.kind is ProbeKind.DOUBLE and not gt.is_good and len(gt.probe.apices) == 2
    with pytest.raises(MicroscopeError):
        m.set_folme_xy(500 * NM, 0.0)


def test_good_probe_degrades_while_scanning_when_configured() -> None:
    m, clock = make(SimConfig(**{**QUIET.__dict__, "degradation_per_frame": 0.05}))
    frames = 0
    while m.ground_truth().is_good and frames < 500:
        m.scan_action(ScanAction.START, True)
        clock.advance(12.0)
        frames += 1
    assert 2 < frames < 300


# --- artefacts: tip changes, creep, tilt -------------------------------------------------------------------
def test_a_tip_change_happens_during_the_scan_not_at_its_start() -> None:
    m, clock = make(SimConfig(**{**QUIET.__dict__, "degradation_per_frame": 1.0}))
    m.scan_action(ScanAction.START, True)
    states = []
    for _ in range(121):
        states.append(m.ground_truth().is_good)
        clock.advance(0.1)
    assert states[0] and not states[-1]
    switches = sum(a != b for a, b in zip(states, states[1:]))
    assert switches == 1  # good until some line, bad from then on


def test_stopping_the_scan_cancels_a_tip_change_still_to_come() -> None:
    for seed in range(10):
        m, clock = make(SimConfig(**{**QUIET.__dict__, "degradation_per_frame": 1.0}), seed=seed)
        m.scan_action(ScanAction.START, True)
        clock.advance(0.05)
        if m.ground_truth().is_good:
            m.scan_action(ScanAction.STOP)
            clock.advance(100.0)
            assert m.ground_truth().is_good
            return
    raise AssertionError("every change fell in the first 50 ms")


def test_the_first_frame_after_a_move_is_distorted_by_creep_the_second_much_less() -> None:
    ratios = []
    for seed in range(4):
        m, clock = make(seed=seed)
        clock.advance(60.0)
        frames = []
        for _ in range(3):
            m.set_scan_frame(40 * NM, 0.0, 10 * NM, 10 * NM, 0.0)  # 40 nm from where the tip rested
            m.scan_action(ScanAction.START, True)
            clock.advance(12.0)
            frames.append(level(m.frame_data(Z_INDEX, True)[1]))
        ratios.append(np.abs(frames[0] - frames[1]).mean() / np.abs(frames[1] - frames[2]).mean())
    assert min(ratios) > 1.5


def test_raw_frames_carry_the_sample_tilt() -> None:
    from deepspm.simulator.sample import SampleConfig

    m, clock = make(SimConfig(**{**QUIET.__dict__, "sample": SampleConfig(tilt_rms=0.01)}), seed=3)
    m.scan_action(ScanAction.START, True)
    clock.advance(12.0)
    raw = m.frame_data(Z_INDEX, True)[1].astype(float)
    r, c = np.indices(raw.shape)
    design = np.column_stack([np.ones(raw.size), r.ravel(), c.ravel()])
    slope_x = np.linalg.lstsq(design, raw.ravel(), rcond=None)[0][2] / (10 * NM / 64)
    tilt_x = m.area.tilt[0]
    assert abs(tilt_x) > 0.002
    assert slope_x == pytest.approx(tilt_x, abs=0.2 * abs(tilt_x) + 0.001)
