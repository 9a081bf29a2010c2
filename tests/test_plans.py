"""The run's policies as plain generators: driven here by hand, no engine, no asyncio, no instrument."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from deepspm.controller import plans
from deepspm.controller.commands import (
    ApproachRunning,
    GrabFrame,
    MotorMove,
    ReadZ,
    StartApproach,
    StartScan,
    StopApproach,
    StopScan,
    Wait,
    WaitScanEnd,
    Withdraw,
)
from deepspm.controller.config import load_config
from deepspm.controller.documents import LineJudgement, ZCheck
from deepspm.controller.executor import error_attributes
from deepspm.controller.messages import ClassifyLines, Compute, Fire, Scanned
from deepspm.controller.replay import rebuild_error
from deepspm.io.errors import CommandTimeout, NanonisError
from deepspm.io.instrument import ApproachFailed, ApproachSettings, Frame, ZState


def drive(plan: Any, answer: Any) -> tuple[list[Any], Any]:
    """Run a plan to its end, answering each message with `answer(message)`; returns (messages, return value)."""
    messages, result = [], None
    while True:
        try:
            message = plan.send(result)
        except StopIteration as stop:
            return messages, stop.value
        messages.append(message)
        result = answer(message)


def z(extension: float) -> ZState:
    return ZState(z_m=(1 - extension) * 1e-6, z_low_m=0.0, z_high_m=1e-6, controller_on=True)


def answering(readings: Any = None, running: Any = None, grab: Any = None) -> Any:
    """An answer function: z readings, approach-running flags and grabbed frames from iterators/values."""

    def answer(m: Any) -> Any:
        if isinstance(m, ReadZ):
            return next(readings)
        if isinstance(m, ApproachRunning):
            return next(running) if running is not None else False
        if isinstance(m, GrabFrame):
            return grab
        return None

    return answer


def test_approach_polls_until_the_approach_ends_and_returns_z() -> None:
    answer = answering(readings=iter([z(0.7)]), running=iter([True, True, False]))
    messages, state = drive(plans.approach(ApproachSettings(timeout_s=10, poll_s=1)), answer)
    assert [type(m) for m in messages] == [StartApproach, ApproachRunning, Wait, ApproachRunning, Wait, ApproachRunning,
                                           ReadZ]
    assert state.extension == pytest.approx(0.7)


def test_an_approach_that_overruns_is_stopped_and_fails() -> None:
    plan = plans.approach(ApproachSettings(timeout_s=3, poll_s=1))
    with pytest.raises(ApproachFailed, match="still running after 3 s"):
        drive(plan, lambda m: True if isinstance(m, ApproachRunning) else None)


def test_set_z_extension_steps_the_coarse_motor_towards_the_target() -> None:
    s = ApproachSettings(target_extension=0.8, extension_tolerance=0.05, poll_s=1)
    readings = iter([z(0.95), z(0.8)])  # too far out, then on target after one step and a re-approach

    def answer(m: Any) -> Any:
        if isinstance(m, ReadZ):
            return next(readings)
        return False if isinstance(m, ApproachRunning) else None

    messages, state = drive(plans.set_z_extension(s), answer)
    moves = [m for m in messages if isinstance(m, MotorMove)]
    assert moves == [MotorMove(s.towards_sample_direction, s.z_steps_per_adjust, "adjust z extension")]
    assert messages.index(next(m for m in messages if isinstance(m, Withdraw))) < messages.index(moves[0])
    assert state.extension == pytest.approx(0.8) and not any(isinstance(m, StopApproach) for m in messages)


def frame(lines_scanned: int, extension: float = 0.8) -> Frame:
    data = np.full((64, 64), np.nan, np.float32)
    data[64 - lines_scanned:] = 0.0  # an up-scan fills the bottom rows first
    return Frame(data, 0.0, 0.0, 10e-9, "Z (m)", True, lines_scanned == 64, z(extension))


def scan_answers(p_good_by_lines: dict[int, float], extension_by_lines: dict[int, float] | None = None) -> Any:
    grabbed = {"lines": 0}

    def answer(m: Any) -> Any:
        if isinstance(m, GrabFrame):
            grabbed["lines"] = min(64, grabbed["lines"] + 16)
            ext = (extension_by_lines or {}).get(grabbed["lines"], 0.8)
            return Scanned(frame(grabbed["lines"], ext), f"ref{grabbed['lines']}")
        if isinstance(m, Compute):
            return np.zeros((64, 64), np.float32), grabbed["lines"]
        if isinstance(m, ClassifyLines):
            return p_good_by_lines[grabbed["lines"]]
        return None

    return answer


def line_config(**classifier: Any) -> plans.RunState:
    cfg = load_config(None, {"classifier.lines_checkpoint": "some/net", **{f"classifier.{k}": v for k, v in classifier.items()}})
    return plans.RunState.new(cfg)


def test_a_confident_bad_judgement_stops_the_scan_and_a_good_one_never_does() -> None:
    rs = line_config()
    messages, result = drive(plans.scan_frame(rs, 0, 0, 10e-9, 64, "frame"), scan_answers({16: 0.95, 32: 0.05}))
    assert result.aborted_at == 32 and result.judgements == [(16, 0.95), (32, 0.05)]
    # the reason is journaled before the stop it causes (schema 3), after it in a re-lived schema-2 journal
    assert isinstance(messages[-2], LineJudgement) and messages[-2].abort and isinstance(messages[-1], StopScan)
    assert not any(isinstance(m, WaitScanEnd) for m in messages)
    rs.schema = 2
    messages, _ = drive(plans.scan_frame(rs, 0, 0, 10e-9, 64, "frame"), scan_answers({16: 0.95, 32: 0.05}))
    assert isinstance(messages[-1], LineJudgement) and messages[-1].abort and isinstance(messages[-2], StopScan)
    messages, result = drive(plans.scan_frame(rs, 0, 0, 10e-9, 64, "frame"), scan_answers({16: 0.99, 32: 0.99, 48: 0.99}))
    assert result.aborted_at is None and any(isinstance(m, WaitScanEnd) for m in messages)
    assert not any(isinstance(m, StopScan) for m in messages)


def test_no_early_abort_before_the_minimum_lines_or_when_switched_off() -> None:
    messages, result = drive(plans.scan_frame(line_config(abort_min_lines=40), 0, 0, 10e-9, 64, "frame"),
                             scan_answers({16: 0.01, 32: 0.01, 48: 0.01}))
    assert result.aborted_at == 48
    _, result = drive(plans.scan_frame(line_config(early_abort=False), 0, 0, 10e-9, 64, "frame"),
                      scan_answers({16: 0.01, 32: 0.01, 48: 0.01}))
    assert result.aborted_at is None and result.judgements == [(16, 0.01), (32, 0.01), (48, 0.01)]


def test_a_creep_frame_is_partial_and_not_judged() -> None:
    rs = line_config()
    answer = answering(readings=iter([z(0.8)]), grab=Scanned(frame(30), "c"))
    messages, result = drive(plans.scan_frame(rs, 0, 0, 10e-9, rs.config.scan.creep_lines, "creep"), answer)
    assert isinstance(messages[0], StartScan) and messages[0].purpose == "creep"
    assert isinstance(messages[-2], StopScan) and isinstance(messages[-1], GrabFrame)
    assert not any(isinstance(m, (ClassifyLines, WaitScanEnd)) for m in messages) and not result.judgements


def test_a_crash_seen_mid_frame_stops_the_scan_and_is_reported_even_if_z_recovers() -> None:
    rs = plans.RunState.new(load_config(None, {"classifier.lines_checkpoint": "none"}))  # z read alone
    answer = answering(readings=iter([z(0.8), z(0.01), z(0.8)]), grab=Scanned(frame(64), "f"))
    messages, result = drive(plans.scan_frame(rs, 0, 0, 10e-9, 64, "frame"), answer)
    assert result.trouble == pytest.approx(0.01) and isinstance(messages[-2], StopScan)
    trouble = list(drive(plans.z_trouble(rs, result.scanned, result.trouble), lambda m: None)[0])
    assert isinstance(trouble[0], ZCheck) and trouble[0].verdict == "crashed" and trouble[1] == Fire("crashed")
    assert rs.position.consecutive_crashes == 1  # counted when seen


def test_the_line_where_the_judgement_changed() -> None:
    assert plans.changed_at_line([(16, 0.99), (32, 0.98), (48, 0.2)], 0.9, final_good=False) == 48
    assert plans.changed_at_line([(16, 0.99), (32, 0.98), (48, 0.97)], 0.9, final_good=True) is None
    assert plans.changed_at_line([(16, 0.99), (32, 0.98), (48, 0.97)], 0.9, final_good=False) == 48
    assert plans.changed_at_line([], 0.9, final_good=True) is None


def test_a_replayed_failure_carries_the_recorded_attributes() -> None:
    for error in (CommandTimeout("Scan.Action", 5.0), NanonisError("Bias.Set", 3, "out of range")):
        rebuilt = rebuild_error(type(error).__name__, str(error), error_attributes(error))
        assert type(rebuilt) is type(error) and str(rebuilt) == str(error)
        assert vars(rebuilt) == vars(error)
