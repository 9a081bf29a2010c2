"""The one command table: every Nanonis command we speak, its argument and reply layouts per release.

It drives the client's encoding and decoding and the fake server's decoding and encoding alike
(reference: nanonis-tcp.md sections 3 and 3.7). Layouts are written compactly as ``"name:type ..."``;
the reply layouts omit the closing error section, which the codec handles for every reply.

`mutating` marks commands that change the instrument: they must pass the safety envelope and are never
retried automatically. `blocking` marks commands whose reply waits for something physical (a scan, a
withdraw, a pulse); the connection gives them a longer deadline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from deepspm.io.codec import (
    DecodedReply,
    Field,
    decode_reply_body,
    decode_values,
    encode_error_section,
    encode_values,
    fields,
)
from deepspm.io.errors import ArgumentError, ProtocolError, UnsupportedCommand


class Release(IntEnum):
    """The Nanonis software releases whose layouts differ (the R-numbers of the vendor's documents)."""

    R10862 = 10862
    R13742 = 13742
    R14718 = 14718


# Thresholds on the RT-engine release, as the community client uses them (reference 3.7).
_SLOT_INDEX_BELOW = 11798
_AUTOPASTE_FROM = 14000


def release_for(rt_engine_release: int | None) -> Release:
    """Pick the layouts for a server: None means Util.VersionGet failed (older than R13742)."""
    if rt_engine_release is None or rt_engine_release < _SLOT_INDEX_BELOW:
        return Release.R10862
    if rt_engine_release < _AUTOPASTE_FROM:
        return Release.R13742
    return Release.R14718


@dataclass(frozen=True)
class Layout:
    args: tuple[Field, ...]
    reply: tuple[Field, ...]


@dataclass(frozen=True)
class CommandSpec:
    name: str
    layouts: Mapping[Release, Layout]  # the releases that have this command
    mutating: bool = False
    blocking: bool = False
    doc: str = ""

    def layout(self, release: Release) -> Layout:
        try:
            return self.layouts[release]
        except KeyError:
            have = ", ".join(r.name for r in self.layouts)
            raise UnsupportedCommand(f"{self.name} does not exist in release {release.name} (only {have})") from None

    def arg_names(self, release: Release = Release.R14718) -> tuple[str, ...]:
        return tuple(f.name for f in self.layout(release).args)

    # -- client side ------------------------------------------------------------------------------------
    def encode_args(self, values: Sequence[Any], release: Release) -> bytes:
        return encode_values(self.layout(release).args, values, self.name)

    def decode_reply(self, body: bytes, release: Release) -> DecodedReply:
        return decode_reply_body(self.layout(release).reply, body, self.name)

    # -- server side ------------------------------------------------------------------------------------
    def decode_args(self, body: bytes, release: Release) -> dict[str, Any]:
        buf = memoryview(body)
        values, pos = decode_values(self.layout(release).args, buf, 0, self.name)
        if pos != len(buf):
            raise ProtocolError(f"{self.name}: request body has {len(buf) - pos} bytes beyond its layout", body[:256])
        return values

    def encode_reply(self, values: Mapping[str, Any] | None, release: Release, status: int = 0, message: str = "") -> bytes:
        """The reply body; with status 1 the full layout with zero values precedes the error section."""
        reply = self.layout(release).reply
        if status:
            ordered = [f.type.zero() for f in reply]
        else:
            values = values or {}
            missing = [f.name for f in reply if f.name not in values]
            if missing:
                raise ArgumentError(f"{self.name}: reply lacks {missing}")
            ordered = [values[f.name] for f in reply]
        return encode_values(reply, ordered, self.name) + encode_error_section(status, message)


_ALL = (Release.R10862, Release.R13742, Release.R14718)
_FROM_13742 = (Release.R13742, Release.R14718)

TABLE: dict[str, CommandSpec] = {}


def _cmd(
    name: str,
    args: str = "",
    reply: str = "",
    *,
    mutating: bool = False,
    blocking: bool = False,
    releases: Sequence[Release] = _ALL,
    variants: Mapping[Release, tuple[str, str]] | None = None,
    doc: str = "",
) -> None:
    layouts = {r: Layout(fields(args), fields(reply)) for r in releases}
    for r, (a, b) in (variants or {}).items():
        layouts[r] = Layout(fields(a), fields(b))
    TABLE[name.lower()] = CommandSpec(name, layouts, mutating, blocking, doc)


# -- Bias ---------------------------------------------------------------------------------------------------
_cmd("Bias.Set", "bias_V:f32", mutating=True)
_cmd("Bias.Get", "", "bias_V:f32")
_cmd("Bias.Pulse", "wait:u32 width_s:f32 bias_V:f32 z_hold:u16 absolute:u16", mutating=True, blocking=True,
     doc="z_hold: 0 no change, 1 hold, 2 don't; absolute: 0 no change, 1 relative, 2 absolute")
_cmd("Bias.RangeGet", "", "ranges:strarr index:u16")
_cmd("Bias.RangeSet", "index:u16", mutating=True)

# -- Scan ---------------------------------------------------------------------------------------------------
_cmd("Scan.Action", "action:u16 direction_up:u32", mutating=True,
     doc="action: 0 start, 1 stop, 2 pause, 3 resume (R13742+: 4 freeze, 5 unfreeze, 6 go to centre)")
_cmd("Scan.StatusGet", "", "running:u32")
_cmd("Scan.WaitEndOfScan", "timeout_ms:i32", "timed_out:u32 path:str", blocking=True)
_cmd("Scan.WaitEndOfLine", "timeout_ms:i32", "timed_out:u32 line:i32 phase:u16 pass_index:i32",
     blocking=True, releases=_FROM_13742)
_cmd("Scan.FrameSet", "x_m:f32 y_m:f32 width_m:f32 height_m:f32 angle_deg:f32", mutating=True)
_cmd("Scan.FrameGet", "", "x_m:f32 y_m:f32 width_m:f32 height_m:f32 angle_deg:f32")
_cmd("Scan.BufferSet", "channels:i32[] pixels:i32 lines:i32", mutating=True)
_cmd("Scan.BufferGet", "", "channels:i32[] pixels:i32 lines:i32")
_PROPS_OLD = "continuous:u32 bouncy:u32 autosave:u32 series:str comment:str"
_cmd("Scan.PropsSet", _PROPS_OLD, mutating=True, variants={
    Release.R13742: (_PROPS_OLD + " modules:strarr", ""),
    Release.R14718: (_PROPS_OLD + " modules:strarr autopaste:u32", ""),
}, doc="Set codes: 0 no change, 1 on, 2 off; autosave 0 no change, 1 all, 2 next, 3 off")
_cmd("Scan.PropsGet", "", _PROPS_OLD, variants={
    Release.R14718: ("", _PROPS_OLD + " modules:strarr params_per_module:i32[] parameters:str[][] autopaste:u32"),
}, doc="Get codes: 0/1 flags; autosave 0 all, 1 next, 2 off")
_SPEED = "fwd_speed_mps:f32 bwd_speed_mps:f32 fwd_line_time_s:f32 bwd_line_time_s:f32 keep:u16 bwd_fwd_ratio:f32"
_cmd("Scan.SpeedSet", _SPEED, mutating=True, doc="keep (Set): 0 no change, 1 speed, 2 time")
_cmd("Scan.SpeedGet", "", _SPEED, doc="keep (Get): 0 speed, 1 time")
_cmd("Scan.FrameDataGrab", "channel:u32 forward:u32", "channel_name:str data:f32[][] scan_up:u32")
_cmd("Scan.XYPosGet", "wait_newest:u32", "x_m:f32 y_m:f32", releases=_FROM_13742)
_cmd("Scan.Save", "wait:u32 timeout_ms:i32", "timed_out:u32", mutating=True, blocking=True, releases=_FROM_13742)

# -- Z controller -----------------------------------------------------------------------------------------
_cmd("ZCtrl.ZPosSet", "z_m:f32", mutating=True)
_cmd("ZCtrl.ZPosGet", "", "z_m:f32")
_cmd("ZCtrl.OnOffSet", "on:u32", mutating=True)
_cmd("ZCtrl.OnOffGet", "", "on:u32")
_cmd("ZCtrl.SetpntSet", "setpoint:f32", mutating=True)
_cmd("ZCtrl.SetpntGet", "", "setpoint:f32")
_cmd("ZCtrl.GainSet", "p_gain:f32 time_constant_s:f32 i_gain:f32", mutating=True)
_cmd("ZCtrl.GainGet", "", "p_gain:f32 time_constant_s:f32 i_gain:f32")
_cmd("ZCtrl.LimitsSet", "high_m:f32 low_m:f32", mutating=True)
_cmd("ZCtrl.LimitsGet", "", "high_m:f32 low_m:f32")
_cmd("ZCtrl.LimitsEnabledSet", "enabled:u32", mutating=True)
_cmd("ZCtrl.LimitsEnabledGet", "", "enabled:u32")
_cmd("ZCtrl.Withdraw", "wait:u32 timeout_ms:i32", mutating=True, blocking=True)
_cmd("ZCtrl.Home", "", mutating=True)
_cmd("ZCtrl.HomePropsSet", "mode:u16 z_m:f32", mutating=True, doc="Set: 0 no change, 1 absolute, 2 relative")
_cmd("ZCtrl.HomePropsGet", "", "mode:u16 z_m:f32", doc="Get: 0 absolute, 1 relative")
_cmd("ZCtrl.StatusGet", "", "status:u16", doc="1 off, 2 on, 3 hold, 4 switching off, 5 safe-tip event, 6 withdrawing")
_cmd("ZCtrl.SwitchOffDelaySet", "delay_s:f32", mutating=True)
_cmd("ZCtrl.SwitchOffDelayGet", "", "delay_s:f32")
_cmd("ZCtrl.TipLiftSet", "lift_m:f32", mutating=True)
_cmd("ZCtrl.TipLiftGet", "", "lift_m:f32")
_cmd("ZCtrl.WithdrawRateSet", "rate_mps:f32", mutating=True)
_cmd("ZCtrl.WithdrawRateGet", "", "rate_mps:f32")

# -- Tip shaper, approach, motor ----------------------------------------------------------------------------
_cmd("TipShaper.Start", "wait:u32 timeout_ms:i32", mutating=True, blocking=True)
_TIPSHAPER = ("switch_off_delay_s:f32 change_bias:u32 bias_V:f32 tip_lift_m:f32 lift_time1_s:f32 bias_lift_V:f32 "
              "bias_settling_s:f32 lift_height_m:f32 lift_time2_s:f32 end_wait_s:f32 restore_feedback:u32")
_cmd("TipShaper.PropsSet", _TIPSHAPER, mutating=True, doc="flags (Set): 0 no change, 1 yes, 2 no")
_cmd("TipShaper.PropsGet", "", _TIPSHAPER, doc="flags (Get): 0 no, 1 yes")
_cmd("AutoApproach.Open", "")
_cmd("AutoApproach.OnOffSet", "on:u16", mutating=True)
_cmd("AutoApproach.OnOffGet", "", "running:u16")
_cmd("Motor.StartMove", "direction:u32 steps:u16 group:u32 wait:u32", mutating=True, blocking=True,
     doc="direction: 0 X+, 1 X-, 2 Y+, 3 Y-, 4 Z+, 5 Z-")
_CLOSED = "absolute:u32 x_m:f64 y_m:f64 z_m:f64 wait:u32"
_cmd("Motor.StartClosedLoop", _CLOSED + " group:u32", mutating=True, blocking=True,
     variants={Release.R10862: (_CLOSED, "")})
_cmd("Motor.StopMove", "", mutating=True)
_cmd("Motor.StepCounterGet", "reset_x:u32 reset_y:u32 reset_z:u32", "x:i32 y:i32 z:i32")
_cmd("Motor.PosGet", "group:u32 timeout_ms:u32", "x_m:f64 y_m:f64 z_m:f64",
     variants={Release.R10862: ("", "x_m:f64 y_m:f64 z_m:f64")})
_cmd("Motor.FreqAmpGet", "axis:u16", "frequency_Hz:f32 amplitude_V:f32",
     variants={Release.R10862: ("", "frequency_Hz:f32 amplitude_V:f32")})
_cmd("Motor.FreqAmpSet", "frequency_Hz:f32 amplitude_V:f32 axis:u16", mutating=True)
_cmd("SafeTip.OnOffSet", "mode:u16", mutating=True, doc="Set: 0 no change, 1 on, 2 off")
_cmd("SafeTip.OnOffGet", "", "on:u16", doc="Get: 0 off, 1 on")

# -- Follow Me, current, piezo, signals, utilities -----------------------------------------------------------
_cmd("FolMe.XYPosSet", "x_m:f64 y_m:f64 wait:u32", mutating=True, blocking=True)
_cmd("FolMe.XYPosGet", "wait_newest:u32", "x_m:f64 y_m:f64")
_cmd("FolMe.SpeedSet", "speed_mps:f32 custom:u32", mutating=True)
_cmd("FolMe.SpeedGet", "", "speed_mps:f32 custom:u32")
_cmd("FolMe.Stop", "", mutating=True)
_cmd("Current.Get", "", "current_A:f32")
_cmd("Current.GainsGet", "", "gains:strarr gain_index:i32 filters:strarr filter_index:i32",
     variants={Release.R10862: ("", "gains:strarr gain_index:u16")})
_cmd("Current.GainSet", "gain_index:i32 filter_index:i32", mutating=True,
     variants={Release.R10862: ("gain_index:u16", "")})
_cmd("Piezo.RangeGet", "", "x_m:f32 y_m:f32 z_m:f32")
_cmd("Signals.NamesGet", "", "names:strarr")
_cmd("Signals.ValGet", "index:i32 wait_newest:u32", "value:f32")
_cmd("Signals.ValsGet", "indexes:i32[] wait_newest:u32", "values:f32[]")
_cmd("Signals.RangeGet", "index:i32", "max:f32 min:f32")
_cmd("Signals.InSlotsGet", "", "names:strarr indexes:i32[]", releases=(Release.R10862,))
_cmd("Util.VersionGet", "", "product:str version:str host_release:u32 rt_release:u32", releases=_FROM_13742)
_cmd("Util.SessionPathGet", "", "path:str")
_cmd("Util.SessionPathSet", "path:str save_previous:u32", mutating=True, releases=_FROM_13742)
_cmd("Util.AcqPeriodGet", "", "period_s:f32")
_cmd("Util.RTFreqGet", "", "frequency_Hz:f32")


def lookup(name: str) -> CommandSpec:
    """The spec for a command name, matched case-insensitively (the real server appears to)."""
    try:
        return TABLE[name.lower()]
    except KeyError:
        raise UnsupportedCommand(f"unknown Nanonis command {name!r}") from None


MUTATING: frozenset[str] = frozenset(s.name for s in TABLE.values() if s.mutating)
