"""Typed async client for the Nanonis TCP interface, in SI units (metres, volts, amperes, seconds).

Every method is one command of the table in `commands.py`. Mutating commands pass the safety envelope
before they are encoded (there is no path to the wire around it) and are never re-sent; reads are retried
once after a reconnect. `Util.VersionGet` on every (re)connect selects the layouts of the server's release.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from deepspm.io.commands import CommandSpec, Release, lookup, release_for
from deepspm.io.connection import NanonisConnection
from deepspm.io.errors import ArgumentError, CommandTimeout, ConnectionLost, NanonisError, UnsupportedCommand
from deepspm.io.safety import SafetyEnvelope

log = structlog.get_logger(__name__)

_MARGIN_S = 5.0  # added to a blocking command's own timeout


@dataclass(frozen=True)
class VersionInfo:
    product: str
    version: str
    host_release: int
    rt_release: int


@dataclass(frozen=True)
class ScanFrame:
    x_m: float
    y_m: float
    width_m: float
    height_m: float
    angle_deg: float


@dataclass(frozen=True)
class ScanBuffer:
    channels: list[int]
    pixels: int
    lines: int


@dataclass(frozen=True)
class ScanSpeed:
    fwd_speed_mps: float
    bwd_speed_mps: float
    fwd_line_time_s: float
    bwd_line_time_s: float
    keep: int
    bwd_fwd_ratio: float


@dataclass(frozen=True)
class FrameData:
    channel_name: str
    data: np.ndarray  # (lines, pixels) float32, physical units, NaN where not yet acquired
    scan_up: bool


@dataclass(frozen=True)
class TipShaperProps:
    switch_off_delay_s: float
    change_bias: int
    bias_V: float
    tip_lift_m: float
    lift_time1_s: float
    bias_lift_V: float
    bias_settling_s: float
    lift_height_m: float
    lift_time2_s: float
    end_wait_s: float
    restore_feedback: int


@dataclass(frozen=True)
class Xyz:
    x_m: float
    y_m: float
    z_m: float


class NanonisClient:
    def __init__(
        self,
        connection: NanonisConnection,
        safety: SafetyEnvelope,
        *,
        release: Release | None = None,
        default_timeout_s: float = 10.0,
        version_timeout_s: float = 2.0,
        blocking_timeout_s: float = 60.0,
    ) -> None:
        self.connection = connection
        self.safety = safety
        self._release_override = release
        self.release: Release | None = release
        self.version: VersionInfo | None = None
        self.default_timeout_s = default_timeout_s
        self.version_timeout_s = version_timeout_s
        self.blocking_timeout_s = blocking_timeout_s

    # -- connection -----------------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the connection and detect the server's release (unless configured)."""
        await self.connection.connect()
        if self._release_override is not None:
            self.release = self._release_override
            return
        try:
            reply = await self._exchange(lookup("Util.VersionGet"), (), Release.R14718, self.version_timeout_s)
            self.version = VersionInfo(**reply)
            self.release = release_for(self.version.rt_release)
        except (NanonisError, UnsupportedCommand):
            self.version, self.release = None, Release.R10862
        except CommandTimeout:
            self.version, self.release = None, Release.R10862
            await self.connection.connect()
        log.info("nanonis.version", release=self.release.name, version=self.version)

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> NanonisClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the one path to the wire ---------------------------------------------------------------------------
    async def call(self, name: str, *args: Any, timeout_s: float | None = None) -> dict[str, Any]:
        """Run one command by name with its arguments in table order; returns the reply fields by name."""
        spec = lookup(name)
        if not self.connection.connected or self.release is None:
            await self.connect()
        assert self.release is not None
        names = spec.arg_names(self.release)
        if len(args) != len(names):
            raise ArgumentError(f"{spec.name} takes {len(names)} arguments ({', '.join(names)}), got {len(args)}")
        values = dict(zip(names, args))
        if spec.mutating:
            self.safety.check(spec.name, values)  # before a single byte is encoded
        deadline = timeout_s if timeout_s is not None else self._deadline(spec, values)
        try:
            reply = await self._exchange(spec, args, self.release, deadline)
        except (CommandTimeout, ConnectionLost):
            if spec.mutating:
                self.safety.forget(spec.name)
                raise
            if spec.blocking:
                raise
            log.warning("nanonis.read_retry", command=spec.name)
            await self.connect()
            reply = await self._exchange(spec, args, self.release, deadline)
        self.safety.observe(spec.name, values, reply)
        return reply

    async def _exchange(self, spec: CommandSpec, args: Sequence[Any], release: Release, timeout_s: float) -> dict[str, Any]:
        body = spec.encode_args(args, release)
        message = await self.connection.request(spec.name, body, timeout_s)
        reply = spec.decode_reply(message.body, release)
        if reply.status:
            raise NanonisError(spec.name, reply.status, reply.message)
        return reply.values

    def _deadline(self, spec: CommandSpec, values: dict[str, Any]) -> float:
        if not spec.blocking:
            return self.default_timeout_s
        if "timeout_ms" in values and values["timeout_ms"] >= 0:
            return values["timeout_ms"] / 1000.0 + _MARGIN_S
        if "width_s" in values:
            return values["width_s"] + _MARGIN_S
        return self.blocking_timeout_s

    # -- Bias -----------------------------------------------------------------------------------------------
    async def bias_set(self, bias_V: float) -> None:
        await self.call("Bias.Set", bias_V)

    async def bias_get(self) -> float:
        return (await self.call("Bias.Get"))["bias_V"]

    async def bias_pulse(
        self, width_s: float, bias_V: float, *, wait: bool = True, z_hold: int = 1, absolute: bool = True
    ) -> None:
        """A bias pulse; z_hold 1 holds the z controller during the pulse."""
        await self.call("Bias.Pulse", int(wait), width_s, bias_V, z_hold, 2 if absolute else 1)

    async def bias_range_get(self) -> tuple[list[str], int]:
        r = await self.call("Bias.RangeGet")
        return r["ranges"], r["index"]

    async def bias_range_set(self, index: int) -> None:
        await self.call("Bias.RangeSet", index)

    # -- Scan -----------------------------------------------------------------------------------------------
    async def scan_action(self, action: int, up: bool = True) -> None:
        """0 start, 1 stop, 2 pause, 3 resume (R13742+: 4 freeze, 5 unfreeze, 6 go to centre)."""
        await self.call("Scan.Action", action, int(up))

    async def scan_start(self, up: bool = True) -> None:
        await self.scan_action(0, up)

    async def scan_stop(self) -> None:
        await self.scan_action(1)

    async def scan_status(self) -> bool:
        return bool((await self.call("Scan.StatusGet"))["running"])

    async def scan_wait_end(self, timeout_s: float) -> tuple[bool, str]:
        """Block until the scan ends; returns (timed_out, path of the auto-saved file)."""
        r = await self.call("Scan.WaitEndOfScan", int(timeout_s * 1000))
        return bool(r["timed_out"]), r["path"]

    async def scan_wait_end_of_line(self, timeout_s: float) -> dict[str, Any]:
        return await self.call("Scan.WaitEndOfLine", int(timeout_s * 1000))

    async def scan_frame_set(self, x_m: float, y_m: float, width_m: float, height_m: float, angle_deg: float = 0.0) -> None:
        await self.call("Scan.FrameSet", x_m, y_m, width_m, height_m, angle_deg)

    async def scan_frame_get(self) -> ScanFrame:
        return ScanFrame(**await self.call("Scan.FrameGet"))

    async def scan_buffer_set(self, channels: Sequence[int], pixels: int, lines: int) -> None:
        await self.call("Scan.BufferSet", list(channels), pixels, lines)

    async def scan_buffer_get(self) -> ScanBuffer:
        return ScanBuffer(**await self.call("Scan.BufferGet"))

    async def scan_props_set(
        self, continuous: int = 0, bouncy: int = 0, autosave: int = 0, series: str = "", comment: str = "",
        modules: Sequence[str] = (), autopaste: int = 0,
    ) -> None:
        """Set codes: 0 no change, 1 on, 2 off; autosave 0 no change, 1 all, 2 next, 3 off."""
        args: list[Any] = [continuous, bouncy, autosave, series, comment]
        if self.release is not None and self.release >= Release.R13742:
            args.append(list(modules))
        if self.release == Release.R14718:
            args.append(autopaste)
        await self.call("Scan.PropsSet", *args)

    async def scan_props_get(self) -> dict[str, Any]:
        """Get codes: flags 0/1; autosave 0 all, 1 next, 2 off."""
        return await self.call("Scan.PropsGet")

    async def scan_speed_set(self, fwd_speed_mps: float, bwd_speed_mps: float) -> None:
        """Set forward and backward tip speeds (keep speed constant when the frame changes)."""
        await self.call("Scan.SpeedSet", fwd_speed_mps, bwd_speed_mps, 0.0, 0.0, 1, bwd_speed_mps / fwd_speed_mps)

    async def scan_speed_get(self) -> ScanSpeed:
        return ScanSpeed(**await self.call("Scan.SpeedGet"))

    async def scan_frame_data_grab(self, channel: int, forward: bool = True) -> FrameData:
        r = await self.call("Scan.FrameDataGrab", channel, int(forward))
        return FrameData(r["channel_name"], r["data"], bool(r["scan_up"]))

    async def scan_xy_pos_get(self, wait_newest: bool = False) -> tuple[float, float]:
        r = await self.call("Scan.XYPosGet", int(wait_newest))
        return r["x_m"], r["y_m"]

    async def scan_save(self, timeout_s: float, wait: bool = True) -> bool:
        return bool((await self.call("Scan.Save", int(wait), int(timeout_s * 1000)))["timed_out"])

    # -- Z controller ---------------------------------------------------------------------------------------
    async def z_pos_set(self, z_m: float) -> None:
        await self.call("ZCtrl.ZPosSet", z_m)

    async def z_pos_get(self) -> float:
        return (await self.call("ZCtrl.ZPosGet"))["z_m"]

    async def z_ctrl_on_set(self, on: bool) -> None:
        await self.call("ZCtrl.OnOffSet", int(on))

    async def z_ctrl_on_get(self) -> bool:
        return bool((await self.call("ZCtrl.OnOffGet"))["on"])

    async def z_setpoint_set(self, setpoint: float) -> None:
        await self.call("ZCtrl.SetpntSet", setpoint)

    async def z_setpoint_get(self) -> float:
        return (await self.call("ZCtrl.SetpntGet"))["setpoint"]

    async def z_gain_set(self, p_gain: float, time_constant_s: float, i_gain: float) -> None:
        await self.call("ZCtrl.GainSet", p_gain, time_constant_s, i_gain)

    async def z_gain_get(self) -> tuple[float, float, float]:
        r = await self.call("ZCtrl.GainGet")
        return r["p_gain"], r["time_constant_s"], r["i_gain"]

    async def z_limits_set(self, high_m: float, low_m: float) -> None:
        await self.call("ZCtrl.LimitsSet", high_m, low_m)

    async def z_limits_get(self) -> tuple[float, float]:
        r = await self.call("ZCtrl.LimitsGet")
        return r["high_m"], r["low_m"]

    async def z_limits_enabled_set(self, enabled: bool) -> None:
        await self.call("ZCtrl.LimitsEnabledSet", int(enabled))

    async def z_limits_enabled_get(self) -> bool:
        return bool((await self.call("ZCtrl.LimitsEnabledGet"))["enabled"])

    async def z_withdraw(self, timeout_s: float = 10.0, wait: bool = True) -> None:
        await self.call("ZCtrl.Withdraw", int(wait), int(timeout_s * 1000))

    async def z_home(self) -> None:
        await self.call("ZCtrl.Home")

    async def z_home_props_set(self, mode: int, z_m: float) -> None:
        await self.call("ZCtrl.HomePropsSet", mode, z_m)

    async def z_home_props_get(self) -> tuple[int, float]:
        r = await self.call("ZCtrl.HomePropsGet")
        return r["mode"], r["z_m"]

    async def z_status_get(self) -> int:
        """1 off, 2 on, 3 hold, 4 switching off, 5 safe-tip event, 6 withdrawing."""
        return (await self.call("ZCtrl.StatusGet"))["status"]

    async def z_switch_off_delay_set(self, delay_s: float) -> None:
        await self.call("ZCtrl.SwitchOffDelaySet", delay_s)

    async def z_switch_off_delay_get(self) -> float:
        return (await self.call("ZCtrl.SwitchOffDelayGet"))["delay_s"]

    async def z_tip_lift_set(self, lift_m: float) -> None:
        await self.call("ZCtrl.TipLiftSet", lift_m)

    async def z_tip_lift_get(self) -> float:
        return (await self.call("ZCtrl.TipLiftGet"))["lift_m"]

    async def z_withdraw_rate_set(self, rate_mps: float) -> None:
        await self.call("ZCtrl.WithdrawRateSet", rate_mps)

    async def z_withdraw_rate_get(self) -> float:
        return (await self.call("ZCtrl.WithdrawRateGet"))["rate_mps"]

    # -- Tip shaper, approach, motor --------------------------------------------------------------------------
    async def tip_shaper_start(self, timeout_s: float = 30.0, wait: bool = True) -> None:
        await self.call("TipShaper.Start", int(wait), int(timeout_s * 1000))

    async def tip_shaper_props_set(self, props: TipShaperProps) -> None:
        """Flags (Set): 0 no change, 1 yes, 2 no. tip_lift_m < 0 moves towards the sample."""
        p = props
        await self.call(
            "TipShaper.PropsSet", p.switch_off_delay_s, p.change_bias, p.bias_V, p.tip_lift_m, p.lift_time1_s,
            p.bias_lift_V, p.bias_settling_s, p.lift_height_m, p.lift_time2_s, p.end_wait_s, p.restore_feedback,
        )

    async def tip_shaper_props_get(self) -> TipShaperProps:
        """Flags (Get): 0 no, 1 yes."""
        return TipShaperProps(**await self.call("TipShaper.PropsGet"))

    async def auto_approach_open(self) -> None:
        await self.call("AutoApproach.Open")

    async def auto_approach_set(self, on: bool) -> None:
        await self.call("AutoApproach.OnOffSet", int(on))

    async def auto_approach_running(self) -> bool:
        return bool((await self.call("AutoApproach.OnOffGet"))["running"])

    async def motor_start_move(
        self, direction: int, steps: int, group: int = 0, wait: bool = True, timeout_s: float | None = None
    ) -> None:
        """Coarse steps; direction 0 X+, 1 X-, 2 Y+, 3 Y-, 4 Z+, 5 Z-."""
        await self.call("Motor.StartMove", direction, steps, group, int(wait), timeout_s=timeout_s)

    async def motor_start_closed_loop(
        self, x_m: float, y_m: float, z_m: float, *, absolute: bool = True, wait: bool = True, group: int = 0
    ) -> None:
        args: list[Any] = [int(absolute), x_m, y_m, z_m, int(wait)]
        if self.release is not None and self.release >= Release.R13742:
            args.append(group)
        await self.call("Motor.StartClosedLoop", *args)

    async def motor_stop(self) -> None:
        await self.call("Motor.StopMove")

    async def motor_step_counter_get(self, reset: bool = False) -> tuple[int, int, int]:
        r = await self.call("Motor.StepCounterGet", int(reset), int(reset), int(reset))
        return r["x"], r["y"], r["z"]

    async def motor_pos_get(self, group: int = 0, timeout_s: float = 0.5) -> Xyz:
        args = () if self.release == Release.R10862 else (group, int(timeout_s * 1000))
        return Xyz(**await self.call("Motor.PosGet", *args))

    async def motor_freq_amp_get(self, axis: int = 0) -> tuple[float, float]:
        r = await self.call("Motor.FreqAmpGet", *(() if self.release == Release.R10862 else (axis,)))
        return r["frequency_Hz"], r["amplitude_V"]

    async def motor_freq_amp_set(self, frequency_Hz: float, amplitude_V: float, axis: int = 0) -> None:
        await self.call("Motor.FreqAmpSet", frequency_Hz, amplitude_V, axis)

    async def safe_tip_set(self, on: bool) -> None:
        await self.call("SafeTip.OnOffSet", 1 if on else 2)

    async def safe_tip_get(self) -> bool:
        return bool((await self.call("SafeTip.OnOffGet"))["on"])

    # -- Follow Me, current, piezo, signals, utilities -------------------------------------------------------
    async def folme_xy_set(self, x_m: float, y_m: float, wait: bool = True) -> None:
        await self.call("FolMe.XYPosSet", x_m, y_m, int(wait))

    async def folme_xy_get(self, wait_newest: bool = False) -> tuple[float, float]:
        r = await self.call("FolMe.XYPosGet", int(wait_newest))
        return r["x_m"], r["y_m"]

    async def folme_speed_set(self, speed_mps: float, custom: bool = True) -> None:
        await self.call("FolMe.SpeedSet", speed_mps, int(custom))

    async def folme_speed_get(self) -> tuple[float, bool]:
        r = await self.call("FolMe.SpeedGet")
        return r["speed_mps"], bool(r["custom"])

    async def folme_stop(self) -> None:
        await self.call("FolMe.Stop")

    async def current_get(self) -> float:
        return (await self.call("Current.Get"))["current_A"]

    async def current_gains_get(self) -> dict[str, Any]:
        return await self.call("Current.GainsGet")

    async def current_gain_set(self, gain_index: int, filter_index: int = -1) -> None:
        args = (gain_index,) if self.release == Release.R10862 else (gain_index, filter_index)
        await self.call("Current.GainSet", *args)

    async def piezo_range_get(self) -> Xyz:
        return Xyz(**await self.call("Piezo.RangeGet"))

    async def signal_names(self) -> list[str]:
        return (await self.call("Signals.NamesGet"))["names"]

    async def signal_value(self, index: int, wait_newest: bool = False) -> float:
        return (await self.call("Signals.ValGet", index, int(wait_newest)))["value"]

    async def signal_values(self, indexes: Sequence[int], wait_newest: bool = False) -> np.ndarray:
        return (await self.call("Signals.ValsGet", list(indexes), int(wait_newest)))["values"]

    async def signal_range(self, index: int) -> tuple[float, float]:
        r = await self.call("Signals.RangeGet", index)
        return r["max"], r["min"]

    async def signals_in_slots(self) -> tuple[list[str], list[int]]:
        r = await self.call("Signals.InSlotsGet")
        return r["names"], r["indexes"]

    async def version_get(self) -> VersionInfo:
        return VersionInfo(**await self.call("Util.VersionGet"))

    async def session_path_get(self) -> str:
        return (await self.call("Util.SessionPathGet"))["path"]

    async def session_path_set(self, path: str, save_previous: bool = False) -> None:
        await self.call("Util.SessionPathSet", path, int(save_previous))

    async def acquisition_period_get(self) -> float:
        return (await self.call("Util.AcqPeriodGet"))["period_s"]

    async def rt_frequency_get(self) -> float:
        return (await self.call("Util.RTFreqGet"))["frequency_Hz"]
