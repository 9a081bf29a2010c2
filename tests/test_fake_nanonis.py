"""The simulated microscope over the real Nanonis protocol: real sockets on 127.0.0.1, simulated time only.

Three kinds of clients drive `SimulatorServer`: raw requests through our codec (every command of the table,
every release, Set/Get codings, errors), the vendor's own `nanonis_spm` in a worker thread, and our
`NanonisInstrument` over `NanonisClient` with the safety envelope. Values read over the wire are checked
against the microscope's Python API and its ground truth. Nothing here waits on the wall clock: at time
scale 0 simulated time only moves with requests; the time-scale > 0 tests inject the clock's wall.
"""

from __future__ import annotations

import asyncio
import copy
import math
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from deepspm.controller import plans
from deepspm.controller.commands import Wait
from deepspm.io.client import NanonisClient
from deepspm.io.commands import TABLE, Release, lookup
from deepspm.io.connection import Backoff, NanonisConnection
from deepspm.io.errors import ConnectionLost, NanonisError
from deepspm.io.instrument import ApproachSettings, NanonisInstrument
from deepspm.io.safety import SafetyEnvelope, SafetyLimits
from deepspm.simulator.clock import SimClock
from deepspm.simulator.conditioning import DipEvent, PulseEvent, debris_for
from deepspm.simulator.fake_nanonis import (
    DEFAULT_COMMAND_LATENCY_S,
    SLOT_SIGNALS,
    SimulatorServer,
    microscope_handlers,
    serve_forever,
)
from deepspm.simulator.faults import ErrorReply
from deepspm.simulator.microscope import Z_INDEX, SimConfig, SimulatedMicroscope
from deepspm.simulator.probe import ProbeKind

pytestmark = pytest.mark.timeout(60)

STEP_S = 5.0  # bound on any single network exchange
FRAME_10NM_S = 64 * (10e-9 / 80e-9 + 10e-9 / 160e-9)  # 12 s: 64 lines at 80/160 nm/s


class RawClient:
    """Our connection without the typed client or the safety envelope: any command, any arguments."""

    def __init__(self, port: int, release: Release = Release.R14718) -> None:
        self.conn = NanonisConnection("127.0.0.1", port, backoff=Backoff(attempts=1))
        self.release = release

    async def __aenter__(self) -> RawClient:
        await self.conn.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def call(self, name: str, *args: Any) -> tuple[int, str, dict[str, Any]]:
        spec = lookup(name)
        message = await self.conn.request(spec.name, spec.encode_args(args, self.release), STEP_S)
        reply = spec.decode_reply(message.body, self.release)
        return reply.status, reply.message, reply.values

    async def ok(self, name: str, *args: Any) -> dict[str, Any]:
        status, message, values = await self.call(name, *args)
        assert status == 0, f"{name}{args} failed: {message}"
        return values

    async def fails(self, name: str, *args: Any) -> str:
        status, message, _ = await self.call(name, *args)
        assert status == 1, f"{name}{args} should have failed"
        assert len(message) > 4 and message.isascii()
        return message


def our_client(port: int, limits: SafetyLimits | None = None) -> NanonisClient:
    return NanonisClient(NanonisConnection("127.0.0.1", port, backoff=Backoff(attempts=1)), SafetyEnvelope(limits))


# -- every command ---------------------------------------------------------------------------------------------

TIPSHAPER_ARGS = (0.05, 1, 0.02, -1e-9, 0.2, -1.0, 0.05, 1e-9, 0.2, 0.05, 1)
CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("Util.VersionGet", ()), ("Util.SessionPathGet", ()), ("Util.SessionPathSet", ("C:\\data\\sim", 0)),
    ("Util.AcqPeriodGet", ()), ("Util.RTFreqGet", ()), ("Piezo.RangeGet", ()),
    ("Signals.NamesGet", ()), ("Signals.ValGet", (30, 1)), ("Signals.ValsGet", ([0, 24, 30], 0)),
    ("Signals.RangeGet", (30,)), ("Signals.InSlotsGet", ()),
    ("Bias.RangeGet", ()), ("Bias.RangeSet", (0,)), ("Bias.Set", (-1.0,)), ("Bias.Get", ()),
    ("Current.Get", ()), ("Current.GainsGet", ()), ("Current.GainSet", (2, -1)),
    ("ZCtrl.SetpntSet", (25e-12,)), ("ZCtrl.SetpntGet", ()), ("ZCtrl.GainSet", (1e-11, 1e-4, 1e-7)),
    ("ZCtrl.GainGet", ()), ("ZCtrl.LimitsSet", (5e-7, -5e-7)), ("ZCtrl.LimitsGet", ()),
    ("ZCtrl.LimitsEnabledSet", (1,)), ("ZCtrl.LimitsEnabledGet", ()), ("ZCtrl.SwitchOffDelaySet", (0.05,)),
    ("ZCtrl.SwitchOffDelayGet", ()), ("ZCtrl.TipLiftSet", (0.0,)), ("ZCtrl.TipLiftGet", ()),
    ("ZCtrl.WithdrawRateSet", (2e-6,)), ("ZCtrl.WithdrawRateGet", ()), ("ZCtrl.HomePropsSet", (1, 1e-7)),
    ("ZCtrl.HomePropsGet", ()), ("ZCtrl.ZPosGet", ()), ("ZCtrl.StatusGet", ()), ("ZCtrl.OnOffGet", ()),
    ("SafeTip.OnOffSet", (1,)), ("SafeTip.OnOffGet", ()), ("FolMe.SpeedSet", (50e-9, 1)), ("FolMe.SpeedGet", ()),
    ("FolMe.XYPosSet", (1e-9, 2e-9, 1)), ("FolMe.XYPosGet", (1,)), ("FolMe.Stop", ()),
    ("Bias.Pulse", (1, 0.1, 2.5, 1, 2)),
    ("TipShaper.PropsSet", TIPSHAPER_ARGS), ("TipShaper.PropsGet", ()), ("TipShaper.Start", (1, 5000)),
    ("Scan.BufferSet", ([0, 30], 64, 64)), ("Scan.BufferGet", ()), ("Scan.FrameSet", (0.0, 0.0, 10e-9, 10e-9, 0.0)),
    ("Scan.FrameGet", ()), ("Scan.SpeedSet", (80e-9, 160e-9, 0.0, 0.0, 1, 2.0)), ("Scan.SpeedGet", ()),
    ("Scan.PropsSet", (2, 2, 3, "sim_", "a comment", [], 3)), ("Scan.PropsGet", ()),
    ("Scan.Action", (0, 1)), ("Scan.StatusGet", ()), ("Scan.WaitEndOfLine", (5000,)), ("Scan.XYPosGet", (0,)),
    ("Scan.FrameDataGrab", (30, 1)), ("Scan.WaitEndOfScan", (60000,)), ("Scan.Save", (1, 5000)),
    ("ZCtrl.Withdraw", (1, 5000)), ("ZCtrl.OnOffSet", (0,)), ("ZCtrl.ZPosSet", (1e-7,)), ("ZCtrl.Home", ()),
    ("Motor.FreqAmpSet", (200.0, 100.0, 0)), ("Motor.FreqAmpGet", (0,)), ("Motor.PosGet", (0, 500)),
    ("Motor.StartMove", (4, 2, 0, 1)), ("Motor.StopMove", ()), ("Motor.StepCounterGet", (0, 0, 0)),
    ("Motor.StartClosedLoop", (1, 0.0, 0.0, 0.0, 1, 0)),
    ("AutoApproach.Open", ()), ("AutoApproach.OnOffSet", (1,)), ("AutoApproach.OnOffGet", ()),
    ("AutoApproach.OnOffSet", (0,)),
]
RELEASE_ARGS: dict[Release, dict[str, tuple[Any, ...]]] = {
    Release.R10862: {
        "Scan.PropsSet": (2, 2, 3, "sim_", "a comment"), "Current.GainSet": (2,), "Motor.PosGet": (),
        "Motor.FreqAmpGet": (), "Motor.StartClosedLoop": (1, 0.0, 0.0, 0.0, 1),
        "Scan.BufferSet": ([0, 14], 64, 64), "Scan.FrameDataGrab": (14, 1),  # signal slots: 14 = Z
    },
    Release.R13742: {"Scan.PropsSet": (2, 2, 3, "sim_", "a comment", [])},
    Release.R14718: {},
}
REFUSED = {"Motor.StartClosedLoop"}


def test_every_command_of_the_table_has_a_handler():
    clock = SimClock(0.0)
    handlers = microscope_handlers(SimulatedMicroscope(1, clock), clock)
    assert set(handlers) == {spec.name for spec in TABLE.values()}
    assert {name for name, _ in CALLS} == set(handlers)  # the wire test below calls every one


def test_the_microscope_must_share_the_clock():
    with pytest.raises(ValueError):
        microscope_handlers(SimulatedMicroscope(1, SimClock(0.0)), SimClock(0.0))


@pytest.mark.parametrize("release", list(Release))
async def test_every_command_of_the_release_answers_over_the_wire(release):
    async with SimulatorServer(seed=1, release=release, record=True) as sim, RawClient(sim.port, release) as raw:
        for name, args in CALLS:
            spec = lookup(name)
            if release not in spec.layouts:
                continue
            args = RELEASE_ARGS[release].get(name, args)
            status, message, values = await raw.call(name, *args)
            if name in REFUSED:
                assert status == 1 and "not supported" in message
            else:
                assert status == 0, f"{name} failed: {message}"
                assert set(values) == {f.name for f in spec.layout(release).reply}
        events = {e.kind for e in sim.server.events}
        assert "handler_error" not in events and "server_error" not in events


async def test_r10862_scan_channels_are_signal_slots():
    async with SimulatorServer(seed=1, release=Release.R10862) as sim, RawClient(sim.port, Release.R10862) as raw:
        slots = await raw.ok("Signals.InSlotsGet")
        assert slots["indexes"] == list(SLOT_SIGNALS) and slots["names"][14] == "Z (m)"
        await raw.ok("Scan.BufferSet", [14], 64, 64)
        assert sim.microscope.scan_buffer()[0] == [Z_INDEX]
        assert (await raw.ok("Scan.BufferGet"))["channels"] == [14]
        await raw.ok("Scan.Action", 0, 1)
        await raw.ok("Scan.WaitEndOfScan", -1)
        grabbed = await raw.ok("Scan.FrameDataGrab", 14, 1)
        assert grabbed["channel_name"] == "Z (m)"
        np.testing.assert_array_equal(grabbed["data"], sim.microscope.frame_data(Z_INDEX)[1])
        assert "0..3" in await raw.fails("Scan.Action", 4, 1)  # freeze exists from R13742 only
        assert await raw.fails("Scan.BufferSet", [24], 64, 64)  # slots 0-23 only


# -- Set and Get agree, with their different codings ----------------------------------------------------------


async def test_set_and_get_codings():
    async with SimulatorServer(seed=2) as sim, RawClient(sim.port) as raw:
        m = sim.microscope
        await raw.ok("Scan.PropsSet", 1, 1, 2, "series_", "hello", ["Bias", "Z-Controller"], 3)
        props = await raw.ok("Scan.PropsGet")
        assert (props["continuous"], props["bouncy"], props["autosave"], props["autopaste"]) == (1, 1, 1, 2)
        assert (props["series"], props["comment"], props["modules"]) == ("series_", "hello", ["Bias", "Z-Controller"])
        assert m.scan_props() == (True, True)
        await raw.ok("Scan.PropsSet", 0, 2, 0, "", "", [], 0)  # no change, except bouncy off
        props = await raw.ok("Scan.PropsGet")
        assert (props["continuous"], props["bouncy"], props["autosave"], props["series"]) == (1, 0, 1, "series_")

        await raw.ok("Scan.SpeedSet", 0.0, 0.0, 0.2, 0.1, 2, 0.0)  # times per line, keep time
        speed = await raw.ok("Scan.SpeedGet")
        assert speed["keep"] == 1 and m.scan_speed().keep_line_time
        assert speed["fwd_line_time_s"] == pytest.approx(0.2) and speed["fwd_speed_mps"] == pytest.approx(10e-9 / 0.2)
        await raw.ok("Scan.SpeedSet", 100e-9, 0.0, 0.0, 0.0, 1, 2.0)  # speed, backward from the ratio, keep speed
        speed = await raw.ok("Scan.SpeedGet")
        assert speed["keep"] == 0 and speed["bwd_speed_mps"] == pytest.approx(200e-9)
        assert speed["bwd_fwd_ratio"] == pytest.approx(2.0)

        await raw.ok("TipShaper.PropsSet", *TIPSHAPER_ARGS[:1], 2, *TIPSHAPER_ARGS[2:10], 2)  # flags: 2 = no
        shaper = await raw.ok("TipShaper.PropsGet")
        assert (shaper["change_bias"], shaper["restore_feedback"]) == (0, 0)
        await raw.ok("TipShaper.PropsSet", *TIPSHAPER_ARGS[:1], 0, *TIPSHAPER_ARGS[2:10], 1)  # 0 = no change
        shaper = await raw.ok("TipShaper.PropsGet")
        assert (shaper["change_bias"], shaper["restore_feedback"]) == (0, 1)
        assert shaper["tip_lift_m"] == pytest.approx(-1e-9) and m.tip_shaper_props().tip_lift_m == pytest.approx(-1e-9)

        await raw.ok("ZCtrl.HomePropsSet", 2, 5e-8)
        assert await raw.ok("ZCtrl.HomePropsGet") == {"mode": 1, "z_m": pytest.approx(5e-8)}
        await raw.ok("ZCtrl.HomePropsSet", 0, 6e-8)
        assert await raw.ok("ZCtrl.HomePropsGet") == {"mode": 1, "z_m": pytest.approx(6e-8)}
        await raw.ok("SafeTip.OnOffSet", 2)
        assert (await raw.ok("SafeTip.OnOffGet"))["on"] == 0
        await raw.ok("SafeTip.OnOffSet", 0)
        assert (await raw.ok("SafeTip.OnOffGet"))["on"] == 0

        await raw.ok("ZCtrl.SetpntSet", 50e-12)
        assert m.setpoint_A() == pytest.approx(50e-12)
        await raw.ok("ZCtrl.WithdrawRateSet", 1e-6)
        assert m.config.withdraw_rate_m_per_s == pytest.approx(1e-6)
        await raw.ok("Motor.FreqAmpSet", 500.0, 90.0, 0)
        assert await raw.ok("Motor.FreqAmpGet", 3) == {"frequency_Hz": 500.0, "amplitude_V": 90.0}
        await raw.ok("Current.GainSet", 4, 2)
        gains = await raw.ok("Current.GainsGet")
        assert (gains["gain_index"], gains["filter_index"]) == (4, 2)
        await raw.ok("Current.GainSet", 1, -1)
        assert (await raw.ok("Current.GainsGet"))["filter_index"] == 2


async def test_reads_agree_with_the_microscope():
    async with SimulatorServer(seed=3) as sim, RawClient(sim.port) as raw:
        m = sim.microscope
        names = (await raw.ok("Signals.NamesGet"))["names"]
        assert names == m.signal_names() and len(names) == 128 and names[Z_INDEX] == "Z (m)"
        assert (await raw.ok("Piezo.RangeGet")) == pytest.approx({"x_m": 850e-9, "y_m": 850e-9, "z_m": 1e-6})
        high, low = m.z_limits()
        assert await raw.ok("ZCtrl.LimitsGet") == {"high_m": pytest.approx(high), "low_m": pytest.approx(low)}
        z = (await raw.ok("ZCtrl.ZPosGet"))["z_m"]
        assert z == pytest.approx(m.z_position_m(), abs=3e-11)
        assert (await raw.ok("Signals.ValGet", Z_INDEX, 0))["value"] == pytest.approx(m.z_position_m(), abs=3e-11)
        assert (await raw.ok("Current.Get"))["current_A"] == pytest.approx(-25e-12, rel=0.2)  # bias -1 V, 25 pA
        await raw.ok("Bias.Set", 0.5)
        assert m.bias_V() == pytest.approx(0.5)
        assert (await raw.ok("Bias.Get"))["bias_V"] == pytest.approx(0.5)
        await raw.ok("FolMe.XYPosSet", 3e-9, -4e-9, 1)
        assert await raw.ok("FolMe.XYPosGet", 0) == pytest.approx({"x_m": 3e-9, "y_m": -4e-9})
        assert await raw.ok("ZCtrl.StatusGet") == {"status": 2}
        await raw.ok("ZCtrl.Withdraw", 1, -1)
        assert await raw.ok("ZCtrl.StatusGet") == {"status": 1}
        assert (await raw.ok("ZCtrl.ZPosGet"))["z_m"] == pytest.approx(high)
        assert (await raw.ok("ZCtrl.OnOffGet"))["on"] == 0 and not m.z_controller_on()


async def test_z_reads_the_drift_and_lost_contact_and_crashes():
    config = SimConfig(z_drift_rate_m_per_s=1e-9, z_jump_rate_per_s=0.0, z_creep_amplitude_m=0.0)
    async with SimulatorServer(seed=14, config=config) as sim, RawClient(sim.port) as raw:
        m = sim.microscope
        high, low = m.z_limits()
        z0 = (await raw.ok("ZCtrl.ZPosGet"))["z_m"]
        sim.clock.advance(50.0)
        z1 = (await raw.ok("ZCtrl.ZPosGet"))["z_m"]
        assert z1 - z0 == pytest.approx(50e-9, abs=0.2e-9)  # the feedback follows the drifting sample

        sim.at(sim.clock.now() + 10.0, lambda micro: micro.inject_z_jump(-400e-9))  # the sample drops away
        await raw.ok("Scan.WaitEndOfScan", 5000)  # nothing scans: 5 s pass
        assert (await raw.ok("ZCtrl.ZPosGet"))["z_m"] == pytest.approx(z1 + 5e-9, abs=0.2e-9)  # drifting, no jump yet
        await raw.ok("Scan.WaitEndOfScan", 6000)
        assert (await raw.ok("ZCtrl.ZPosGet"))["z_m"] == pytest.approx(low)  # fully extended: lost contact
        assert abs((await raw.ok("Current.Get"))["current_A"]) < 1e-12
        assert m.ground_truth().lost_contact and m.ground_truth().is_good

        sim.at(0.0, lambda micro: micro.inject_z_jump(+1.3e-6))  # already due: runs before the next request
        assert (await raw.ok("ZCtrl.ZPosGet"))["z_m"] == pytest.approx(high)  # fully retracted and still touching
        assert abs((await raw.ok("Current.Get"))["current_A"]) == pytest.approx(10e-9)  # saturated
        truth = m.ground_truth()
        assert truth.in_contact and not truth.is_good  # a crash damages the probe


async def test_invalid_requests_get_clear_nanonis_errors():
    async with SimulatorServer(seed=4) as sim, RawClient(sim.port) as raw:
        assert "piezo range" in await raw.fails("Scan.FrameSet", 400e-9, 0.0, 100e-9, 100e-9, 0.0)
        assert "not in the scan buffer" in await raw.fails("Scan.FrameDataGrab", 5, 1)
        assert "Z-controller off" in await raw.fails("ZCtrl.ZPosSet", 0.0)
        assert "direction" in await raw.fails("Motor.StartMove", 7, 1, 0, 1)
        assert "group" in await raw.fails("Motor.StartMove", 0, 1, 2, 1)
        assert "0..6" in await raw.fails("Scan.Action", 9, 1)
        await raw.ok("Bias.RangeSet", 1)
        assert "+/-1 V" in await raw.fails("Bias.Set", 2.0)
        assert "+/-1 V" in await raw.fails("Bias.Pulse", 1, 0.1, 4.0, 1, 2)
        assert "pulse width" in await raw.fails("Bias.Pulse", 1, 0.0, 0.5, 1, 2)
        assert "code" in await raw.fails("Bias.Pulse", 1, 0.1, 0.5, 3, 2)
        message = await raw.fails("Scan.FrameSet", 400e-9, 0.0, 100e-9, 100e-9, 0.0)
        assert message.startswith("Scan.FrameSet: ")
        assert (await raw.ok("Bias.Get"))["bias_V"] == pytest.approx(-1.0)  # the failures changed nothing


async def test_a_refused_range_change_keeps_the_range():
    async with SimulatorServer(seed=4) as sim, RawClient(sim.port) as raw:
        await raw.ok("Bias.Set", 2.0)
        assert "+/-1 V" in await raw.fails("Bias.RangeSet", 1)
        assert (await raw.ok("Bias.RangeGet"))["index"] == 0
        await raw.ok("Bias.Set", 0.5)
        await raw.ok("Bias.RangeSet", 1)
        assert await raw.ok("Signals.RangeGet", 24) == {"max": 1.0, "min": -1.0}


async def test_fault_injection_stays_available():
    async with SimulatorServer(seed=5) as sim, RawClient(sim.port) as raw:
        sim.server.inject("Bias.Get", ErrorReply("Injected bias failure"))
        assert await raw.fails("Bias.Get") == "Injected bias failure"
        assert (await raw.ok("Bias.Get"))["bias_V"] == pytest.approx(-1.0)


# -- time at time scale 0 ---------------------------------------------------------------------------------------


async def test_plain_requests_advance_the_clock_by_the_latency():
    async with SimulatorServer(seed=6) as sim, RawClient(sim.port) as raw:
        t0 = sim.clock.now()
        for _ in range(10):
            await raw.ok("Bias.Get")
        assert sim.clock.now() - t0 == pytest.approx(10 * DEFAULT_COMMAND_LATENCY_S)


async def test_approach_polls_advance_the_clock_by_the_quantum_until_it_ends():
    async with SimulatorServer(seed=7, poll_quantum_s=1.0) as sim, RawClient(sim.port) as raw:
        m = sim.microscope
        await raw.ok("ZCtrl.Withdraw", 1, -1)
        await raw.ok("Motor.StartMove", 4, 10, 0, 1)  # 500 nm further away: out of reach
        await raw.ok("AutoApproach.OnOffSet", 1)
        remaining, t0 = m.auto_approach_time_remaining(), sim.clock.now()
        assert remaining > 3.0
        polls = 0
        while (await raw.ok("AutoApproach.OnOffGet"))["running"]:
            polls += 1
            assert polls < 100
        assert polls + 1 == math.ceil(remaining / 1.0)  # the last poll lands just past the end
        assert sim.clock.now() - t0 == pytest.approx(remaining, abs=1e-6)
        assert 0.9 < m.z_extension() <= 1.0 and m.z_controller_on()
        assert not m.ground_truth().lost_contact and not m.ground_truth().in_contact


async def test_scan_status_polls_reach_the_end_of_the_frame():
    async with SimulatorServer(seed=8) as sim, RawClient(sim.port) as raw:
        await raw.ok("Scan.Action", 0, 1)
        t0 = sim.clock.now()
        polls = 0
        while (await raw.ok("Scan.StatusGet"))["running"]:
            polls += 1
        assert polls + 1 == math.ceil(FRAME_10NM_S)
        assert sim.clock.now() - t0 == pytest.approx(FRAME_10NM_S, abs=1e-6)
        assert not np.isnan(sim.microscope.frame_data(Z_INDEX)[1]).any()


async def test_wait_end_of_scan_waits_exactly_the_frame_or_the_timeout():
    async with SimulatorServer(seed=9) as sim, RawClient(sim.port) as raw:
        await raw.ok("Scan.Action", 0, 1)
        t0 = sim.clock.now()
        assert await raw.ok("Scan.WaitEndOfScan", 5000) == {"timed_out": 1, "path": ""}
        assert sim.clock.now() - t0 == pytest.approx(5.0 + DEFAULT_COMMAND_LATENCY_S, abs=1e-6)
        assert sim.microscope.scan_running()
        assert await raw.ok("Scan.WaitEndOfScan", -1) == {"timed_out": 0, "path": ""}
        assert sim.clock.now() - t0 == pytest.approx(FRAME_10NM_S, abs=1e-5)
        assert not sim.microscope.scan_running()
        # paused: the frame cannot end; the wait times out after its timeout of simulated time
        await raw.ok("Scan.Action", 0, 1)
        await raw.ok("Scan.Action", 2, 1)
        assert (await raw.ok("Scan.WaitEndOfScan", 2000))["timed_out"] == 1
        assert sim.microscope.scan_paused()


async def test_a_frame_grabbed_mid_scan_has_nan_lines():
    async with SimulatorServer(seed=10) as sim, RawClient(sim.port) as raw:
        await raw.ok("Scan.BufferSet", [30], 64, 64)
        await raw.ok("Scan.Action", 0, 1)
        for k in range(3):
            reply = await raw.ok("Scan.WaitEndOfLine", -1)
            assert reply == {"timed_out": 0, "line": k, "phase": 1, "pass_index": 0}
        for forward in (1, 0):
            data = (await raw.ok("Scan.FrameDataGrab", 30, forward))["data"]
            assert data.shape == (64, 64)
            assert not np.isnan(data[:3]).any() and np.isnan(data[3:]).all()
        # driving the clock by hand: half the frame later, half the lines
        sim.clock.advance(FRAME_10NM_S / 2)
        data = (await raw.ok("Scan.FrameDataGrab", 30, 1))["data"]
        scanned = int((~np.isnan(data).any(axis=1)).sum())
        assert scanned == 3 + 32 and not np.isnan(data[:scanned]).any()
        np.testing.assert_array_equal(data, sim.microscope.frame_data(30)[1])


# -- time at time scale > 0, with an injected wall ---------------------------------------------------------------


class FakeWall:
    """A wall clock for SimClock: `sleep` moves it forward at once, or blocks forever when `stall` is set."""

    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []
        self.stall = False

    def __call__(self) -> float:
        return self.t

    async def sleep(self, dt: float) -> None:
        self.slept.append(dt)
        if self.stall:
            await asyncio.Event().wait()
        await asyncio.sleep(0)
        self.t += dt


async def test_positive_time_scale_follows_the_wall_and_scales_waits():
    wall = FakeWall()
    clock = SimClock(0.5, wall=wall, wall_sleep=wall.sleep)
    async with SimulatorServer(seed=11, time_scale=0.5, clock=clock) as sim, RawClient(sim.port) as raw:
        t0 = sim.clock.now()
        for _ in range(5):
            await raw.ok("Bias.Get")
        assert sim.clock.now() == t0  # no latency added: time flows with the wall only
        await raw.ok("Scan.Action", 0, 1)
        assert (await raw.ok("Scan.StatusGet"))["running"] == 1
        assert sim.clock.now() == t0  # polls do not push time either
        wall.t += 2.0  # one wall second per two... 2 wall s = 4 simulated s
        assert sim.clock.now() - t0 == pytest.approx(4.0)
        assert await raw.ok("Scan.WaitEndOfScan", -1) == {"timed_out": 0, "path": ""}
        assert sum(wall.slept) == pytest.approx((FRAME_10NM_S - 4.0) * 0.5, abs=1e-6)
        assert not sim.microscope.scan_running()


async def test_a_withdraw_without_wait_reports_withdrawing_until_done():
    wall = FakeWall()
    clock = SimClock(1.0, wall=wall, wall_sleep=wall.sleep)
    async with SimulatorServer(seed=13, time_scale=1.0, clock=clock) as sim, RawClient(sim.port) as raw:
        z = sim.microscope.z_position_m()
        duration = (sim.microscope.z_limits()[0] - z) / sim.microscope.config.withdraw_rate_m_per_s
        await raw.ok("ZCtrl.Withdraw", 0, -1)
        assert await raw.ok("ZCtrl.StatusGet") == {"status": 6}
        wall.t += duration * 1.01
        assert await raw.ok("ZCtrl.StatusGet") == {"status": 1}
        assert not wall.slept  # nothing waited


async def test_a_stop_on_another_connection_ends_a_wait():
    wall = FakeWall()
    clock = SimClock(1.0, wall=wall, wall_sleep=wall.sleep)
    async with (
        SimulatorServer(seed=12, time_scale=1.0, clock=clock) as sim,
        RawClient(sim.port) as waiter,
        RawClient(sim.port) as other,
    ):
        await other.ok("Scan.Action", 0, 1)
        wall.stall = True  # the wall never reaches the end of the frame
        waiting = asyncio.create_task(waiter.call("Scan.WaitEndOfScan", -1))
        async with asyncio.timeout(STEP_S):
            while not wall.slept:  # the wait has begun sleeping on the (stalled) wall
                await asyncio.sleep(0)
        assert not waiting.done()
        await other.ok("Scan.Action", 1, 1)  # stop
        status, _, values = await asyncio.wait_for(waiting, STEP_S)
        assert status == 0 and values == {"timed_out": 0, "path": ""}


# -- determinism -----------------------------------------------------------------------------------------------


async def _grab_replies(seed: int) -> list[bytes]:
    async with SimulatorServer(seed=seed, record=True) as sim, RawClient(sim.port) as raw:
        await raw.ok("Scan.BufferSet", [0, 30], 64, 64)
        await raw.ok("Scan.FrameSet", 5e-9, -5e-9, 10e-9, 10e-9, 0.0)
        for frame in range(2):
            await raw.ok("Scan.Action", 0, frame % 2)
            await raw.ok("Scan.WaitEndOfLine", -1)
            await raw.ok("Scan.FrameDataGrab", 30, 1)  # mid-scan
            await raw.ok("Scan.WaitEndOfScan", -1)
            await raw.ok("Scan.FrameDataGrab", 30, 1)
            await raw.ok("Scan.FrameDataGrab", 0, 0)
            await raw.ok("FolMe.XYPosSet", 5e-9, -5e-9, 1)
            await raw.ok("Bias.Pulse", 1, 0.2, -4.0, 1, 2)
        return [r.raw for r in sim.server.replies if r.request_name == "Scan.FrameDataGrab"]


async def test_same_seed_same_frame_bytes():
    first, second, other = await _grab_replies(21), await _grab_replies(21), await _grab_replies(22)
    assert len(first) == 6 and all(len(r) > 64 * 64 * 4 for r in first)
    assert first == second
    assert all(a != b for a, b in zip(first, other))


# -- the vendor's client -----------------------------------------------------------------------------------------

nanonis_spm = pytest.importorskip("nanonis_spm")


async def vendor_session(port: int, script: Callable[[Callable[..., Any]], Any]) -> Any:
    """Run `script(call)` with nanonis-spm on a fresh socket in a worker thread; the socket is always closed."""

    def run() -> Any:
        sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_S)
        try:
            vendor = nanonis_spm.Nanonis(sock)

            def call(method: str, *args: Any) -> Any:
                sock.settimeout(STEP_S)  # nanonis-spm sets 1000 s after every call
                error, _, values = getattr(vendor, method)(*args)
                assert error == "", f"{method}{args}: {error}"
                return values

            return script(call)
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    return await asyncio.wait_for(asyncio.to_thread(run), timeout=6 * STEP_S)


def twin_after(sim: SimulatorServer, action: Callable[[SimulatedMicroscope], Any]) -> SimulatedMicroscope:
    """A copy of the simulated state that performs `action` itself after one request's latency."""
    twin = copy.deepcopy(sim.microscope)
    twin.clock.advance(DEFAULT_COMMAND_LATENCY_S)
    action(twin)
    return twin


async def test_vendor_client_drives_the_simulator():
    async with SimulatorServer(seed=31) as sim:
        m = sim.microscope
        port = sim.port

        # scan a 64 x 64 frame of the Z channel and grab it
        def scan(call: Callable[..., Any]) -> dict[str, Any]:
            call("Scan_BufferSet", [Z_INDEX], 64, 64)
            call("Scan_FrameSet", 10e-9, -10e-9, 10e-9, 10e-9, 0.0)
            call("Scan_SpeedSet", 80e-9, 160e-9, 0.0, 0.0, 1, 2.0)
            buffer = call("Scan_BufferGet")
            call("Scan_Action", 0, 1)
            running = call("Scan_StatusGet")
            waited = call("Scan_WaitEndOfScan", 60000)
            after = call("Scan_StatusGet")
            grabbed = call("Scan_FrameDataGrab", Z_INDEX, 1)
            return {"buffer": buffer, "running": running, "waited": waited, "after": after, "grabbed": grabbed,
                    "z": call("ZCtrl_ZPosGet"), "frame": call("Scan_FrameGet"), "bias": call("Bias_Get")}

        t0 = sim.clock.now()
        r = await vendor_session(port, scan)
        assert r["buffer"] == [1, [(Z_INDEX,)], 64, 64]
        assert r["running"] == [1] and r["after"] == [0] and r["waited"] == [0, 0, ""]
        assert sim.clock.now() - t0 == pytest.approx(FRAME_10NM_S, abs=0.02)
        name_size, name, rows, cols, data, scan_up = r["grabbed"]
        assert (name_size, name, rows, cols, scan_up) == (5, "Z (m)", 64, 64, 1)
        np.testing.assert_array_equal(data, m.frame_data(Z_INDEX, True)[1].astype(np.float64))
        assert not np.isnan(data).any() and 1e-11 < np.ptp(data) < 5e-9
        high, low = m.z_limits()
        assert low < data.min() and data.max() < high
        assert r["z"][0] == pytest.approx(m.z_position_m(), abs=3e-11)
        assert r["frame"] == pytest.approx([10e-9, -10e-9, 10e-9, 10e-9, 0.0])
        assert r["bias"] == [pytest.approx(m.bias_V())]

        # a bias pulse on a bad probe: the probe changes exactly as the conditioning model says
        m.set_probe(ProbeKind.DOUBLE)
        await vendor_session(port, lambda call: call("FolMe_XYPosSet", 2e-9, -3e-9, 1))
        assert m.folme_xy() == pytest.approx((2e-9, -3e-9))
        before, debris = m.ground_truth().probe, len(m.area.debris_sites)
        twin = twin_after(sim, lambda t: t.pulse(0.2, -4.0, z_hold=True, absolute=True))
        await vendor_session(port, lambda call: call("Bias_Pulse", 1, 0.2, -4.0, 1, 2))
        assert m.ground_truth().probe == twin.ground_truth().probe != before
        assert len(m.area.debris_sites) == debris + 1
        assert m.area.debris_sites[-1] == pytest.approx((2e-9, -3e-9, debris_for(PulseEvent(-4.0, 0.2))[0]))

        # a tip-shaper dip of 1.2 nm: same check, and the indentation left its mound
        shaper = (0.05, 1, 0.02, -1.2e-9, 0.2, -1.0, 0.05, 1.2e-9, 0.2, 0.5, 1)
        props = await vendor_session(port, lambda call: (call("TipShaper_PropsSet", *shaper), call("TipShaper_PropsGet"))[1])
        assert props[1] == 1 and props[10] == 1 and props[3] == pytest.approx(-1.2e-9)  # Get flags: 1 = yes
        before = m.ground_truth().probe
        twin = twin_after(sim, lambda t: t.tip_shaper_start())
        t0 = sim.clock.now()
        await vendor_session(port, lambda call: call("TipShaper_Start", 1, 30000))
        assert m.ground_truth().probe == twin.ground_truth().probe
        assert sim.clock.now() - t0 == pytest.approx(m.tip_shaper_props().duration_s + DEFAULT_COMMAND_LATENCY_S)
        radius = debris_for(DipEvent(1.2e-9, 0.6e-9))[0]  # the gap at -1 V / 25 pA is the reference 0.6 nm
        assert len(m.area.debris_sites) == debris + 2
        assert m.area.debris_sites[-1] == pytest.approx((2e-9, -3e-9, radius), rel=1e-3)
        assert m.bias_V() == pytest.approx(-1.0) and m.z_controller_on()

        # withdraw, move the sample away, approach with polling
        def approach(call: Callable[..., Any]) -> dict[str, Any]:
            call("ZCtrl_Withdraw", 1, 10000)
            status = call("ZCtrl_StatusGet")
            withdrawn_z = call("ZCtrl_ZPosGet")
            call("Motor_StartMove", 4, 8, 0, 1)
            call("AutoApproach_Open")
            call("AutoApproach_OnOffSet", 1)
            polls = 1
            while call("AutoApproach_OnOffGet") == [1]:
                polls += 1
                assert polls < 100
            return {"status": status, "withdrawn_z": withdrawn_z, "polls": polls, "on": call("ZCtrl_OnOffGet"),
                    "z": call("ZCtrl_ZPosGet"), "steps": call("Motor_StepCounterGet", 0, 0, 0)}

        r = await vendor_session(port, approach)
        assert r["status"] == [1] and r["withdrawn_z"] == [pytest.approx(high)]
        assert 2 <= r["polls"] < 20 and r["on"] == [1]
        extension = (high - r["z"][0]) / (high - low)
        assert 0.9 < extension <= 1.0 and extension == pytest.approx(m.z_extension(), abs=1e-4)
        assert r["steps"][2] == m.motor_step_counter()[2] and r["steps"][2] != 0  # approach steps counted on Z
        truth = m.ground_truth()
        assert not truth.lost_contact and not truth.in_contact

        # a coarse move to the next approach area
        def move(call: Callable[..., Any]) -> list[Any]:
            call("ZCtrl_Withdraw", 1, 10000)
            call("Motor_StartMove", 0, 30, 0, 1)
            return call("Motor_StepCounterGet", 0, 0, 0)

        assert m.approach_area() == (0, 0)
        steps = await vendor_session(port, move)
        assert steps[0] == 30 and m.motor_step_counter()[0] == 30
        assert m.approach_area() == (1, 0)


def vendor_tour(call: Callable[..., Any]) -> dict[str, Any]:
    """What a user would do with the vendor client: scan and grab, pulse, dip, read z, approach, move."""
    out: dict[str, Any] = {}
    call("Scan_BufferSet", [Z_INDEX], 64, 64)
    call("Scan_FrameSet", 0.0, 0.0, 10e-9, 10e-9, 0.0)
    call("Scan_Action", 0, 1)
    out["waited"] = call("Scan_WaitEndOfScan", 60000)
    out["grab"] = call("Scan_FrameDataGrab", Z_INDEX, 1)
    call("FolMe_XYPosSet", 1e-9, 1e-9, 1)
    call("Bias_Pulse", 1, 0.2, 4.0, 1, 2)
    call("TipShaper_PropsSet", 0.05, 1, 0.02, -1.8e-9, 0.2, -1.0, 0.05, 1.8e-9, 0.2, 0.5, 1)
    call("TipShaper_Start", 1, 30000)
    out["z"] = call("ZCtrl_ZPosGet")
    call("ZCtrl_Withdraw", 1, 10000)
    call("Motor_StartMove", 4, 8, 0, 1)
    call("AutoApproach_OnOffSet", 1)
    out["polls"] = 1
    while call("AutoApproach_OnOffGet") == [1]:
        out["polls"] += 1
    out["approached_z"] = call("ZCtrl_ZPosGet")
    call("ZCtrl_Withdraw", 1, 10000)
    call("Motor_StartMove", 2, 30, 0, 1)
    out["steps"] = call("Motor_StepCounterGet", 0, 0, 0)
    call("AutoApproach_OnOffSet", 1)
    while call("AutoApproach_OnOffGet") == [1]:
        pass
    call("Scan_Action", 0, 0)
    call("Scan_WaitEndOfScan", 60000)
    out["grab_new_area"] = call("Scan_FrameDataGrab", Z_INDEX, 1)
    out["current"] = call("Current_Get")
    return out


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


async def test_vendor_client_drives_deepspm_simulate():
    """`deepspm simulate` in its own process answers the vendor client exactly as the in-process simulator."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deepspm.cli", "simulate", "--port", "0", "--seed", "7", "--time-scale", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            while not (line := (await proc.stdout.readline()).decode()).startswith("deepspm simulator"):
                assert line, "deepspm simulate ended before announcing its address"
        port = int(line.split("127.0.0.1:")[1].split()[0])
        remote = await vendor_session(port, vendor_tour)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()[-2000:]

    async with SimulatorServer(seed=7) as sim:
        local = await vendor_session(sim.port, vendor_tour)
        m = sim.microscope
        np.testing.assert_array_equal(local["grab_new_area"][4], m.frame_data(Z_INDEX)[1])
        assert m.approach_area() == (0, 1) and local["steps"][1] == 30
        assert len(m.area.debris_sites) == 0 and len(sim.microscope.sample.area((0, 0)).debris_sites) == 2
    assert remote["waited"] == [0, 0, ""] and 2 <= remote["polls"] < 20
    assert not np.isnan(remote["grab"][4]).any() and not np.isnan(remote["grab_new_area"][4]).any()
    assert_same(remote, local)


# -- our own instrument layer ----------------------------------------------------------------------------------


async def test_nanonis_instrument_scans_an_oldest_release_server_with_slot_channels():
    """R10862 has no Util.VersionGet and indexes scan channels by signal slot (Signals.InSlotsGet)."""
    async with SimulatorServer(seed=42, release=Release.R10862) as sim:
        instrument = NanonisInstrument(our_client(sim.port), approach_settings=ApproachSettings(poll_s=0.0))
        try:
            await instrument.connect()
            assert instrument.client.release is Release.R10862
            frame = await instrument.scan(0.0, 0.0, 10e-9)
            assert frame.channel_name == "Z (m)" and frame.complete and frame.data_m.shape == (64, 64)
        finally:
            await instrument.close()


async def drive(plan, instrument, sleep):  # noqa: ANN001, ANN201
    """Run a plan stub (approach, z extension, area move) on the instrument: each command one operation."""
    result = None
    while True:
        try:
            command = plan.send(result)
        except StopIteration as stop:
            return stop.value
        if isinstance(command, Wait):
            result = await sleep(command.seconds)
        else:
            result = await getattr(instrument, command.op)(**command.instrument_kwargs())


async def test_nanonis_instrument_runs_against_the_simulator():
    async with SimulatorServer(seed=41) as sim:
        m = sim.microscope
        settings = ApproachSettings(poll_s=0.5)
        instrument = NanonisInstrument(our_client(sim.port), approach_settings=settings)
        try:
            await instrument.connect()
            await instrument.withdraw()
            await instrument.client.motor_start_move(4, 6)  # sample out of reach: a real approach
            state = await drive(plans.approach(settings), instrument, sim.clock.sleep)
            assert state.controller_on and 0.9 < state.extension <= 1.0
            state = await drive(plans.set_z_extension(settings), instrument, sim.clock.sleep)
            assert state.extension == pytest.approx(0.8, abs=0.08)
            assert m.z_extension() == pytest.approx(state.extension, abs=1e-3)

            frame = await instrument.scan(0.0, 0.0, 10e-9)
            assert frame.data_m.shape == (64, 64) and frame.complete and not np.isnan(frame.data_m).any()
            assert 1e-11 < np.ptp(frame.data_m) < 5e-9  # angstrom-scale corrugation, no jumps
            np.testing.assert_array_equal(frame.data_m, m.frame_data(Z_INDEX)[1][::-1])  # top row first
            assert frame.z_after.extension == pytest.approx(0.8, abs=0.1)

            debris = len(m.area.debris_sites)
            m.set_probe(ProbeKind.UNSTABLE)
            before = m.ground_truth().probe
            await instrument.pulse(1e-9, 1e-9, -4.0, 0.2)
            assert m.ground_truth().probe != before
            before = m.ground_truth().probe
            await instrument.dip(-1e-9, 2e-9, 1.0e-9, 0.02, 0.2)
            assert m.ground_truth().probe != before or m.ground_truth().is_good
            assert len(m.area.debris_sites) == debris + 2
            assert m.bias_V() == pytest.approx(-1.0) and m.z_controller_on()

            await drive(plans.move_area(settings, 0), instrument, sim.clock.sleep)
            assert m.approach_area() == (1, 0)
            state = await drive(plans.approach(settings), instrument, sim.clock.sleep)
            assert state.controller_on and 0.0 < state.extension < 1.0
            frame = await instrument.scan(20e-9, 20e-9, 10e-9)
            assert frame.complete and frame.centre_x_m == 20e-9
            assert sim.clock.now() > 2 * FRAME_10NM_S
        finally:
            await instrument.close()


async def test_our_client_sees_a_mid_scan_frame_through_wait_end_of_line():
    async with SimulatorServer(seed=42) as sim:
        client = our_client(sim.port, SafetyLimits(allow_unchecked=frozenset({"Motor.StartClosedLoop"})))
        try:
            await client.connect()
            await client.piezo_range_get()
            await client.scan_buffer_set([Z_INDEX], 64, 64)
            await client.scan_frame_set(0.0, 0.0, 10e-9, 10e-9)
            await client.scan_start()
            for _ in range(5):
                await client.scan_wait_end_of_line(10.0)
            grabbed = await client.scan_frame_data_grab(Z_INDEX)
            assert not np.isnan(grabbed.data[:5]).any() and np.isnan(grabbed.data[5:]).all()
            assert await client.scan_status()
            with pytest.raises(NanonisError, match="not supported"):
                await client.motor_start_closed_loop(0.0, 0.0, 0.0)
        finally:
            await client.close()


# -- deepspm simulate ---------------------------------------------------------------------------------------------


async def test_serve_forever_announces_serves_and_stops_cleanly():
    lines: list[str] = []
    ready = asyncio.Event()

    def announce(line: str) -> None:
        lines.append(line)
        ready.set()

    task = asyncio.create_task(serve_forever(0, seed=5, time_scale=0.0, n_ports=2, announce=announce))
    await asyncio.wait_for(ready.wait(), STEP_S)
    assert len(lines) == 1 and "seed 5" in lines[0]
    ports = [int(part.split(":")[1].split()[0].rstrip(",")) for part in lines[0].split("127.0.0.1")[1:]]
    assert len(ports) == 2
    for port in ports:
        async with RawClient(port) as raw:
            assert (await raw.ok("Bias.Get"))["bias_V"] == pytest.approx(-1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ConnectionLost):
        async with RawClient(ports[0]):
            pass


async def test_a_resumed_process_finishes_a_scan_its_predecessor_started():
    """After kill -9 mid-frame, the resumed run's fresh instrument waits for and grabs the scan the killed
    process started: the frame comes from the instrument (Scan.FrameGet), not from this process's memory."""
    async with SimulatorServer(seed=43) as sim:
        first = NanonisInstrument(our_client(sim.port))
        await first.connect()
        await first.start_scan(20e-9, -10e-9, 10e-9)
        await first.close()
        second = NanonisInstrument(our_client(sim.port))
        try:
            await second.connect()
            await second.wait_scan_end()
            frame = await second.grab_frame()
            assert (frame.centre_x_m, frame.centre_y_m, frame.size_m) == pytest.approx((20e-9, -10e-9, 10e-9))
            assert frame.complete
        finally:
            await second.close()
