"""The simulated microscope served over the real Nanonis TCP protocol (what `deepspm simulate` runs).

`microscope_handlers(microscope, clock)` answers every command of the one command table
(`deepspm.io.commands.TABLE`) from a `SimulatedMicroscope`; `SimulatorServer` wires those handlers into a
`FakeNanonisServer`, so fault injection stays available (`sim.server.inject(...)`); `serve_forever` serves it
until cancelled. Ground truth (probe kind, good or bad) is only on `SimulatorServer.microscope`, the Python
API for evaluation code; nothing on the wire reveals it.

Time. One `SimClock` drives the physics and the handlers.
- Blocking commands (Bias.Pulse, TipShaper.Start, ZCtrl.Withdraw, Motor.StartMove, FolMe.XYPosSet with
  their wait flag set, Scan.WaitEndOfScan, Scan.WaitEndOfLine, Scan.Save, the wait-for-newest-sample flag of
  the readers) await `clock.sleep(duration)`: real (scaled) waiting when time_scale > 0, instant at 0.
- At time_scale 0 ("as fast as possible") nothing ever waits on the wall clock, yet a client that polls must
  see processes progress. So every request first moves simulated time forward: a status poll of a process
  in progress (AutoApproach.OnOffGet while approaching, Scan.StatusGet while scanning) by `poll_quantum_s`
  (default 1 s), or to just past the process's end if that comes sooner; every other request by
  `command_latency_s` (default 1 ms). An approach lasting T seconds therefore ends after
  ceil(T / poll_quantum_s) polls, whatever the client's own poll interval, and simulated time never stands
  still. The same command sequence always gives the same simulated times, hence byte-identical data.
- At time_scale > 0 simulated time flows with the wall clock (scaled); requests add nothing.
- Waits (WaitEndOfScan, WaitEndOfLine) also wake when another connection changes the instrument (a stop, a
  pause, a new scan), as on the real server, where a stop on one port ends a wait on another.
- Scripted events (`SimulatorServer.at(time_s, action)`, e.g. a z jump that forces lost contact) run before
  the first request served at or after their simulated time, so they too are deterministic.

Wire codings that differ between Set and Get (reference nanonis-tcp.md 3.7) are decoded here:
Scan.PropsSet 0 no change / 1 on / 2 off (autosave, autopaste: 0 no change / 1 all / 2 next / 3 off) vs
PropsGet 0/1 (autosave 0 all / 1 next / 2 off); Scan.SpeedSet keep 0 no change / 1 speed / 2 time vs SpeedGet
0 speed / 1 time; TipShaper flags 0 no change / 1 yes / 2 no vs 0 no / 1 yes; ZCtrl.HomeProps 0 no change /
1 absolute / 2 relative vs 0 absolute / 1 relative; SafeTip 1 on / 2 off vs 1 on / 0 off; Bias.Pulse z_hold
and absolute 0 keep the previous choice.

Releases: with R10862 the scan channels (BufferSet/BufferGet/FrameDataGrab) are signal-slot indexes
(`SLOT_SIGNALS`: slot 14 is "Z (m)", as in older community code), Scan.Action knows codes 0-3 only and
Signals.InSlotsGet lists the slots; later releases use RT-signal indexes (30 = "Z (m)").

Simplifications (documented, not hidden): no files are written (WaitEndOfScan's path is empty, Scan.Save
only takes its time); WaitEndOfLine's pass index is always 0; one motor group and one motor frequency for
all axes; Motor.StartClosedLoop is refused (an open-loop coarse positioner, as most STMs have); the
acquisition period (20 ms) and RT frequency (20 kHz) are fixed. Invalid requests (a frame outside the
piezo range, a channel not in the buffer, an unknown code, anything `MicroscopeError` refuses) get a
Nanonis error reply with a readable description, never silence.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import math
import signal
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from deepspm.io.commands import TABLE, Release, lookup
from deepspm.simulator.clock import SimClock
from deepspm.simulator.microscope import (
    BIAS_INDEX,
    CURRENT_INDEX,
    SIGNAL_NAMES,
    Z_INDEX,
    MicroscopeError,
    SimConfig,
    SimulatedMicroscope,
    TipShaperSettings,
)
from deepspm.simulator.render import CURRENT_SATURATION_A
from deepspm.simulator.server import DEFAULT_PRODUCT, DEFAULT_VERSION_NAME, CommandFailed, FakeNanonisServer, Handler

DEFAULT_POLL_QUANTUM_S = 1.0
DEFAULT_COMMAND_LATENCY_S = 1e-3
ACQUISITION_PERIOD_S = 0.02  # Util.AcqPeriodGet; also the wait of a "wait for the newest sample" read
RT_FREQUENCY_HZ = 20e3
SAVE_TIME_S = 0.05  # what Scan.Save takes
BIAS_RANGES: tuple[tuple[str, float], ...] = (("+/-10 V", 10.0), ("+/-1 V", 1.0))
CURRENT_GAINS: tuple[str, ...] = ("10^6 V/A", "10^7 V/A", "10^8 V/A", "10^9 V/A", "10^10 V/A")
CURRENT_FILTERS: tuple[str, ...] = ("Off", "1 kHz", "3 kHz", "10 kHz")
SESSION_PATH = "C:\\Users\\SPM\\Documents\\deepspm-simulator"

# R10862: the 24 signal slots, each naming an RT-signal index (slot 14 = Z, as in older community code).
SLOT_SIGNALS: tuple[int, ...] = (CURRENT_INDEX, *range(1, 8), *range(8, 14), Z_INDEX, BIAS_INDEX, *range(16, 24))

_FOREVER = math.inf


def _past(t_s: float) -> float:
    """A time just after `t_s`: enough to be later after float rounding, negligible physically."""
    return t_s + max(1e-9, 8 * math.ulp(t_s))


def _timeout_s(timeout_ms: int) -> float:
    return _FOREVER if timeout_ms < 0 else timeout_ms / 1000.0


def _code(args: Mapping[str, Any], name: str, allowed: Mapping[int, Any], what: str) -> Any:
    value = args[name]
    if value not in allowed:
        raise CommandFailed(f"invalid {what} code {value} (allowed: {sorted(allowed)})")
    return allowed[value]


class _MicroscopeHandlers:
    """The handler of every command, reading and changing one `SimulatedMicroscope`.

    Holds the few settings the physics does not model (bias range, scan autosave, safe tip, current gain,
    ...), so that every Get returns what the matching Set stored.
    """

    def __init__(
        self, microscope: SimulatedMicroscope, clock: SimClock, release: Release, version: tuple[str, str, int, int],
        poll_quantum_s: float, command_latency_s: float,
    ) -> None:
        if microscope.clock is not clock:
            raise ValueError("the microscope must run on the same SimClock as its handlers")
        if poll_quantum_s <= 0 or command_latency_s < 0:
            raise ValueError(f"need poll_quantum_s > 0 and command_latency_s >= 0, got {poll_quantum_s}, {command_latency_s}")
        self.m = microscope
        self.clock = clock
        self.release = release
        self.version = version
        self.poll_quantum_s = float(poll_quantum_s)
        self.command_latency_s = float(command_latency_s)
        self._changed = asyncio.Event()  # set (and replaced) whenever a command changes the instrument
        self._bias_range = 0
        self._pulse_hold = True
        self._pulse_absolute = True
        self._autosave = 2  # Get coding: 0 all, 1 next, 2 off
        self._autopaste = 2
        self._series = "deepspm_"
        self._comment = ""
        self._modules: list[str] = []
        self._limits_enabled = True
        self._withdraw_until = -_FOREVER
        self._safe_tip = True
        self._gain = (3, 0)  # (gain index, filter index)
        self._motor_amplitude_V = 120.0
        self._session_path = SESSION_PATH
        self._scheduled: list[tuple[float, int, Callable[[SimulatedMicroscope], Any]]] = []
        self._schedule_order = itertools.count()

    # -- the table ------------------------------------------------------------------------------------------

    def table(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "Bias.Set": self.bias_set, "Bias.Get": self.bias_get, "Bias.Pulse": self.bias_pulse,
            "Bias.RangeGet": self.bias_range_get, "Bias.RangeSet": self.bias_range_set,
            "Scan.Action": self.scan_action, "Scan.StatusGet": self.scan_status,
            "Scan.WaitEndOfScan": self.scan_wait_end, "Scan.WaitEndOfLine": self.scan_wait_end_of_line,
            "Scan.FrameSet": self.scan_frame_set, "Scan.FrameGet": self.scan_frame_get,
            "Scan.BufferSet": self.scan_buffer_set, "Scan.BufferGet": self.scan_buffer_get,
            "Scan.PropsSet": self.scan_props_set, "Scan.PropsGet": self.scan_props_get,
            "Scan.SpeedSet": self.scan_speed_set, "Scan.SpeedGet": self.scan_speed_get,
            "Scan.FrameDataGrab": self.scan_frame_data_grab, "Scan.XYPosGet": self.scan_xy_pos_get,
            "Scan.Save": self.scan_save,
            "ZCtrl.ZPosSet": self.z_pos_set, "ZCtrl.ZPosGet": self.z_pos_get,
            "ZCtrl.OnOffSet": self.z_on_set, "ZCtrl.OnOffGet": self.z_on_get,
            "ZCtrl.SetpntSet": self.z_setpoint_set, "ZCtrl.SetpntGet": self.z_setpoint_get,
            "ZCtrl.GainSet": self.z_gain_set, "ZCtrl.GainGet": self.z_gain_get,
            "ZCtrl.LimitsSet": self.z_limits_set, "ZCtrl.LimitsGet": self.z_limits_get,
            "ZCtrl.LimitsEnabledSet": self.z_limits_enabled_set, "ZCtrl.LimitsEnabledGet": self.z_limits_enabled_get,
            "ZCtrl.Withdraw": self.z_withdraw, "ZCtrl.Home": self.z_home,
            "ZCtrl.HomePropsSet": self.z_home_props_set, "ZCtrl.HomePropsGet": self.z_home_props_get,
            "ZCtrl.StatusGet": self.z_status,
            "ZCtrl.SwitchOffDelaySet": self.z_switch_off_delay_set, "ZCtrl.SwitchOffDelayGet": self.z_switch_off_delay_get,
            "ZCtrl.TipLiftSet": self.z_tip_lift_set, "ZCtrl.TipLiftGet": self.z_tip_lift_get,
            "ZCtrl.WithdrawRateSet": self.z_withdraw_rate_set, "ZCtrl.WithdrawRateGet": self.z_withdraw_rate_get,
            "TipShaper.Start": self.tip_shaper_start, "TipShaper.PropsSet": self.tip_shaper_props_set,
            "TipShaper.PropsGet": self.tip_shaper_props_get,
            "AutoApproach.Open": self.approach_open, "AutoApproach.OnOffSet": self.approach_set,
            "AutoApproach.OnOffGet": self.approach_get,
            "Motor.StartMove": self.motor_start_move, "Motor.StartClosedLoop": self.motor_closed_loop,
            "Motor.StopMove": self.motor_stop, "Motor.StepCounterGet": self.motor_step_counter,
            "Motor.PosGet": self.motor_pos_get, "Motor.FreqAmpGet": self.motor_freq_amp_get,
            "Motor.FreqAmpSet": self.motor_freq_amp_set,
            "SafeTip.OnOffSet": self.safe_tip_set, "SafeTip.OnOffGet": self.safe_tip_get,
            "FolMe.XYPosSet": self.folme_xy_set, "FolMe.XYPosGet": self.folme_xy_get,
            "FolMe.SpeedSet": self.folme_speed_set, "FolMe.SpeedGet": self.folme_speed_get,
            "FolMe.Stop": self.folme_stop,
            "Current.Get": self.current_get, "Current.GainsGet": self.current_gains_get,
            "Current.GainSet": self.current_gain_set,
            "Piezo.RangeGet": self.piezo_range_get,
            "Signals.NamesGet": self.signal_names, "Signals.ValGet": self.signal_value,
            "Signals.ValsGet": self.signal_values, "Signals.RangeGet": self.signal_range,
            "Signals.InSlotsGet": self.signal_slots,
            "Util.VersionGet": self.version_get, "Util.SessionPathGet": self.session_path_get,
            "Util.SessionPathSet": self.session_path_set, "Util.AcqPeriodGet": self.acq_period_get,
            "Util.RTFreqGet": self.rt_freq_get,
        }

    def wrapped(self) -> dict[str, Handler]:
        """The table with simulated time passing per request, errors as Nanonis errors and change signals."""
        table = self.table()
        missing = {spec.name for spec in TABLE.values()} - set(table)
        if missing:
            raise RuntimeError(f"commands without a simulator handler: {sorted(missing)}")
        return {name: self._wrap(name, fn) for name, fn in table.items()}

    def _wrap(self, name: str, fn: Callable[[dict[str, Any]], Any]) -> Handler:
        spec = lookup(name)
        poll = self._polls().get(name)

        async def handler(args: dict[str, Any]) -> Any:
            self._pass_time(poll)
            self._run_due()
            try:
                result = fn(args)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except MicroscopeError as exc:
                raise CommandFailed(f"{spec.name}: {exc}") from exc
            except CommandFailed as exc:
                raise CommandFailed(f"{spec.name}: {exc.message}") from exc
            finally:
                if spec.mutating:
                    self._notify()

        handler.__name__ = handler.__qualname__ = f"handle_{name.replace('.', '_')}"
        return handler

    # -- time -----------------------------------------------------------------------------------------------

    def _polls(self) -> dict[str, Callable[[], float]]:
        """Status polls of processes: each returns the simulated seconds until its process ends (0 = none)."""
        return {
            "AutoApproach.OnOffGet": self.m.auto_approach_time_remaining,
            "Scan.StatusGet": self.m.scan_time_remaining,
        }

    def _pass_time(self, poll: Callable[[], float] | None) -> None:
        """At time_scale 0, the simulated time one request takes (see the module docstring)."""
        if self.clock.time_scale > 0:
            return
        remaining = poll() if poll is not None else 0.0
        if remaining <= 0:
            self.clock.advance(self.command_latency_s)
        elif remaining > self.poll_quantum_s:
            self.clock.advance(self.poll_quantum_s)
        else:
            self.clock.advance_to(_past(self.clock.now() + remaining))

    def schedule(self, time_s: float, action: Callable[[SimulatedMicroscope], Any]) -> None:
        heapq.heappush(self._scheduled, (float(time_s), next(self._schedule_order), action))

    def _run_due(self) -> None:
        """Scripted events whose time has come run before the request that reaches it."""
        now = self.clock.now()
        while self._scheduled and self._scheduled[0][0] <= now:
            _, _, action = heapq.heappop(self._scheduled)
            action(self.m)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _sleep(self, dt_s: float) -> None:
        if dt_s > 0:
            await self.clock.sleep(dt_s)

    async def _sleep_until_change(self, until_s: float) -> bool:
        """Sleep until simulated time `until_s` (inf: no limit); False if the instrument changed first."""
        changed = self._changed
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(changed.wait())}
        sleeper = None
        if until_s < _FOREVER:
            sleeper = asyncio.ensure_future(self.clock.sleep(max(until_s - self.clock.now(), 0.0)))
            waits.add(sleeper)
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        return sleeper is not None and sleeper in done and not changed.is_set()

    # -- Bias -----------------------------------------------------------------------------------------------

    def _check_bias(self, volts: float, what: str, range_index: int | None = None) -> None:
        label, limit = BIAS_RANGES[self._bias_range if range_index is None else range_index]
        if abs(volts) > limit:
            raise CommandFailed(f"{what} {volts:+.4g} V outside the selected bias range {label}")

    def bias_set(self, args: dict[str, Any]) -> None:
        self._check_bias(args["bias_V"], "bias")
        self.m.set_bias(args["bias_V"])

    def bias_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"bias_V": self.m.bias_V()}

    async def bias_pulse(self, args: dict[str, Any]) -> None:
        hold = _code(args, "z_hold", {0: self._pulse_hold, 1: True, 2: False}, "Z-controller hold")
        absolute = _code(args, "absolute", {0: self._pulse_absolute, 1: False, 2: True}, "pulse absolute/relative")
        volts = args["bias_V"] if absolute else self.m.bias_V() + args["bias_V"]
        self._check_bias(volts, "pulse")
        duration = self.m.pulse(args["width_s"], args["bias_V"], z_hold=hold, absolute=absolute)
        self._pulse_hold, self._pulse_absolute = hold, absolute
        self._notify()
        if args["wait"]:
            await self._sleep(duration)

    def bias_range_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"ranges": [label for label, _ in BIAS_RANGES], "index": self._bias_range}

    def bias_range_set(self, args: dict[str, Any]) -> None:
        index = args["index"]
        if not 0 <= index < len(BIAS_RANGES):
            raise CommandFailed(f"bias range index {index} does not exist (0..{len(BIAS_RANGES) - 1})")
        self._check_bias(self.m.bias_V(), "the present bias", index)
        self._bias_range = index

    # -- Scan -----------------------------------------------------------------------------------------------

    def _rt_channel(self, channel: int) -> int:
        """A scan channel as the RT-signal index (R10862 sends signal-slot indexes)."""
        if self.release == Release.R10862:
            if not 0 <= channel < len(SLOT_SIGNALS):
                raise CommandFailed(f"signal slot {channel} does not exist (0..{len(SLOT_SIGNALS) - 1})")
            return SLOT_SIGNALS[channel]
        return channel

    def _wire_channel(self, rt_index: int) -> int:
        if self.release == Release.R10862:
            return SLOT_SIGNALS.index(rt_index)
        return rt_index

    def scan_action(self, args: dict[str, Any]) -> None:
        highest = 3 if self.release == Release.R10862 else 6
        if not 0 <= args["action"] <= highest:
            raise CommandFailed(f"scan action {args['action']} does not exist (0..{highest})")
        up = _code(args, "direction_up", {0: False, 1: True}, "scan direction")
        self.m.scan_action(args["action"], up)

    def scan_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"running": int(self.m.scan_running())}

    async def scan_wait_end(self, args: dict[str, Any]) -> dict[str, Any]:
        """Wait until the running frame ends (or, with none running, until the next one ends) or the timeout.

        A stop from another connection also ends the wait (not timed out), as on the real server.
        """
        deadline = self.clock.now() + _timeout_s(args["timeout_ms"])
        was_running = False
        while True:
            running = self.m.scan_running()
            if was_running and not running:
                return {"timed_out": 0, "path": ""}
            was_running = running
            end = self.clock.now() + self.m.scan_time_remaining() if running else _FOREVER
            if end <= deadline:
                if await self._sleep_until_change(_past(end)):
                    return {"timed_out": 0, "path": ""}
            elif await self._sleep_until_change(deadline):
                return {"timed_out": 1, "path": ""}

    async def scan_wait_end_of_line(self, args: dict[str, Any]) -> dict[str, Any]:
        """Wait for the end of the line in progress (its backward pass). `line` is that line's 0-based index."""
        deadline = self.clock.now() + _timeout_s(args["timeout_ms"])
        while True:
            progress = self.m.scan_progress()
            if progress is None or self.m.scan_paused():
                if not await self._sleep_until_change(deadline):
                    continue
                line = -1 if progress is None else int(progress[0] // progress[1])
                return {"timed_out": 1, "line": line, "phase": 0, "pass_index": 0}
            done_s, line_s, _ = progress
            line = int(done_s // line_s)
            end = self.clock.now() + (line + 1) * line_s - done_s
            if end <= deadline:
                if await self._sleep_until_change(_past(end)):
                    return {"timed_out": 0, "line": line, "phase": 1, "pass_index": 0}
            elif await self._sleep_until_change(deadline):
                return {"timed_out": 1, "line": line, "phase": 0, "pass_index": 0}

    def scan_frame_set(self, args: dict[str, Any]) -> None:
        self.m.set_scan_frame(args["x_m"], args["y_m"], args["width_m"], args["height_m"], args["angle_deg"])

    def scan_frame_get(self, args: dict[str, Any]) -> dict[str, Any]:
        f = self.m.scan_frame()
        return asdict(f)  # io.client.ScanFrame: the reply's own fields

    def scan_buffer_set(self, args: dict[str, Any]) -> None:
        self.m.set_scan_buffer([self._rt_channel(c) for c in args["channels"]], args["pixels"], args["lines"])

    def scan_buffer_get(self, args: dict[str, Any]) -> dict[str, Any]:
        channels, pixels, lines = self.m.scan_buffer()
        return {"channels": [self._wire_channel(c) for c in channels], "pixels": pixels, "lines": lines}

    def scan_props_set(self, args: dict[str, Any]) -> None:
        switch = {0: None, 1: True, 2: False}
        continuous = _code(args, "continuous", switch, "continuous scan")
        bouncy = _code(args, "bouncy", switch, "bouncy scan")
        saving = {0: None, 1: 0, 2: 1, 3: 2}  # Set coding -> Get coding
        autosave = _code(args, "autosave", saving, "autosave")
        autopaste = _code(args, "autopaste", saving, "autopaste") if "autopaste" in args else None
        self.m.set_scan_props(continuous=continuous, bouncy=bouncy)
        if autosave is not None:
            self._autosave = autosave
        if autopaste is not None:
            self._autopaste = autopaste
        # empty texts and module lists leave the present ones (the client sends "" for "no change")
        self._series = args["series"] or self._series
        self._comment = args["comment"] or self._comment
        self._modules = list(args.get("modules") or self._modules)

    def scan_props_get(self, args: dict[str, Any]) -> dict[str, Any]:
        continuous, bouncy = self.m.scan_props()
        return {
            "continuous": int(continuous), "bouncy": int(bouncy), "autosave": self._autosave,
            "series": self._series, "comment": self._comment, "modules": list(self._modules),
            "params_per_module": [0] * len(self._modules), "parameters": [[] for _ in self._modules],
            "autopaste": self._autopaste,
        }

    def scan_speed_set(self, args: dict[str, Any]) -> None:
        """Speeds win unless keep = 2 (time per line) and line times are given; a missing backward value
        follows from the ratio (backward / forward speed)."""
        keep = _code(args, "keep", {0: None, 1: False, 2: True}, "keep-constant")
        fwd, bwd = args["fwd_speed_mps"], args["bwd_speed_mps"]
        t_fwd, t_bwd = args["fwd_line_time_s"], args["bwd_line_time_s"]
        ratio = args["bwd_fwd_ratio"]
        if ratio > 0:
            bwd = bwd if bwd > 0 else fwd * ratio
            t_bwd = t_bwd if t_bwd > 0 else t_fwd / ratio
        speeds_given, times_given = fwd > 0 and bwd > 0, t_fwd > 0 and t_bwd > 0
        if times_given and (keep is True or not speeds_given):
            self.m.set_scan_line_time(t_fwd, t_bwd, keep)
        elif speeds_given:
            self.m.set_scan_speed(fwd, bwd, keep)
        elif keep is not None:
            s = self.m.scan_speed()
            self.m.set_scan_speed(s.fwd_m_per_s, s.bwd_m_per_s, keep)

    def scan_speed_get(self, args: dict[str, Any]) -> dict[str, Any]:
        s = self.m.scan_speed()
        return {
            "fwd_speed_mps": s.fwd_m_per_s, "bwd_speed_mps": s.bwd_m_per_s, "fwd_line_time_s": s.fwd_line_s,
            "bwd_line_time_s": s.bwd_line_s, "keep": int(s.keep_line_time), "bwd_fwd_ratio": s.bwd_m_per_s / s.fwd_m_per_s,
        }

    def scan_frame_data_grab(self, args: dict[str, Any]) -> dict[str, Any]:
        forward = _code(args, "forward", {0: False, 1: True}, "data direction")
        name, data, up = self.m.frame_data(self._rt_channel(args["channel"]), forward)
        return {"channel_name": name, "data": data, "scan_up": int(up)}

    async def scan_xy_pos_get(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["wait_newest"]:
            await self._sleep(ACQUISITION_PERIOD_S)
        x, y = self.m.folme_xy()
        return {"x_m": x, "y_m": y}

    async def scan_save(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args["wait"]:
            return {"timed_out": 0}
        limit = _timeout_s(args["timeout_ms"])
        await self._sleep(min(SAVE_TIME_S, limit))
        return {"timed_out": int(limit < SAVE_TIME_S)}

    # -- Z controller -----------------------------------------------------------------------------------------

    def z_pos_set(self, args: dict[str, Any]) -> None:
        self.m.set_z_position(args["z_m"])

    def z_pos_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"z_m": self.m.z_position_m()}

    def z_on_set(self, args: dict[str, Any]) -> None:
        self.m.set_z_controller(_code(args, "on", {0: False, 1: True}, "on/off"))

    def z_on_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"on": int(self.m.z_controller_on())}

    def z_setpoint_set(self, args: dict[str, Any]) -> None:
        self.m.set_setpoint(args["setpoint"])

    def z_setpoint_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"setpoint": self.m.setpoint_A()}

    def z_gain_set(self, args: dict[str, Any]) -> None:
        if args["p_gain"] <= 0 or args["time_constant_s"] <= 0:
            raise CommandFailed("P gain and time constant must be positive")
        self.m.set_z_gains(args["p_gain"], args["time_constant_s"], args["i_gain"])

    def z_gain_get(self, args: dict[str, Any]) -> dict[str, Any]:
        p, tc, i = self.m.z_gains()
        return {"p_gain": p, "time_constant_s": tc, "i_gain": i}

    def z_limits_set(self, args: dict[str, Any]) -> None:
        self.m.set_z_limits(args["high_m"], args["low_m"])

    def z_limits_get(self, args: dict[str, Any]) -> dict[str, Any]:
        high, low = self.m.z_limits()
        return {"high_m": high, "low_m": low}

    def z_limits_enabled_set(self, args: dict[str, Any]) -> None:
        self._limits_enabled = _code(args, "enabled", {0: False, 1: True}, "limits enabled")

    def z_limits_enabled_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"enabled": int(self._limits_enabled)}

    async def z_withdraw(self, args: dict[str, Any]) -> None:
        duration = self.m.withdraw()
        self._withdraw_until = self.clock.now() + duration
        self._notify()
        if args["wait"]:
            await self._sleep(min(duration, _timeout_s(args["timeout_ms"])))

    def z_home(self, args: dict[str, Any]) -> None:
        self.m.home()

    def z_home_props_set(self, args: dict[str, Any]) -> None:
        relative, _ = self.m.home_props()
        relative = _code(args, "mode", {0: relative, 1: False, 2: True}, "home mode")
        self.m.set_home_props(relative, args["z_m"])

    def z_home_props_get(self, args: dict[str, Any]) -> dict[str, Any]:
        relative, z = self.m.home_props()
        return {"mode": int(relative), "z_m": z}

    def z_status(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.clock.now() < self._withdraw_until and not self.m.z_controller_on():
            return {"status": 6}  # withdrawing (wait = 0 and the retraction still under way)
        return {"status": self.m.z_status()}

    def z_switch_off_delay_set(self, args: dict[str, Any]) -> None:
        if args["delay_s"] < 0:
            raise CommandFailed("the switch-off delay cannot be negative")
        self.m.set_switch_off_delay(args["delay_s"])

    def z_switch_off_delay_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"delay_s": self.m.switch_off_delay_s()}

    def z_tip_lift_set(self, args: dict[str, Any]) -> None:
        self.m.set_tip_lift(args["lift_m"])

    def z_tip_lift_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"lift_m": self.m.tip_lift_m()}

    def z_withdraw_rate_set(self, args: dict[str, Any]) -> None:
        if not args["rate_mps"] > 0:
            raise CommandFailed(f"withdraw rate {args['rate_mps']} m/s must be positive")
        self.m.config = replace(self.m.config, withdraw_rate_m_per_s=args["rate_mps"])

    def z_withdraw_rate_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"rate_mps": self.m.config.withdraw_rate_m_per_s}

    # -- Tip shaper, approach, motor ---------------------------------------------------------------------------

    async def tip_shaper_start(self, args: dict[str, Any]) -> None:
        duration = self.m.tip_shaper_start()
        self._notify()
        if args["wait"]:
            await self._sleep(min(duration, _timeout_s(args["timeout_ms"])))

    def tip_shaper_props_set(self, args: dict[str, Any]) -> None:
        now = self.m.tip_shaper_props()
        times = ("switch_off_delay_s", "lift_time1_s", "bias_settling_s", "lift_time2_s", "end_wait_s")
        if any(args[k] < 0 for k in times):
            raise CommandFailed("tip-shaper times cannot be negative")
        self.m.set_tip_shaper_props(TipShaperSettings(
            switch_off_delay_s=args["switch_off_delay_s"],
            change_bias=_code(args, "change_bias", {0: now.change_bias, 1: True, 2: False}, "change bias"),
            bias_V=args["bias_V"], tip_lift_m=args["tip_lift_m"], lift_time1_s=args["lift_time1_s"],
            bias_lift_V=args["bias_lift_V"], bias_settling_s=args["bias_settling_s"],
            lift_height_m=args["lift_height_m"], lift_time2_s=args["lift_time2_s"], end_wait_s=args["end_wait_s"],
            restore_feedback=_code(args, "restore_feedback", {0: now.restore_feedback, 1: True, 2: False}, "restore feedback"),
        ))

    def tip_shaper_props_get(self, args: dict[str, Any]) -> dict[str, Any]:
        p = self.m.tip_shaper_props()
        return {
            "switch_off_delay_s": p.switch_off_delay_s, "change_bias": int(p.change_bias), "bias_V": p.bias_V,
            "tip_lift_m": p.tip_lift_m, "lift_time1_s": p.lift_time1_s, "bias_lift_V": p.bias_lift_V,
            "bias_settling_s": p.bias_settling_s, "lift_height_m": p.lift_height_m, "lift_time2_s": p.lift_time2_s,
            "end_wait_s": p.end_wait_s, "restore_feedback": int(p.restore_feedback),
        }

    def approach_open(self, args: dict[str, Any]) -> None:
        """Opening the module's window changes nothing in the simulator."""

    def approach_set(self, args: dict[str, Any]) -> None:
        if _code(args, "on", {0: False, 1: True}, "approach on/off"):
            self.m.auto_approach_start()
        else:
            self.m.auto_approach_stop()

    def approach_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"running": int(self.m.auto_approach_running())}

    @staticmethod
    def _group(args: dict[str, Any]) -> None:
        if args.get("group", 0) != 0:
            raise CommandFailed(f"motor group {args['group']} does not exist (one group, 0)")

    async def motor_start_move(self, args: dict[str, Any]) -> None:
        self._group(args)
        if not 0 <= args["direction"] <= 5:
            raise CommandFailed(f"motor direction {args['direction']} does not exist (0..5)")
        duration = self.m.motor_move(args["direction"], args["steps"])
        self._notify()
        if args["wait"]:
            await self._sleep(duration)

    def motor_closed_loop(self, args: dict[str, Any]) -> None:
        raise CommandFailed("closed-loop moves are not supported by this controller (open-loop coarse positioner)")

    def motor_stop(self, args: dict[str, Any]) -> None:
        self.m.motor_stop()

    def motor_step_counter(self, args: dict[str, Any]) -> dict[str, Any]:
        x, y, z = self.m.motor_step_counter((bool(args["reset_x"]), bool(args["reset_y"]), bool(args["reset_z"])))
        return {"x": x, "y": y, "z": z}

    def motor_pos_get(self, args: dict[str, Any]) -> dict[str, Any]:
        self._group(args)
        x, y, z = self.m.motor_position_m()
        return {"x_m": x, "y_m": y, "z_m": z}

    def motor_freq_amp_get(self, args: dict[str, Any]) -> dict[str, Any]:
        if not 0 <= args.get("axis", 0) <= 3:
            raise CommandFailed(f"motor axis {args['axis']} does not exist (0 default, 1 X, 2 Y, 3 Z)")
        return {"frequency_Hz": self.m.config.motor_frequency_hz, "amplitude_V": self._motor_amplitude_V}

    def motor_freq_amp_set(self, args: dict[str, Any]) -> None:
        if not 0 <= args["axis"] <= 3:
            raise CommandFailed(f"motor axis {args['axis']} does not exist (0 all, 1 X, 2 Y, 3 Z)")
        if not args["frequency_Hz"] > 0 or not 0 <= args["amplitude_V"] <= 400:
            raise CommandFailed("motor frequency must be positive and the amplitude within 0..400 V")
        self.m.config = replace(self.m.config, motor_frequency_hz=args["frequency_Hz"])
        self._motor_amplitude_V = args["amplitude_V"]

    def safe_tip_set(self, args: dict[str, Any]) -> None:
        self._safe_tip = _code(args, "mode", {0: self._safe_tip, 1: True, 2: False}, "safe tip")

    def safe_tip_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"on": int(self._safe_tip)}

    # -- Follow Me, current, piezo, signals, utilities ----------------------------------------------------------

    async def folme_xy_set(self, args: dict[str, Any]) -> None:
        duration = self.m.set_folme_xy(args["x_m"], args["y_m"])
        self._notify()
        if args["wait"]:
            await self._sleep(duration)

    async def folme_xy_get(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["wait_newest"]:
            await self._sleep(ACQUISITION_PERIOD_S)
        x, y = self.m.folme_xy()
        return {"x_m": x, "y_m": y}

    def folme_speed_set(self, args: dict[str, Any]) -> None:
        self.m.set_folme_speed(args["speed_mps"], _code(args, "custom", {0: False, 1: True}, "custom speed"))

    def folme_speed_get(self, args: dict[str, Any]) -> dict[str, Any]:
        speed, custom = self.m.folme_speed()
        return {"speed_mps": speed, "custom": int(custom)}

    def folme_stop(self, args: dict[str, Any]) -> None:
        """Follow-Me moves complete at once in the simulator: nothing to stop."""

    def current_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"current_A": self.m.current_A()}

    def current_gains_get(self, args: dict[str, Any]) -> dict[str, Any]:
        gain, filt = self._gain
        return {"gains": list(CURRENT_GAINS), "gain_index": gain, "filters": list(CURRENT_FILTERS), "filter_index": filt}

    def current_gain_set(self, args: dict[str, Any]) -> None:
        gain, filt = args["gain_index"], args.get("filter_index", -1)
        if not 0 <= gain < len(CURRENT_GAINS) or not -1 <= filt < len(CURRENT_FILTERS):
            raise CommandFailed(
                f"gain {gain} / filter {filt} do not exist ({len(CURRENT_GAINS)} gains, {len(CURRENT_FILTERS)} filters)"
            )
        self._gain = (gain, self._gain[1] if filt == -1 else filt)

    def piezo_range_get(self, args: dict[str, Any]) -> dict[str, Any]:
        x, y, z = self.m.piezo_range()
        return {"x_m": x, "y_m": y, "z_m": z}

    def signal_names(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"names": self.m.signal_names()}

    async def signal_value(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["wait_newest"]:
            await self._sleep(ACQUISITION_PERIOD_S)
        return {"value": self.m.signal_value(args["index"])}

    async def signal_values(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["wait_newest"]:
            await self._sleep(ACQUISITION_PERIOD_S)
        return {"values": np.array([self.m.signal_value(i) for i in args["indexes"]], dtype=np.float32)}

    def signal_range(self, args: dict[str, Any]) -> dict[str, Any]:
        index = args["index"]
        if not 0 <= index < len(SIGNAL_NAMES):
            raise CommandFailed(f"signal index {index} out of range 0-{len(SIGNAL_NAMES) - 1}")
        if index == CURRENT_INDEX:
            return {"max": CURRENT_SATURATION_A, "min": -CURRENT_SATURATION_A}
        if index == Z_INDEX:
            high, low = self.m.z_limits()
            return {"max": high, "min": low}
        limit = BIAS_RANGES[self._bias_range][1] if index == BIAS_INDEX else 10.0
        return {"max": limit, "min": -limit}

    def signal_slots(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"names": [SIGNAL_NAMES[i] for i in SLOT_SIGNALS], "indexes": list(SLOT_SIGNALS)}

    def version_get(self, args: dict[str, Any]) -> dict[str, Any]:
        product, version, host_release, rt_release = self.version
        return {"product": product, "version": version, "host_release": host_release, "rt_release": rt_release}

    def session_path_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"path": self._session_path}

    def session_path_set(self, args: dict[str, Any]) -> None:
        if not args["path"]:
            raise CommandFailed("the session path cannot be empty")
        self._session_path = args["path"]

    def acq_period_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"period_s": ACQUISITION_PERIOD_S}

    def rt_freq_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"frequency_Hz": RT_FREQUENCY_HZ}


def microscope_handlers(
    microscope: SimulatedMicroscope,
    clock: SimClock,
    *,
    release: Release = Release.R14718,
    poll_quantum_s: float = DEFAULT_POLL_QUANTUM_S,
    command_latency_s: float = DEFAULT_COMMAND_LATENCY_S,
    version: tuple[str, str, int, int] | None = None,
) -> dict[str, Handler]:
    """A handler for every command of the table, answering from `microscope` (which must run on `clock`).

    Keys are the table's command names; pass the dict to `FakeNanonisServer(handlers=...)`. `release` selects
    the channel-index convention and the Scan.Action codes; `version` is what Util.VersionGet answers
    (default: product, "Generic 5", and `release` as both release numbers). Timing: see the module docstring.
    """
    version = version or (DEFAULT_PRODUCT, DEFAULT_VERSION_NAME, int(release), int(release))
    return _MicroscopeHandlers(microscope, clock, release, version, poll_quantum_s, command_latency_s).wrapped()


class SimulatorServer:
    """A `SimulatedMicroscope` on its own `SimClock`, served by a `FakeNanonisServer` on 127.0.0.1.

    `.microscope` is the ground truth for evaluation code (Python API only); `.server` is the fake server
    (fault injection: `.server.inject(...)`; request logs when `record=True`); `.clock` the simulated clock;
    `at(time_s, action)` schedules scripted events (lost contact, crashes, probe changes) in simulated time.
    `clock` may be given for tests (e.g. a clock with an injected wall); its time scale must equal
    `time_scale`.

        async with SimulatorServer(seed=1) as sim:     # time_scale 0: as fast as possible
            port = sim.port
    """

    def __init__(
        self,
        seed: int,
        time_scale: float = 0.0,
        config: SimConfig | None = None,
        record: bool = False,
        release: Release = Release.R14718,
        *,
        poll_quantum_s: float = DEFAULT_POLL_QUANTUM_S,
        command_latency_s: float = DEFAULT_COMMAND_LATENCY_S,
        clock: SimClock | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if clock is not None and clock.time_scale != time_scale:
            raise ValueError(f"clock runs at time scale {clock.time_scale}, not {time_scale}")
        self.seed = int(seed)
        self.clock = clock or SimClock(time_scale)
        self.microscope = SimulatedMicroscope(seed, self.clock, config)
        version = (DEFAULT_PRODUCT, DEFAULT_VERSION_NAME, int(release), int(release))
        self._handlers = _MicroscopeHandlers(self.microscope, self.clock, release, version, poll_quantum_s, command_latency_s)
        self.server = FakeNanonisServer(release=release, host=host, handlers=self._handlers.wrapped(), record=record,
                                        version=version)

    def at(self, time_s: float, action: Callable[[SimulatedMicroscope], Any]) -> None:
        """Run `action(microscope)` before the first request served at or after simulated time `time_s`.

        For scripted, deterministic events in end-to-end runs, e.g. lost contact after ten minutes:
        `sim.at(600.0, lambda m: m.inject_z_jump(-250e-9))`; a crash: `m.inject_z_jump(+850e-9)`.
        """
        self._handlers.schedule(time_s, action)

    @property
    def time_scale(self) -> float:
        return self.clock.time_scale

    async def start(self, port: int = 0) -> int:
        """Listen on `port` (0 = an ephemeral port); returns the port."""
        return await self.server.start(port)

    async def listen(self, port: int = 0) -> int:
        """Listen on one more port (the real server has four, 6501-6504); returns it."""
        return await self.server.listen(port)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def ports(self) -> list[int]:
        return self.server.ports

    async def close(self) -> None:
        """Stop serving; pending requests are cancelled."""
        await self.server.close()

    async def __aenter__(self) -> SimulatorServer:
        if not self.server.ports:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _print_line(line: str) -> None:
    print(line, flush=True)


async def serve_forever(
    port: int = 6501,
    seed: int = 0,
    time_scale: float = 1.0,
    *,
    config: SimConfig | None = None,
    release: Release = Release.R14718,
    n_ports: int = 1,
    host: str = "127.0.0.1",
    announce: Callable[[str], None] = _print_line,
) -> None:
    """Serve a simulated microscope on `host` until cancelled (what `deepspm simulate` runs).

    `port` is the first port (0 = ephemeral); `n_ports` > 1 also listens on the following ports (as the
    real server's 6501-6504; with port 0, on further ephemeral ports), all sharing one instrument.
    `time_scale` is wall seconds per simulated second (1 = real time, 0 = as fast as possible). Once
    listening, `announce` (default: print to stdout) gets one line with the address. Cancellation (Ctrl-C
    under `asyncio.run`) closes the server cleanly and re-raises.

        asyncio.run(serve_forever(6501, seed=1, time_scale=1.0))
    """
    if n_ports < 1:
        raise ValueError(f"n_ports must be >= 1, got {n_ports}")
    sim = SimulatorServer(seed, time_scale, config, record=False, release=release, host=host)
    try:
        ports = [await sim.start(port)]
        for k in range(1, n_ports):
            ports.append(await sim.listen(port + k if port else 0))
        where = ", ".join(f"{host}:{p}" for p in ports)
        announce(f"deepspm simulator: Nanonis TCP on {where} (seed {seed}, time scale {time_scale:g}, "
                 f"release {release.name}); Ctrl-C stops")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Our own handlers: a process started in the background by a shell inherits SIGINT ignored, and a
        # service manager stops with SIGTERM; either way Ctrl-C or a stop request ends the server cleanly.
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                pass
        try:
            await stop.wait()  # until a signal, or cancelled
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.remove_signal_handler(signum)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
    finally:
        await sim.close()

