"""The autonomous run end to end: the controller drives the simulator through TCP with the shipped nets.

Forced with simulator settings: bad-sample patches, a small piezo range (approach-area moves), a z jump
away from the tip (lost contact), a jump into it (crash), and a probe that degrades while scanning
(conditioning episodes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from pathlib import Path

import pytest

from deepspm.controller.config import load_config
from deepspm.controller.journal import check_journal, read_journal
from deepspm.controller.session import SimulatorOptions, run_session
from deepspm.fsm.machine import is_legal
from deepspm.simulator.microscope import SimConfig
from deepspm.simulator.sample import SampleConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LOST_CONTACT_AT_S = 900.0
CRASH_AT_S = 2400.0


def eventful_simulator(seed: int = 3) -> SimulatorOptions:
    sample = SampleConfig(bad_patch_density_per_um2=40.0)
    sim = SimConfig(sample=sample, piezo_xy_range_m=200e-9, degradation_per_frame=0.03, z_jump_rate_per_s=0.0)
    return SimulatorOptions(seed=seed, time_scale=0.0, sim_config=sim)


def schedule_z_events(sim) -> None:
    sim.at(LOST_CONTACT_AT_S, lambda m: m.inject_z_jump(-300e-9))
    sim.at(CRASH_AT_S, lambda m: m.inject_z_jump(+900e-9))


def fast_config(frames: int, **overrides):
    return load_config(None, {"run.frames": frames, **overrides})


async def test_a_long_simulated_run_meets_every_situation(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = await run_session(fast_config(300), run_dir, simulator=eventful_simulator(), on_simulator=schedule_z_events)
    assert result.status == "completed", result.reason

    records = read_journal(run_dir)
    assert check_journal(records, require_stop=True) == []
    transitions = [r for r in records if r["kind"] == "transition"]
    illegal = [t for t in transitions if not is_legal(t["trigger"], t["source"], t["dest"])]
    assert not illegal
    triggers = Counter(t["trigger"] for t in transitions)
    counters = result.loop.counters
    assert counters.frames >= 300
    assert triggers["sample_bad"] >= 1, "no bad-sample avoidance"
    assert triggers["moved"] >= 1 and counters.moves >= 1, "no approach-area move"
    assert triggers["contact_lost"] >= 1 and counters.contact_recoveries >= 1, "no lost contact recovered"
    assert triggers["crashed"] >= 1 and counters.crash_recoveries >= 1, "no crash recovered"
    ended_good = [r for r in records if r.get("decision") == "classify" and r.get("episode_ended") and r.get("good")]
    assert ended_good, "no conditioning episode ended with a good probe"
    assert triggers["conditioned"] >= 1
    # every frame referenced from the journal exists
    refs = {r["result"]["frame"] for r in records if r["kind"] == "reply" and r["op"] == "scan"}
    assert all((run_dir / "frames" / f"{ref}.npy").exists() for ref in refs)


async def test_the_event_loop_is_never_blocked_for_more_than_50_ms(tmp_path: Path, caplog) -> None:
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.05
    caplog.set_level(logging.WARNING, logger="asyncio")
    try:
        result = await run_session(fast_config(40), tmp_path / "run", simulator=eventful_simulator(seed=5))
    finally:
        loop.set_debug(False)
    assert result.status == "completed", result.reason
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
    assert not slow, "\n".join(slow[:5])
