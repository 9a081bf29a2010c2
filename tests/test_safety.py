"""The safety envelope: out-of-envelope requests never reach the wire, for every write command."""

from __future__ import annotations

import pytest

from deepspm.io.commands import MUTATING, TABLE, Release
from deepspm.io.errors import SafetyError
from deepspm.io.safety import _RULES, UNCHECKED_BY_DEFAULT, SafetyEnvelope, SafetyLimits
from deepspm.simulator.server import FakeNanonisServer
from tests.test_client import handlers, new_client

pytestmark = pytest.mark.timeout(30)

NM = 1e-9
# One or more out-of-envelope argument lists per write command (table order), and the rule expected.
VIOLATIONS: dict[str, list[tuple[tuple, str]]] = {
    "Bias.Set": [((9.0,), "bias"), ((0.001,), "bias"), ((float("nan"),), "finite")],
    "Bias.Pulse": [((1, 0.1, 9.0, 1, 2), "bias"), ((1, 10.0, 3.0, 1, 2), "pulse_width"), ((1, 0.001, 3.0, 1, 2), "pulse_width"),
                   ((1, 0.1, 3.0, 1, 0), "pulse_mode"), ((1, 0.1, 3.0, 1, 1), "pulse_bias")],
    "Scan.Action": [((0, 1), "scan_frame"), ((4, 1), "scan_action")],
    "Scan.FrameSet": [((420 * NM, 0.0, 10 * NM, 10 * NM, 0.0), "piezo_range"),
                      ((0.0, 0.0, 500 * NM, 500 * NM, 0.0), "frame_size"),
                      ((398 * NM, 0.0, 10 * NM, 10 * NM, 45.0), "piezo_range"),
                      ((0.0, 0.0, 0.1 * NM, 10 * NM, 0.0), "frame_size")],
    "Scan.BufferSet": [(([30], 4096, 64), "pixels"), (([30], 64, 2), "pixels"), (([300], 64, 64), "channels"),
                       (([], 64, 64), "channels")],
    "Scan.SpeedSet": [((1e-3, 160 * NM, 0.0, 0.0, 1, 2.0), "scan_speed"), ((80 * NM, -1.0, 0.0, 0.0, 1, 2.0), "scan_speed")],
    "ZCtrl.ZPosSet": [((0.9e-6,), "z_range")],
    "ZCtrl.OnOffSet": [((7,), "on")],
    "ZCtrl.SetpntSet": [((1e-6,), "setpoint"), ((0.0,), "setpoint")],
    "TipShaper.PropsSet": [((0.05, 1, 0.02, -40 * NM, 0.2, -1.0, 0.05, 1 * NM, 0.2, 0.5, 1), "dip_depth"),
                           ((0.05, 1, 0.02, -1 * NM, 60.0, -1.0, 0.05, 1 * NM, 0.2, 0.5, 1), "tip_shaper_time"),
                           ((0.05, 1, 12.0, -1 * NM, 0.2, -1.0, 0.05, 1 * NM, 0.2, 0.5, 1), "bias")],
    "TipShaper.Start": [((1, 1000), "tip_shaper_armed")],
    "AutoApproach.OnOffSet": [((3,), "on")],
    "Motor.StartMove": [((0, 10, 0, 1), "withdrawn")],
    "FolMe.XYPosSet": [((500 * NM, 0.0, 1), "piezo_range")],
    "FolMe.SpeedSet": [((1.0, 1), "scan_speed")],
    "SafeTip.OnOffSet": [((2,), "safetip")],
}
ALWAYS_ALLOWED = {"ZCtrl.Withdraw", "ZCtrl.Home", "Motor.StopMove", "FolMe.Stop", "Scan.PropsSet", "Scan.Save"}


def generic_args(name: str) -> tuple:
    sample = {"i32": 1, "u16": 1, "u32": 1, "f32": 1.0, "f64": 1.0, "str": "x", "i32[]": [1], "strarr": []}
    return tuple(sample[f.type.label] for f in TABLE[name.lower()].layout(Release.R14718).args)


def test_every_write_command_has_a_rule_or_is_refused_by_default() -> None:
    assert MUTATING == set(_RULES) | UNCHECKED_BY_DEFAULT
    assert not set(_RULES) & UNCHECKED_BY_DEFAULT
    # Every ruled command either has a violation case here or only ever makes the instrument safer.
    assert set(_RULES) == set(VIOLATIONS) | ALWAYS_ALLOWED


CASES = [(name, args, rule) for name, cases in VIOLATIONS.items() for args, rule in cases]
CASES += [(name, generic_args(name), "unchecked") for name in sorted(UNCHECKED_BY_DEFAULT)]


@pytest.mark.parametrize("name,args,rule", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
async def test_out_of_envelope_request_never_reaches_the_wire(name: str, args: tuple, rule: str) -> None:
    async with FakeNanonisServer(handlers=handlers()) as server, new_client(server.port) as client:
        before = server.request_count
        received = len(server.received_bytes())
        with pytest.raises(SafetyError) as info:
            await client.call(name, *args)
        assert info.value.rule == rule and info.value.command == name
        assert server.request_count == before
        assert len(server.received_bytes()) == received


async def test_interlocks_open_after_the_checked_prerequisite() -> None:
    ok = {n: (lambda a: None) for n in ("ZCtrl.Withdraw", "Motor.StartMove", "Scan.FrameSet", "Scan.Action",
                                        "TipShaper.PropsSet", "TipShaper.Start", "AutoApproach.OnOffSet")}
    async with FakeNanonisServer(handlers={**handlers(), **ok}) as server:
        async with new_client(server.port) as client:
            with pytest.raises(SafetyError):
                await client.motor_start_move(0, 10)
            await client.z_withdraw()
            await client.motor_start_move(0, 10)
            await client.auto_approach_set(True)  # the tip comes down again: coarse motion closes
            with pytest.raises(SafetyError, match="withdrawn"):
                await client.motor_start_move(0, 10)
            await client.scan_frame_set(0.0, 0.0, 10 * NM, 10 * NM)
            await client.scan_start()
            await client.call("TipShaper.PropsSet", 0.05, 1, 0.02, -1 * NM, 0.2, -1.0, 0.05, 1 * NM, 0.2, 0.5, 1)
            await client.tip_shaper_start()
        names = [r.name for r in server.requests]
    assert names.count("Motor.StartMove") == 1 and "TipShaper.Start" in names


def test_limits_validate_and_unknown_range_refuses() -> None:
    with pytest.raises(ValueError, match="bias_max_V"):
        SafetyLimits(bias_max_V=-1.0)
    env = SafetyEnvelope()
    with pytest.raises(SafetyError, match="piezo range unknown"):
        env.check("Scan.FrameSet", {"x_m": 0.0, "y_m": 0.0, "width_m": 1e-8, "height_m": 1e-8, "angle_deg": 0.0})
    allowed = SafetyEnvelope(SafetyLimits(allow_unchecked=frozenset({"ZCtrl.GainSet"})))
    allowed.check("ZCtrl.GainSet", {"p_gain": 1.0, "time_constant_s": 1e-4, "i_gain": 1.0})


def test_unknown_outcome_closes_the_interlocks() -> None:
    env = SafetyEnvelope(piezo_range_m=(850e-9, 850e-9, 1e-6))
    env.observe("ZCtrl.Withdraw", {"wait": 1, "timeout_ms": 1000}, {})
    env.check("Motor.StartMove", {"direction": 0, "steps": 5, "group": 0, "wait": 1})
    env.forget("Bias.Pulse")
    with pytest.raises(SafetyError):
        env.check("Motor.StartMove", {"direction": 0, "steps": 5, "group": 0, "wait": 1})
