"""The safety envelope: every command that changes the instrument is checked here before it is encoded.

The client calls `SafetyEnvelope.check` for every mutating command of the table, so there is no path to
the wire around it. A violation raises `SafetyError` naming the rule. Defaults are the original DeepSPM
server's limits (reference deepspm.md section 6). Interlocks keep state learned from commands that
succeeded (`observe`) and forget it when an outcome is unknown (`forget`):

- coarse motion only with the tip known to be withdrawn;
- a scan starts only after a frame that passed the envelope was set in this session;
- the tip shaper starts only after its properties passed the envelope in this session;
- commands the controller never needs (gains, limits, session path, ...) are refused unless named in
  `SafetyLimits.allow_unchecked`.

Z convention: Nanonis z is positive away from the sample; a withdraw goes to the top of the range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NoReturn

from deepspm.io.errors import SafetyError


@dataclass(frozen=True)
class SafetyLimits:
    """Limits in SI units. Every field can be set from the run's config file."""

    bias_max_V: float = 8.2  # |bias| for the setpoint and pulses
    bias_min_V: float = 0.019  # |bias| below this would drive the tip into the sample under feedback
    pulse_width_min_s: float = 0.02
    pulse_width_max_s: float = 5.0
    dip_depth_max_m: float = 30e-9  # |tip lift| of the tip shaper
    tip_shaper_time_max_s: float = 5.0  # each timing field of the tip shaper
    setpoint_max_A: float = 1e-9
    piezo_fraction: float = 0.95  # frames and positions stay inside this fraction of the piezo range
    frame_size_min_m: float = 1e-9
    frame_size_max_m: float = 200e-9
    pixels_min: int = 8
    pixels_max: int = 1024
    scan_speed_max_mps: float = 1e-6
    coarse_steps_max: int = 500  # per Motor.StartMove
    z_fraction: float = 0.95  # ZCtrl.ZPosSet stays inside this fraction of the z range
    allow_unchecked: frozenset[str] = frozenset()  # exact command names let through without a rule

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (not math.isfinite(v) or v < 0):
                raise ValueError(f"safety limit {f.name} must be a finite non-negative number, got {v!r}")
        if not 0 < self.piezo_fraction <= 1 or not 0 < self.z_fraction <= 1:
            raise ValueError("piezo_fraction and z_fraction must be in (0, 1]")


@dataclass
class EnvelopeState:
    """What the envelope knows about the instrument; None means unknown."""

    piezo_range_m: tuple[float, float, float] | None = None  # full x, y, z ranges from Piezo.RangeGet
    tip_withdrawn: bool | None = None
    bias_V: float | None = None
    frame_checked: bool = False
    tip_shaper_armed: bool = False


Rule = Callable[["SafetyEnvelope", str, Mapping[str, Any]], None]


def _fail(command: str, rule: str, detail: str) -> NoReturn:
    raise SafetyError(command, rule, detail)


class SafetyEnvelope:
    def __init__(self, limits: SafetyLimits | None = None, piezo_range_m: tuple[float, float, float] | None = None) -> None:
        self.limits = limits or SafetyLimits()
        self.state = EnvelopeState(piezo_range_m=piezo_range_m)

    # -- the checks ---------------------------------------------------------------------------------------
    def check(self, command: str, args: Mapping[str, Any]) -> None:
        """Raise SafetyError unless `command` with `args` is inside the envelope."""
        for v in args.values():
            if isinstance(v, float) and not math.isfinite(v):
                _fail(command, "finite", f"non-finite argument {v!r}")
        rule = _RULES.get(command)
        if rule is not None:
            rule(self, command, args)
        elif command not in self.limits.allow_unchecked:
            _fail(command, "unchecked", "no envelope rule for this command; allow it in safety.allow_unchecked")

    def _bias(self, command: str, volts: float, what: str) -> None:
        lim = self.limits
        if not lim.bias_min_V <= abs(volts) <= lim.bias_max_V:
            _fail(command, "bias", f"{what} {volts:+.4g} V outside {lim.bias_min_V:g}..{lim.bias_max_V:g} V (magnitude)")

    def _half_range(self, command: str, axis: int) -> float:
        if self.state.piezo_range_m is None:
            _fail(command, "piezo_range", "piezo range unknown (read Piezo.RangeGet first)")
        return 0.5 * self.state.piezo_range_m[axis] * (self.limits.piezo_fraction if axis < 2 else self.limits.z_fraction)

    def _inside_xy(self, command: str, x: float, y: float, what: str) -> None:
        hx, hy = self._half_range(command, 0), self._half_range(command, 1)
        if abs(x) > hx + 1e-15 or abs(y) > hy + 1e-15:
            _fail(command, "piezo_range", f"{what} ({x:.4g}, {y:.4g}) m outside +-({hx:.4g}, {hy:.4g}) m")

    # -- state --------------------------------------------------------------------------------------------
    def observe(self, command: str, args: Mapping[str, Any], reply: Mapping[str, Any]) -> None:
        """Learn from a command that succeeded."""
        s = self.state
        if command == "Piezo.RangeGet":
            s.piezo_range_m = (float(reply["x_m"]), float(reply["y_m"]), float(reply["z_m"]))
        elif command == "ZCtrl.Withdraw" and args.get("wait"):
            s.tip_withdrawn = True
        elif (command in ("ZCtrl.OnOffSet", "AutoApproach.OnOffSet") and args["on"]) or command in (
            "ZCtrl.ZPosSet", "ZCtrl.Home", "TipShaper.Start"
        ):
            s.tip_withdrawn = False
        elif command in ("Bias.Set",):
            s.bias_V = float(args["bias_V"])
        elif command == "Bias.Get":
            s.bias_V = float(reply["bias_V"])
        elif command == "Scan.FrameSet":
            s.frame_checked = True
        elif command == "TipShaper.PropsSet":
            s.tip_shaper_armed = True

    def forget(self, command: str) -> None:
        """A mutating command's outcome is unknown (timeout, lost connection): assume the worst."""
        s = self.state
        s.tip_withdrawn = None
        if command == "Scan.FrameSet":
            s.frame_checked = False
        if command == "TipShaper.PropsSet":
            s.tip_shaper_armed = False
        if command == "Bias.Set":
            s.bias_V = None


# -- rules per command ------------------------------------------------------------------------------------


def _allow(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    """Commands that only make the instrument safer or idle (stop, withdraw, pause)."""


def _codes(name: str, allowed: tuple[int, ...]) -> Rule:
    def rule(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
        if args[name] not in allowed:
            _fail(command, name, f"{name}={args[name]!r} not one of {allowed}")

    return rule


def _bias_set(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    env._bias(command, args["bias_V"], "bias")


def _pulse(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    lim = env.limits
    if not lim.pulse_width_min_s <= args["width_s"] <= lim.pulse_width_max_s:
        _fail(command, "pulse_width", f"{args['width_s']:.4g} s outside {lim.pulse_width_min_s:g}..{lim.pulse_width_max_s:g} s")
    if args["z_hold"] not in (0, 1, 2):
        _fail(command, "z_hold", f"z_hold={args['z_hold']!r} not 0, 1 or 2")
    mode = args["absolute"]
    volts = args["bias_V"]
    if mode == 1:
        if env.state.bias_V is None:
            _fail(command, "pulse_bias", "relative pulse while the bias is unknown")
        volts = env.state.bias_V + volts
    elif mode != 2:
        _fail(command, "pulse_mode", "pulse mode must be 1 (relative) or 2 (absolute), not 'no change'")
    if abs(volts) > lim.bias_max_V:
        _fail(command, "bias", f"pulse to {volts:+.4g} V beyond +-{lim.bias_max_V:g} V")


def _frame(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    lim = env.limits
    w, h = args["width_m"], args["height_m"]
    for what, size in (("width", w), ("height", h)):
        if not lim.frame_size_min_m <= size <= lim.frame_size_max_m:
            _fail(command, "frame_size", f"{what} {size:.4g} m outside {lim.frame_size_min_m:g}..{lim.frame_size_max_m:g} m")
    a = math.radians(args["angle_deg"])
    ex = 0.5 * (abs(w * math.cos(a)) + abs(h * math.sin(a)))  # half extent of the rotated frame
    ey = 0.5 * (abs(w * math.sin(a)) + abs(h * math.cos(a)))
    x, y = args["x_m"], args["y_m"]
    hx, hy = env._half_range(command, 0), env._half_range(command, 1)
    if abs(x) + ex > hx + 1e-15 or abs(y) + ey > hy + 1e-15:
        _fail(command, "piezo_range", f"frame at ({x:.4g}, {y:.4g}) m of {w:.3g} x {h:.3g} m leaves +-({hx:.4g}, {hy:.4g}) m")


def _buffer(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    lim = env.limits
    if not lim.pixels_min <= args["pixels"] <= lim.pixels_max:
        _fail(command, "pixels", f"{args['pixels']} pixels outside {lim.pixels_min}..{lim.pixels_max}")
    if args["lines"] != 0 and not lim.pixels_min <= args["lines"] <= lim.pixels_max:
        _fail(command, "pixels", f"{args['lines']} lines outside {lim.pixels_min}..{lim.pixels_max}")
    if not args["channels"] or any(not 0 <= c <= 127 for c in args["channels"]):
        _fail(command, "channels", f"channel indexes {list(args['channels'])} not in 0..127")


def _speed(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    vmax = env.limits.scan_speed_max_mps
    for k in ("fwd_speed_mps", "bwd_speed_mps"):
        if not 0 <= args[k] <= vmax:
            _fail(command, "scan_speed", f"{k} {args[k]:.4g} m/s outside 0..{vmax:g} m/s")
    if args["fwd_line_time_s"] < 0 or args["bwd_line_time_s"] < 0:
        _fail(command, "scan_speed", "negative line time")


def _scan_action(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    action = args["action"]
    if action in (1, 2):  # stop, pause
        return
    if action not in (0, 3):
        _fail(command, "scan_action", f"scan action {action} not permitted (start, stop, pause, resume only)")
    if not env.state.frame_checked:
        _fail(command, "scan_frame", "no frame checked by the envelope in this session: set Scan.FrameSet first")


def _zpos(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    hz = env._half_range(command, 2)
    if abs(args["z_m"]) > hz:
        _fail(command, "z_range", f"z {args['z_m']:.4g} m outside +-{hz:.4g} m")


def _setpoint(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    sp = args["setpoint"]
    if not 0 < abs(sp) <= env.limits.setpoint_max_A:
        _fail(command, "setpoint", f"setpoint {sp:.4g} A outside 0..{env.limits.setpoint_max_A:g} A (magnitude)")


def _tip_shaper_props(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    lim = env.limits
    for k in ("tip_lift_m", "lift_height_m"):
        if abs(args[k]) > lim.dip_depth_max_m:
            _fail(command, "dip_depth", f"{k} {args[k]:.4g} m beyond +-{lim.dip_depth_max_m:g} m")
    for k in ("switch_off_delay_s", "lift_time1_s", "bias_settling_s", "lift_time2_s", "end_wait_s"):
        if not 0 <= args[k] <= lim.tip_shaper_time_max_s:
            _fail(command, "tip_shaper_time", f"{k} {args[k]:.4g} s outside 0..{lim.tip_shaper_time_max_s:g} s")
    for k in ("change_bias", "restore_feedback"):
        if args[k] not in (0, 1, 2):
            _fail(command, k, f"{k}={args[k]!r} not 0, 1 or 2")
    if args["change_bias"] == 1:
        env._bias(command, args["bias_V"], "tip-shaper bias")
    if abs(args["bias_lift_V"]) > lim.bias_max_V:
        _fail(command, "bias", f"bias_lift_V {args['bias_lift_V']:+.4g} V beyond +-{lim.bias_max_V:g} V")


def _tip_shaper_start(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    if not env.state.tip_shaper_armed:
        _fail(command, "tip_shaper_armed", "tip-shaper properties not checked in this session: set TipShaper.PropsSet first")


def _coarse(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    if env.state.tip_withdrawn is not True:
        _fail(command, "withdrawn", "coarse motion only with the tip withdrawn (ZCtrl.Withdraw with wait first)")
    if not 0 <= args["direction"] <= 5:
        _fail(command, "direction", f"motor direction {args['direction']} not in 0..5")
    if not 0 < args["steps"] <= env.limits.coarse_steps_max:
        _fail(command, "coarse_steps", f"{args['steps']} steps outside 1..{env.limits.coarse_steps_max}")


def _folme(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    env._inside_xy(command, args["x_m"], args["y_m"], "tip position")


def _folme_speed(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    if not 0 < args["speed_mps"] <= env.limits.scan_speed_max_mps:
        _fail(command, "scan_speed", f"{args['speed_mps']:.4g} m/s outside 0..{env.limits.scan_speed_max_mps:g} m/s")


def _safetip(env: SafetyEnvelope, command: str, args: Mapping[str, Any]) -> None:
    if args["mode"] == 2 and command not in env.limits.allow_unchecked:
        _fail(command, "safetip", "switching Safe Tip off is not permitted unless allowed in safety.allow_unchecked")


_RULES: dict[str, Rule] = {
    "Bias.Set": _bias_set,
    "Bias.Pulse": _pulse,
    "Scan.Action": _scan_action,
    "Scan.FrameSet": _frame,
    "Scan.BufferSet": _buffer,
    "Scan.SpeedSet": _speed,
    "Scan.PropsSet": _allow,
    "Scan.Save": _allow,
    "ZCtrl.ZPosSet": _zpos,
    "ZCtrl.OnOffSet": _codes("on", (0, 1)),
    "ZCtrl.SetpntSet": _setpoint,
    "ZCtrl.Withdraw": _allow,
    "ZCtrl.Home": _allow,
    "TipShaper.PropsSet": _tip_shaper_props,
    "TipShaper.Start": _tip_shaper_start,
    "AutoApproach.OnOffSet": _codes("on", (0, 1)),
    "Motor.StartMove": _coarse,
    "Motor.StopMove": _allow,
    "FolMe.XYPosSet": _folme,
    "FolMe.SpeedSet": _folme_speed,
    "FolMe.Stop": _allow,
    "SafeTip.OnOffSet": _safetip,
}
# Refused unless named in SafetyLimits.allow_unchecked (the controller never needs them):
UNCHECKED_BY_DEFAULT = frozenset({
    "Bias.RangeSet", "ZCtrl.GainSet", "ZCtrl.LimitsSet", "ZCtrl.LimitsEnabledSet", "ZCtrl.HomePropsSet",
    "ZCtrl.SwitchOffDelaySet", "ZCtrl.TipLiftSet", "ZCtrl.WithdrawRateSet", "Motor.StartClosedLoop",
    "Motor.FreqAmpSet", "Current.GainSet", "Util.SessionPathSet",
})
