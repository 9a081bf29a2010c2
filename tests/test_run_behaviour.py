"""The run as the paper runs it (issue 10), read from the journal of a real CLI run with frequent z jumps set
through `--set simulator.…`: settles after every approach, a partial creep frame, imaging conditions first."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

from deepspm.cli import main
from deepspm.controller.journal import read_journal

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("behaviour") / "run"
    code = main(["run", "--frames", "40", "--seed", "11", "--out", str(run_dir), "--quiet",
                 "--set", "simulator.z_jump_rate_per_s=0.004", "--set", "simulator.z_jump_scale_m=3e-7"])
    assert code == 0
    return read_journal(run_dir)


def commands(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "command"]


def test_the_simulator_section_reaches_the_embedded_simulator(journal: list[dict[str, Any]]) -> None:
    assert journal[0]["config"]["simulator"]["z_jump_rate_per_s"] == 0.004
    triggers = {r["trigger"] for r in journal if r["kind"] == "transition"}
    assert triggers & {"contact_lost", "crashed"}, "frequent z jumps caused no recovery"


def test_every_approach_is_followed_by_a_settle_before_the_next_scan(journal: list[dict[str, Any]]) -> None:
    approached = False
    approaches = 0
    for c in commands(journal):
        if c["op"] == "start_approach":
            approached, approaches = True, approaches + 1
        elif c["op"] == "settle":
            approached = False
        elif c["op"] == "start_scan":
            assert not approached, f"scan at seq {c['seq']} after an approach with no settle"
    assert approaches >= 2  # the first approach and at least one recovery


def test_the_creep_frame_is_partial_and_costs_under_half_a_judged_frame(journal: list[dict[str, Any]]) -> None:
    started: dict[str, float] = {}
    durations: dict[str, list[float]] = {"creep": [], "frame": []}
    purpose = None
    for r in journal:
        if r["kind"] == "command" and r["op"] == "start_scan":
            purpose, started[r["purpose"]] = r["purpose"], r["t_mono"]
        elif r["kind"] == "reply" and r["op"] == "grab_frame" and purpose is not None:
            durations[purpose].append(r["t_mono"] - started[purpose])
            purpose = None
    assert durations["creep"] and durations["frame"]
    assert statistics.median(durations["creep"]) < 0.5 * statistics.median(durations["frame"]), durations
    stops = [c for c in commands(journal) if c["op"] == "stop_scan"]
    assert len(stops) >= len(durations["creep"])  # each creep frame is stopped after its lines


def test_bias_and_setpoint_are_set_before_the_first_scan(journal: list[dict[str, Any]]) -> None:
    ops = [c["op"] for c in commands(journal)]
    first_scan = ops.index("start_scan")
    assert "set_bias" in ops[:first_scan] and "set_setpoint" in ops[:first_scan]
    bias = next(c for c in commands(journal) if c["op"] == "set_bias")
    assert bias["bias_V"] == journal[0]["config"]["scan"]["bias_V"]
