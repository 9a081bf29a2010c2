"""Run control end to end against the simulator over TCP: training mode, an operator's STOP file, and a
fatal error that withdraws the tip before the run ends."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from deepspm.controller.config import load_config
from deepspm.controller.journal import check_journal, read_journal
from deepspm.controller.runcontrol import STOP_FILE, RunControl
from deepspm.controller.session import SimulatorOptions, run_session
from deepspm.fsm.machine import is_legal
from deepspm.simulator.faults import ErrorReply

pytestmark = pytest.mark.timeout(300)


def transitions(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "transition"]


def test_training_mode_resets_the_probe_after_success(tmp_path: Path) -> None:
    cfg = load_config(None, {"run.frames": 40, "run.train": True})
    result = asyncio.run(run_session(cfg, tmp_path / "run", simulator=SimulatorOptions(seed=2)))
    assert result.status == "completed", result.reason
    records = read_journal(tmp_path / "run")
    assert check_journal(records, require_stop=True) == []
    moves = transitions(records)
    assert all(is_legal(t["trigger"], t["source"], t["dest"]) for t in moves)
    triggers = Counter(t["trigger"] for t in moves)
    assert triggers["reset_done"] >= 1, "no reset action in training mode"
    assert any(t["dest"] == "resetting" for t in moves)
    reset_actions = [r for r in records if r.get("decision") == "reset_action"]
    assert reset_actions and all(r["action"] in (5, 6, 7, 8, 9, 10, 11) for r in reset_actions)


def test_a_stop_file_stops_at_a_safe_point_and_withdraws(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    control = RunControl.for_run_dir(run_dir)

    def progress(loop) -> None:
        if loop.counters.frames == 5:
            (run_dir / STOP_FILE).write_text("lunch break")
            control.poll_files()  # what the watcher task does every second

    cfg = load_config(None, {"run.frames": 200})
    result = asyncio.run(run_session(cfg, run_dir, simulator=SimulatorOptions(seed=3), control=control,
                                     progress=progress))
    assert result.status == "stopped" and "operator stop" in result.reason
    records = read_journal(run_dir)
    assert result.loop.counters.frames == 5
    operator = [r for r in records if r["kind"] == "operator"]
    assert operator and operator[0]["request"] == "stop" and "lunch break" in operator[0]["detail"]
    stop_at = next(i for i, r in enumerate(records) if r["kind"] == "transition" and r["trigger"] == "stop")
    assert records[stop_at - 2]["kind"] == "command" and records[stop_at - 2]["op"] == "withdraw"
    assert not (run_dir / STOP_FILE).exists()  # consumed, so a resumed run does not stop at once


def test_a_fatal_error_withdraws_the_tip_before_the_run_ends(tmp_path: Path) -> None:
    def always_failing_frames(sim) -> None:
        sim.server.inject("Scan.FrameSet", ErrorReply("Scan module in an error state"), times=None)

    cfg = load_config(None, {"run.frames": 20})
    result = asyncio.run(run_session(cfg, tmp_path / "run", simulator=SimulatorOptions(seed=4),
                                     on_simulator=always_failing_frames))
    assert result.status == "fault" and "instrument faults in a row" in result.reason
    records = read_journal(tmp_path / "run")
    assert check_journal(records, require_stop=True) == []
    fail_at = next(i for i, r in enumerate(records) if r["kind"] == "transition" and r["trigger"] == "fail")
    withdraw = [r for r in records[:fail_at] if r["kind"] == "command" and r["op"] == "withdraw"]
    assert withdraw, "the tip was not withdrawn before the fault"
    replies = {r["of"]: r for r in records if r["kind"] == "reply"}
    assert withdraw[-1]["seq"] in replies  # and the withdraw succeeded
    assert records[-1]["kind"] == "stop" and records[-1]["status"] == "fault"
