"""An independent safety audit on the instrument's side of the wire (issue 17).

The client checks every command that changes the instrument with `deepspm.io.safety.SafetyEnvelope` before a
byte is sent. This module checks the same promise from the other end: the fake server calls `EnvelopeAudit`
with every request it receives (`FakeNanonisServer.on_request`), and the audit compares each write against
the configured limits (the `SafetyLimits` values only; none of the envelope's code is called) and against the
simulated microscope's ground truth (its piezo ranges, its bias, whether the tip really is withdrawn), not
against what the client believes.

    audit = EnvelopeAudit(limits, sim.microscope)
    sim.server.on_request = audit
    ...
    assert audit.violations == []
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deepspm.io import commands
from deepspm.io.errors import UnsupportedCommand
from deepspm.io.safety import SafetyLimits
from deepspm.simulator.microscope import SimulatedMicroscope
from deepspm.simulator.server import LoggedRequest

# Relative tolerance of every comparison: most arguments travel as float32 (relative precision 6e-8), so a frame
# whose edge the planner put exactly on the envelope's edge arrives a few femtometres beyond it (found by the soak with
# a 200 nm scanner: 106 "violations" of 1e-15 m). 1e-6 is 16 float32 steps, and 0.1 pm of a 100 nm half range.
WIRE_TOLERANCE = 1e-6

# Writes that only make the instrument safer or idle, or carry no value to check.
_HARMLESS = frozenset({"ZCtrl.Withdraw", "ZCtrl.Home", "Motor.StopMove", "FolMe.Stop", "Scan.PropsSet", "Scan.Save"})


@dataclass(frozen=True)
class Violation:
    """One write that reached the wire outside the envelope."""

    seq: int  # the server's request number
    command: str
    problem: str

    def __str__(self) -> str:
        return f"request {self.seq} {self.command}: {self.problem}"


class EnvelopeAudit:
    """Check every received write against `limits` and the microscope's true state; count and keep problems.

    `on_violation` (optional) is told about each problem as it is found (e.g. to write it to a file at once,
    so that a killed process loses none). Requests that are not writes are counted, never judged.
    """

    def __init__(self, limits: SafetyLimits, microscope: SimulatedMicroscope,
                 on_violation: Callable[[Violation], None] | None = None) -> None:
        self.limits = limits
        self.microscope = microscope
        self.on_violation = on_violation
        self.writes: Counter[str] = Counter()  # checked writes by command
        self.reads = 0
        self.undecodable_writes = 0  # writes whose arguments did not decode (the server refuses them)
        self.violations: list[Violation] = []

    def __call__(self, request: LoggedRequest) -> None:
        try:
            spec = commands.lookup(request.name)
        except UnsupportedCommand:
            self.reads += 1  # unknown commands change nothing: the server refuses them
            return
        if not spec.mutating:
            self.reads += 1
            return
        if request.args is None:
            self.undecodable_writes += 1
            return
        self.writes[spec.name] += 1
        problem = self.problem(spec.name, request.args)
        if problem is not None:
            violation = Violation(request.seq, spec.name, problem)
            self.violations.append(violation)
            if self.on_violation is not None:
                self.on_violation(violation)

    # -- the rules ----------------------------------------------------------------------------------------
    def problem(self, name: str, a: Mapping[str, Any]) -> str | None:
        """Why this write is outside the envelope, or None."""
        lim = self.limits
        for key, value in a.items():
            if isinstance(value, float) and not math.isfinite(value):
                return f"{key} is {value!r}"
        if name in _HARMLESS:
            return None
        m = self.microscope
        half_x, half_y, half_z = (0.5 * r for r in m.piezo_range())
        if name == "Bias.Set":
            return _outside("|bias|", abs(a["bias_V"]), lim.bias_min_V, lim.bias_max_V, "V")
        if name == "Bias.Pulse":
            # the true bias, read without letting simulated time pass (bias_V() would advance the model)
            true_bias = m._bias_V  # noqa: SLF001
            volts = a["bias_V"] if a["absolute"] == 2 else true_bias + a["bias_V"] if a["absolute"] == 1 else None
            if volts is None:
                return f"pulse mode {a['absolute']} (neither relative nor absolute)"
            return (_outside("pulse width", a["width_s"], lim.pulse_width_min_s, lim.pulse_width_max_s, "s")
                    or _outside("|pulse bias|", abs(volts), 0.0, lim.bias_max_V, "V"))
        if name == "Scan.FrameSet":
            w, h = a["width_m"], a["height_m"]
            size = (_outside("frame width", w, lim.frame_size_min_m, lim.frame_size_max_m, "m")
                    or _outside("frame height", h, lim.frame_size_min_m, lim.frame_size_max_m, "m"))
            if size:
                return size
            t = math.radians(a["angle_deg"])
            corners = [(a["x_m"] + sx * 0.5 * w * math.cos(t) - sy * 0.5 * h * math.sin(t),
                        a["y_m"] + sx * 0.5 * w * math.sin(t) + sy * 0.5 * h * math.cos(t))
                       for sx in (-1, 1) for sy in (-1, 1)]
            fx, fy = half_x * lim.piezo_fraction, half_y * lim.piezo_fraction
            if any(abs(x) > fx * (1 + WIRE_TOLERANCE) or abs(y) > fy * (1 + WIRE_TOLERANCE) for x, y in corners):
                return f"frame corner outside +-({fx:.4g}, {fy:.4g}) m"
            return None
        if name == "Scan.BufferSet":
            lines = a["lines"]
            return (_outside("pixels", a["pixels"], lim.pixels_min, lim.pixels_max, "")
                    or (None if lines == 0 else _outside("lines", lines, lim.pixels_min, lim.pixels_max, "")))
        if name == "Scan.SpeedSet":
            return (_outside("forward speed", a["fwd_speed_mps"], 0.0, lim.scan_speed_max_mps, "m/s")
                    or _outside("backward speed", a["bwd_speed_mps"], 0.0, lim.scan_speed_max_mps, "m/s"))
        if name == "Scan.Action":
            return None if a["action"] in (0, 1, 2, 3) else f"scan action {a['action']}"
        if name == "ZCtrl.ZPosSet":
            return _outside("|z|", abs(a["z_m"]), 0.0, half_z * lim.z_fraction, "m")
        if name == "ZCtrl.SetpntSet":
            sp = abs(a["setpoint"])
            return "setpoint 0 A" if sp == 0 else _outside("|setpoint|", sp, 0.0, lim.setpoint_max_A, "A")
        if name in ("ZCtrl.OnOffSet", "AutoApproach.OnOffSet"):
            return None if a["on"] in (0, 1) else f"on={a['on']}"
        if name == "TipShaper.PropsSet":
            for key in ("tip_lift_m", "lift_height_m"):
                if abs(a[key]) > lim.dip_depth_max_m:
                    return f"|{key}| {abs(a[key]):.4g} m above {lim.dip_depth_max_m:g} m"
            for key in ("switch_off_delay_s", "lift_time1_s", "bias_settling_s", "lift_time2_s", "end_wait_s"):
                bad = _outside(key, a[key], 0.0, lim.tip_shaper_time_max_s, "s")
                if bad:
                    return bad
            if a["change_bias"] == 1:
                bad = _outside("|tip-shaper bias|", abs(a["bias_V"]), lim.bias_min_V, lim.bias_max_V, "V")
                if bad:
                    return bad
            return _outside("|bias lift|", abs(a["bias_lift_V"]), 0.0, lim.bias_max_V, "V")
        if name == "TipShaper.Start":
            return None
        if name == "Motor.StartMove":
            if not m.withdrawn():
                return "coarse motion while the tip is not withdrawn"
            return _outside("steps", a["steps"], 1, lim.coarse_steps_max, "")
        if name == "FolMe.XYPosSet":
            fx, fy = half_x * lim.piezo_fraction, half_y * lim.piezo_fraction
            if abs(a["x_m"]) > fx * (1 + WIRE_TOLERANCE) or abs(a["y_m"]) > fy * (1 + WIRE_TOLERANCE):
                return f"tip position ({a['x_m']:.4g}, {a['y_m']:.4g}) m outside +-({fx:.4g}, {fy:.4g}) m"
            return None
        if name == "FolMe.SpeedSet":
            return _outside("tip speed", a["speed_mps"], 1e-30, lim.scan_speed_max_mps, "m/s")
        if name == "SafeTip.OnOffSet":
            return None if a["mode"] != 2 or name in lim.allow_unchecked else "Safe Tip switched off"
        if name in lim.allow_unchecked:
            return None
        return "a write the controller never needs (not allowed in the configuration)"


def _outside(what: str, value: float, low: float, high: float, unit: str) -> str | None:
    if low - WIRE_TOLERANCE * abs(low) <= value <= high + WIRE_TOLERANCE * abs(high):
        return None
    return f"{what} {value:.4g} {unit} outside {low:g}..{high:g} {unit}".replace("  ", " ")
