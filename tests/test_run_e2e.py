"""The autonomous run end to end, and its replay: the controller drives the simulator through TCP.

One recorded run (module fixture) serves every check: >= 300 frames with the shipped nets, forced by
simulator settings into every situation (bad-sample patches, a small piezo range so the area fills and the
coarse motor moves, a z jump away from the tip for lost contact and one into it for a crash, a degrading
probe for conditioning episodes), and with injected Nanonis faults (an error reply, a dropped connection,
a timeout). The same journal must then replay as identical, in both modes, and a tampered reply must be
reported at exactly its sequence number.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from deepspm.controller.config import load_config
from deepspm.controller.journal import check_journal, read_journal
from deepspm.controller.replay_run import replay_run
from deepspm.controller.session import SessionResult, SimulatorOptions, run_session
from deepspm.fsm.machine import is_legal
from deepspm.simulator.faults import CloseBeforeReply, ErrorReply, NeverReply
from deepspm.simulator.microscope import SimConfig
from deepspm.simulator.sample import SampleConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FRAMES = 300
LOST_CONTACT_AT_S = 900.0
CRASH_AT_S = 2400.0
NETS: dict[str, Any] = {}  # config overrides for the nets; empty = the shipped ones


def eventful_simulator(seed: int = 3) -> SimulatorOptions:
    sample = SampleConfig(bad_patch_density_per_um2=40.0)
    sim = SimConfig(sample=sample, piezo_xy_range_m=200e-9, degradation_per_frame=0.03, z_jump_rate_per_s=0.0)
    return SimulatorOptions(seed=seed, time_scale=0.0, sim_config=sim)


def script_events_and_faults(sim) -> None:
    sim.at(LOST_CONTACT_AT_S, lambda m: m.inject_z_jump(-300e-9))
    sim.at(CRASH_AT_S, lambda m: m.inject_z_jump(+900e-9))
    sim.server.inject("Scan.FrameSet", ErrorReply("Scan module busy, try later"), calls=[40])
    sim.server.inject("Scan.Action", CloseBeforeReply(), calls=[90])
    sim.server.inject("Scan.FrameSet", NeverReply(), calls=[150])


def config(frames: int, **overrides: Any):
    return load_config(None, {"run.frames": frames, "instrument.command_timeout_s": 0.5, **NETS, **overrides})


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory) -> SessionResult:
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    # Without online learning: its ~100 gradient updates doubled this run's time and its recompute replay's, and
    # tests/test_run_behaviour.py replays a learning run by recomputing (test_resume.py resumes one).
    return asyncio.run(run_session(config(FRAMES, **{"agent.learn_online": False}), run_dir, simulator=eventful_simulator(),
                                   on_simulator=script_events_and_faults))


def test_a_long_simulated_run_meets_every_situation(recorded_run: SessionResult) -> None:
    assert recorded_run.status == "completed", recorded_run.reason
    run_dir = recorded_run.run_dir
    records = read_journal(run_dir)
    assert check_journal(records, require_stop=True) == []
    transitions = [r for r in records if r["kind"] == "transition"]
    assert not [t for t in transitions if not is_legal(t["trigger"], t["source"], t["dest"])]
    triggers = Counter(t["trigger"] for t in transitions)
    counters = recorded_run.loop.counters
    assert counters.frames >= FRAMES
    assert triggers["sample_bad"] >= 1, "no bad-sample avoidance"
    assert triggers["moved"] >= 1 and counters.moves >= 1, "no approach-area move"
    assert triggers["contact_lost"] >= 1 and counters.contact_recoveries >= 1, "no lost contact recovered"
    assert triggers["crashed"] >= 1 and counters.crash_recoveries >= 1, "no crash recovered"
    assert triggers["conditioned"] >= 1
    ended_good = [r for r in records if r.get("decision") == "classify" and r.get("episode_ended") and r.get("good")]
    assert ended_good, "no conditioning episode ended with a good probe"
    failures = Counter(r["error"] for r in records if r["kind"] == "failure")
    assert failures["NanonisError"] >= 1 and failures["ConnectionLost"] >= 1 and failures["CommandTimeout"] >= 1
    refs = {r["result"]["frame"] for r in records if r["kind"] == "reply" and r["op"] == "grab_frame"}
    assert all((run_dir / "frames" / f"{ref}.npy").exists() for ref in refs)


@pytest.mark.parametrize("mode", ["recorded", "recompute"])
def test_the_recorded_run_replays_as_identical(recorded_run: SessionResult, mode: str) -> None:
    report = asyncio.run(replay_run(recorded_run.run_dir, mode=mode))
    assert report.identical, report.text()
    assert report.decisions_checked > FRAMES


def test_a_tampered_reply_is_reported_at_its_sequence_number(recorded_run: SessionResult, tmp_path: Path) -> None:
    copy = tmp_path / "tampered"
    shutil.copytree(recorded_run.run_dir, copy)
    path = copy / "journal.jsonl"
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    target = [r for r in records if r["kind"] == "reply" and r["op"] == "z_state"][-1]
    target["result"]["z_m"] += 1e-9
    lines[target["seq"]] = json.dumps(target)
    path.write_text("\n".join(lines) + "\n")
    report = asyncio.run(replay_run(copy))
    assert not report.identical
    assert report.divergence_seq == target["seq"], report.text()


def test_the_event_loop_is_never_blocked_for_more_than_50_ms(tmp_path: Path, caplog) -> None:
    async def run() -> SessionResult:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = 0.05
        return await run_session(config(40), tmp_path / "run", simulator=eventful_simulator(seed=5))

    caplog.set_level(logging.WARNING, logger="asyncio")
    result = asyncio.run(run())
    assert result.status == "completed", result.reason
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
    assert not slow, "\n".join(slow[:5])
