"""`deepspm report`: every plot and the HTML page are written, and the summary agrees with the journal.

Two kinds of run directory: a scripted journal (written with `Journal`, every situation placed by hand, so
the expected numbers are known by construction), and a short simulated session (the real loop and
simulator with a ground-truth "brain"), whose summary is checked against counts taken directly from its
records and against the loop's own counters in the stop record.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from deepspm.controller.brain import ActionDecision
from deepspm.controller.commands import (
    ApproachRunning,
    Command,
    GrabFrame,
    MotorMove,
    ReadZ,
    Settle,
    StartApproach,
    StartScan,
    WaitScanEnd,
    Withdraw,
)
from deepspm.controller.config import load_config
from deepspm.controller.documents import (
    ActionChosen,
    Classification,
    Failure,
    Note,
    Reply,
    ResetActionChosen,
    SampleVerdict,
    Start,
    TransitionRecord,
    ZCheck,
)
from deepspm.controller.executor import digest, result_to_record
from deepspm.controller.journal import Journal, ManualClock, TornJournalWarning, read_journal
from deepspm.controller.plans import action_command
from deepspm.controller.report import (
    BAD,
    BAD_SAMPLE,
    CONTACT_LOST,
    CRASHED,
    GOOD,
    PLOT_FILES,
    UNJUDGED,
    read_history,
    write_report,
)
from deepspm.controller.session import SimulatorOptions, run_session
from deepspm.io.actions import N_ACTIONS
from deepspm.io.instrument import Frame, ZState
from deepspm.simulator.microscope import SimConfig
from deepspm.simulator.sample import SampleConfig
from tests.test_journal import die

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NM = 1e-9
FRAME_M = 10e-9


# -- a scripted run -------------------------------------------------------------------------------------


@dataclass
class ScriptedRun:
    """Writes a journal the way the run does (controller/plans.py and the engine), one situation per method,
    through the typed documents, and keeps the numbers a report must find. Time advances 30 s per scan."""

    run_dir: Path
    seed: int = 0
    clock: ManualClock = field(default_factory=ManualClock)
    journal: Journal | None = None
    rng: np.random.Generator | None = None
    classified: int = 0
    episode: int = 0
    in_episode: bool = False
    expected: Counter = field(default_factory=Counter)
    actions_in_episode: list[int] = field(default_factory=list)
    state: str = "idle"

    def open(self, piezo_range_m: float = 200e-9) -> ScriptedRun:
        self.journal = Journal(self.run_dir, self.clock)
        self.rng = np.random.default_rng(self.seed)
        self.journal.start(Start(
            run_id=self.run_dir.name, seed=self.seed,
            config={"classifier": {"threshold": 0.9}, "episode": {"bad_probe_threshold": 3},
                    "safety": {"piezo_fraction": 0.95}},
            instrument={"piezo_range_m": [piezo_range_m, piezo_range_m, 1e-6]},
        ))
        for trigger, source, dest in (("start", "idle", "approaching"), ("approached", "approaching", "settling"),
                                      ("settled", "settling", "selecting")):
            self.transition(trigger, source, dest)
        return self

    def transition(self, trigger: str, source: str, dest: str) -> None:
        self.journal.write(TransitionRecord(trigger, source, dest))
        self.state = dest

    def command(self, command: Command, result: Any = None, ref: str | None = None) -> int:
        """A command and its reply, as the executor journals them."""
        seq = self.journal.write(command)
        record = result_to_record(result, ref)
        self.journal.write(Reply(of=seq, op=command.op, result=record, digest=digest(record)))
        return seq

    async def scan(self, x_m: float, y_m: float, purpose: str, extension: float = 0.8) -> str:
        """A frame scanned as the scanning plan does it: start, wait for the end, grab (z after it: `extension`)."""
        self.command(StartScan(x_m, y_m, FRAME_M, purpose))
        self.clock.advance(30.0)
        self.command(WaitScanEnd())
        image = self.rng.normal(0.0, 2e-11, (16, 16)) + np.linspace(0, 1e-10, 16)[None, :]
        ref = await self.journal.save_frame(image)
        z_after = ZState(z_m=-extension * 1e-6 + 0.5e-6, z_low_m=-0.5e-6, z_high_m=0.5e-6, controller_on=True)
        self.command(GrabFrame(), Frame(image, x_m, y_m, FRAME_M, "Z (m)", True, True, z_after), ref)
        return ref

    async def record_frame(self, x_m: float, y_m: float, *, select: bool = True) -> str:
        """`select=False`: the same region again after a recovery (the loop scans a creep frame first)."""
        if select:
            self.transition("region_selected", "selecting", "scanning")
        await self.scan(x_m, y_m, "creep")
        ref = await self.scan(x_m, y_m, "frame")
        self.transition("frame_recorded", "scanning", "classifying")
        self.expected["frames_recorded"] += 1
        return ref

    async def frame(self, x_m: float, y_m: float, p_good: float, *, start_episode: bool = False,
                    end_episode: bool = False, select: bool = True) -> str:
        """A recorded and classified frame; the caller says when an episode starts or ends (the tracker's job)."""
        ref = await self.record_frame(x_m, y_m, select=select)
        good = p_good > 0.9
        self.classified += 1
        self.expected["classified"] += 1
        self.expected["good"] += good
        if start_episode:
            self.episode += 1
            self.in_episode = True
            self.actions_in_episode.append(0)
        if end_episode:
            self.in_episode = False
            self.expected["succeeded" if good else "truncated"] += 1
        trigger = "probe_good" if good else "probe_bad"
        context = {"training": False, "bad_probe_count": 0 if good else 1, "in_episode": self.in_episode,
                   "bad_probe_threshold": 3}
        self.journal.write(Classification(
            frame=ref, ransac_seed=self.classified, p_good=p_good, good=good, classifier="scripted", trigger=trigger,
            context=context, bad_probe_count=0 if good else 1, in_episode=self.in_episode, episode=self.episode,
            episode_started=start_episode, episode_ended=end_episode, reward=None, free_side_m=5e-9))
        self.transition(trigger, "classifying", "conditioning" if self.in_episode else "selecting")
        return ref

    def action(self, ref: str, index: int, x_m: float, y_m: float, *, explored: bool = False) -> None:
        assert self.in_episode
        self.journal.write(ActionChosen(frame=ref, action=index, q_values=[0.0] * N_ACTIONS, mask=[True] * N_ACTIONS,
                                        epsilon=0.05, explored=explored, agent="scripted", site_xy_m=[x_m, y_m],
                                        free_side_m=5e-9))
        self.command(action_command(index, x_m, y_m))
        self.actions_in_episode[-1] += 1
        self.expected["random_actions" if explored else "agent_actions"] += 1
        self.transition("conditioned", "conditioning", "selecting")

    def reset_action(self, ref: str, index: int, x_m: float, y_m: float) -> None:
        self.journal.write(ResetActionChosen(frame=ref, action=index))
        self.command(action_command(index, x_m, y_m))
        self.expected["reset_actions"] += 1
        self.transition("reset_done", "resetting", "selecting")

    async def bad_sample(self, x_m: float, y_m: float, radius_m: float) -> None:
        ref = await self.record_frame(x_m, y_m)
        self.journal.write(SampleVerdict(frame=ref, verdict="bad_sample", radius_m=radius_m))
        self.transition("sample_bad", "classifying", "selecting")
        self.expected["bad_samples"] += 1

    def approach(self) -> None:
        """The approach plan stub: started, polled once, the z state read."""
        self.command(StartApproach())
        self.command(ApproachRunning(), False)
        self.command(ReadZ(), ZState(z_m=-0.3e-6, z_low_m=-0.5e-6, z_high_m=0.5e-6, controller_on=True))

    async def z_trouble(self, x_m: float, y_m: float, crashed: bool) -> None:
        """A creep scan ends with the z piezo out of range; the run recovers (and scans the region again)."""
        self.transition("region_selected", "selecting", "scanning")
        extension = 0.01 if crashed else 0.99
        await self.scan(x_m, y_m, "creep", extension)
        verdict, trigger = ("crashed", "crashed") if crashed else ("contact_lost", "contact_lost")
        self.journal.write(ZCheck(extension=extension, verdict=verdict))
        self.transition(trigger, "scanning", "recovering")
        if crashed:
            self.command(Withdraw())
            self.command(MotorMove(4, 20, "retract after a crash"))
        self.approach()
        self.command(Settle(120.0))
        self.transition("recovered", "recovering", "scanning")
        self.expected["crash" if crashed else "contact"] += 1

    def move(self) -> None:
        self.transition("area_exhausted", "selecting", "moving")
        self.command(Withdraw())
        self.command(MotorMove(0, 100, "new approach area"))
        self.transition("moved", "moving", "approaching")
        self.approach()
        self.transition("approached", "approaching", "settling")
        self.command(Settle(120.0))
        self.transition("settled", "settling", "selecting")
        self.expected["moves"] += 1

    def failure(self) -> None:
        seq = self.journal.write(StartScan(0.0, 0.0, FRAME_M, "frame"))
        error, message = "CommandTimeout", "no reply in 60 s"
        self.journal.write(Failure(of=seq, op="start_scan", error=error, message=message,
                                   digest=digest([error, message])))
        self.journal.write(Note("instrument fault in scanning: CommandTimeout", {"consecutive": 1}))
        self.expected["failures"] += 1

    async def close(self, status: str = "completed", reason: str = "frame budget reached") -> None:
        if status == "fault":
            self.transition("fail", self.state, "fault")
        else:
            self.transition("stop", self.state, "stopped")
        await self.journal.close(status, reason)

    async def abandon(self) -> None:
        """Leave the journal as a killed process would: flushed, no stop record."""
        await self.journal.flush()
        die(self.journal)


async def write_scripted_run(run_dir: Path, *, stop: bool = True) -> ScriptedRun:
    """Two approach areas with every verdict, three episodes (succeeded, truncated, open), reset actions,
    a lost contact, a crash and a command failure."""
    run = ScriptedRun(run_dir).open()
    nm = NM
    await run.frame(0, 0, 0.97)
    await run.frame(10 * nm, 0, 0.95)
    await run.bad_sample(20 * nm, 0, 25 * nm)
    await run.frame(0, 10 * nm, 0.3)
    await run.frame(-10 * nm, 0, 0.2)
    ref = await run.frame(0, -10 * nm, 0.25, start_episode=True)  # episode 1
    run.action(ref, 1, 1 * nm, -12 * nm)
    ref = await run.frame(-10 * nm, -10 * nm, 0.4)
    run.action(ref, 6, -9 * nm, -11 * nm, explored=True)
    ref = await run.frame(10 * nm, -10 * nm, 0.5)
    run.action(ref, 0, 10 * nm, -10 * nm)
    await run.frame(-20 * nm, 0, 0.96, end_episode=True)  # succeeded with 3 actions (2 agent, 1 random)
    await run.z_trouble(-20 * nm, 10 * nm, crashed=False)
    await run.frame(-20 * nm, 10 * nm, 0.93, select=False)
    await run.z_trouble(-20 * nm, 20 * nm, crashed=True)
    run.failure()
    ref = await run.frame(-20 * nm, 20 * nm, 0.92, select=False)
    run.reset_action(ref, 11, -22 * nm, 21 * nm)  # training-style reset action (site from the dip command)
    run.move()
    ref = await run.frame(0, 0, 0.1, start_episode=True)  # episode 2, in area 2
    run.action(ref, 3, 0, 1 * nm)
    ref = await run.frame(10 * nm, 0, 0.2)
    run.action(ref, 4, 9 * nm, 1 * nm, explored=True)
    await run.frame(0, 10 * nm, 0.3, end_episode=True)  # truncated (ended with a bad probe), 2 actions
    ref = await run.frame(10 * nm, 10 * nm, 0.3, start_episode=True)  # episode 3: still open at the end
    run.action(ref, 7, 11 * nm, 11 * nm)
    await run.record_frame(20 * nm, 10 * nm)  # recorded, never judged
    if stop:
        await run.close()
    else:
        await run.abandon()
    return run


# -- helpers ----------------------------------------------------------------------------------------------


def assert_valid_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, image.shape
    assert float(np.ptp(image[..., :3])) > 0.5, f"{path.name} is blank"
    return image


def counted_from_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's numbers, counted the plainest way from the records (independent of the report)."""
    transitions = Counter(r["trigger"] for r in records if r["kind"] == "transition")
    decisions = [r for r in records if r["kind"] == "decision"]
    classify = [r for r in decisions if r["decision"] == "classify"]
    actions = [r for r in decisions if r["decision"] == "action" and r.get("action") is not None]
    return {
        "frames_recorded": transitions["frame_recorded"],
        "frames_classified": len(classify),
        "good_frames": sum(r["good"] for r in classify),
        "bad_samples": sum(r["decision"] == "sample" for r in decisions),
        "discarded_contact_lost": sum(r.get("verdict") == "contact_lost" for r in decisions),
        "discarded_crashed": sum(r.get("verdict") == "crashed" for r in decisions),
        "episodes_started": sum(r["episode_started"] for r in classify),
        "episodes_ended": sum(r["episode_ended"] for r in classify),
        "episodes_succeeded": sum(r["episode_ended"] and r["good"] for r in classify),
        "actions": len(actions),
        "random_actions": sum(r["explored"] for r in actions),
        "reset_actions": sum(r["decision"] == "reset_action" for r in decisions),
        "moves": transitions["moved"],
        "recoveries": transitions["recovered"],
        "failures": sum(r["kind"] == "failure" for r in records),
        "uptime_s": records[-1]["t_wall"] - records[0]["t_wall"],
    }


# -- the scripted run -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> tuple[Path, Path, ScriptedRun, Any]:
    import asyncio

    run_dir = tmp_path_factory.mktemp("scripted") / "run"
    run = asyncio.run(write_scripted_run(run_dir))
    out = run_dir.parent / "report"
    summary = write_report(run_dir, out)
    return run_dir, out, run, summary


def test_every_plot_the_summary_and_the_html_are_written(scripted) -> None:
    run_dir, out, _, summary = scripted
    for name in PLOT_FILES:
        assert_valid_png(out / name)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for name in PLOT_FILES:
        assert f'src="{name}"' in page
    assert f"<td>{summary.frames_recorded}</td>" in page
    saved = json.loads((out / "summary.json").read_text())
    assert saved["plots"] == list(PLOT_FILES)
    assert {k: saved[k] for k in dataclasses.asdict(summary)} == dataclasses.asdict(summary)
    assert saved["recoveries"] == summary.recoveries


def test_the_summary_equals_the_scripted_numbers(scripted) -> None:
    _, _, run, s = scripted
    e = run.expected
    assert (s.status, s.reason, s.run_id) == ("completed", "frame budget reached", "run")
    assert s.frames_recorded == e["frames_recorded"] == 16
    assert s.frames_classified == e["classified"] == 14
    assert s.good_frames == e["good"] == 5
    assert s.good_fraction == pytest.approx(5 / 14)
    assert s.bad_samples == e["bad_samples"] == 1
    assert (s.discarded_contact_lost, s.discarded_crashed) == (1, 1)
    assert (s.episodes_started, s.episodes_ended, s.episodes_succeeded, s.episodes_truncated) == (3, 2, 1, 1)
    assert run.actions_in_episode == [3, 2, 1]
    assert (s.actions, s.agent_actions, s.random_actions) == (6, 4, 2)
    assert s.mean_actions_per_episode == pytest.approx(2.5)  # the ended episodes: 3 and 2 actions
    assert s.mean_actions_per_successful_episode == pytest.approx(3.0)
    assert s.reset_actions == e["reset_actions"] == 1
    assert (s.moves, s.approach_areas) == (1, 2)
    assert (s.contact_recoveries, s.crash_recoveries, s.recoveries) == (1, 1, 2)
    assert s.failures == 1
    assert s.uptime_s == pytest.approx(run.clock.t_wall - 1_700_000_000.0)


def test_the_summary_equals_an_independent_count_of_the_records(scripted) -> None:
    run_dir, _, _, s = scripted
    counted = counted_from_records(read_journal(run_dir))
    reported = dataclasses.asdict(s) | {"recoveries": s.recoveries}
    assert {k: reported[k] for k in counted} == counted


def test_the_map_places_every_verdict_forbidden_circle_and_action_site(scripted) -> None:
    run_dir, *_ = scripted
    h = read_history(run_dir)
    by_verdict = Counter(r.verdict for r in h.regions)
    assert by_verdict == {GOOD: 5, BAD: 9, BAD_SAMPLE: 1, CONTACT_LOST: 1, CRASHED: 1, UNJUDGED: 1}
    sample = next(r for r in h.regions if r.verdict == BAD_SAMPLE)
    assert (sample.x_m, sample.y_m, sample.radius_m, sample.area) == (20 * NM, 0.0, 25 * NM, 1)
    lost = next(r for r in h.regions if r.verdict == CONTACT_LOST)
    assert (lost.x_m, lost.y_m, lost.size_m) == (-20 * NM, 10 * NM, FRAME_M)
    assert next(r for r in h.regions if r.verdict == UNJUDGED).area == 2
    sites = [(a.action, a.area, a.x_m, a.y_m, a.reset) for a in h.actions]
    assert sites[3] == (11, 1, -22 * NM, 21 * NM, True)  # the reset dip: its site comes from the dip command
    assert sites[:3] == [(1, 1, 1 * NM, -12 * NM, False), (6, 1, -9 * NM, -11 * NM, False),
                         (0, 1, 10 * NM, -10 * NM, False)]
    assert [a.area for a in h.actions[4:]] == [2, 2, 2]
    assert h.piezo_range_xy_m == (200e-9, 200e-9)
    assert [(e.start_frame, e.end_frame, e.outcome) for e in h.episodes.values()] == [
        (5, 8, "succeeded"), (11, 13, "truncated"), (14, None, "open")]
    assert h.move_after_frame == [10]


# -- killed, empty ----------------------------------------------------------------------------------------


async def test_a_killed_run_with_a_torn_last_line_is_reported(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    await write_scripted_run(run_dir, stop=False)
    with open(run_dir / "journal.jsonl", "ab") as f:
        f.write(b'{"seq":999,"t_mono":1.0,"kind":"deci')
    with pytest.warns(TornJournalWarning):
        summary = write_report(run_dir, tmp_path / "out")
    assert summary.status == "running / killed"
    assert summary.torn_tail_bytes == len(b'{"seq":999,"t_mono":1.0,"kind":"deci')
    assert summary.frames_recorded == 16 and summary.episodes_started == 3
    for name in PLOT_FILES:
        assert_valid_png(tmp_path / "out" / name)
    assert "torn last line" in (tmp_path / "out" / "index.html").read_text()


async def test_a_run_without_frames_still_gets_every_plot(tmp_path: Path) -> None:
    run = ScriptedRun(tmp_path / "run").open()
    await run.close("fault", "ConnectionLost: refused")
    summary = write_report(tmp_path / "run", tmp_path / "out")
    assert (summary.frames_recorded, summary.frames_classified, summary.good_fraction) == (0, 0, None)
    assert summary.mean_actions_per_episode is None
    assert (summary.status, summary.reason) == ("fault", "ConnectionLost: refused")
    for name in PLOT_FILES:
        assert_valid_png(tmp_path / "out" / name)
    assert "–" in (tmp_path / "out" / "index.html").read_text()


# -- a simulated session ----------------------------------------------------------------------------------


class GroundTruthBrain:
    """p(good) from the simulator's ground truth (plus seeded noise), uniformly random actions of which
    every third is marked as exploration: a brain with no nets, so the session is quick."""

    classifier_version = "ground-truth"
    agent_version = "uniform"

    def __init__(self, seed: int) -> None:
        self.sim: Any = None
        self.rng = np.random.default_rng(seed)
        self.choices = 0

    async def classify(self, image: np.ndarray) -> float:
        good = self.sim.microscope.ground_truth().is_good
        return float(np.clip((0.97 if good else 0.3) + self.rng.normal(0.0, 0.03), 0.0, 1.0))

    async def classify_lines(self, image: np.ndarray) -> float:  # judged while scanning, as whole frames
        return await self.classify(image)

    async def choose(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> ActionDecision:
        self.choices += 1
        action = int(rng.choice(np.flatnonzero(mask)))
        return ActionDecision(action, [0.0] * N_ACTIONS, 0.05, self.choices % 3 == 0, "uniform")

    def store(self, *args: Any) -> None:
        pass

    async def learn(self) -> None:
        pass

    def stop_learning(self) -> None:
        pass


async def test_the_report_of_a_simulated_session_agrees_with_its_journal_and_counters(tmp_path: Path) -> None:
    sim_config = SimConfig(sample=SampleConfig(bad_patch_density_per_um2=70.0), piezo_xy_range_m=80e-9,
                           degradation_per_frame=0.08, z_jump_rate_per_s=0.0)
    brain = GroundTruthBrain(seed=1)

    def on_simulator(sim: Any) -> None:
        brain.sim = sim
        sim.at(300.0, lambda m: m.inject_z_jump(-300e-9))  # lost contact
        sim.at(900.0, lambda m: m.inject_z_jump(+900e-9))  # crash

    config = load_config(None, {"run.frames": 60})  # the brain is injected: no checkpoint is loaded
    run_dir = tmp_path / "run"
    result = await run_session(config, run_dir, brain=brain, on_simulator=on_simulator,
                               simulator=SimulatorOptions(seed=4, time_scale=0.0, sim_config=sim_config))
    assert result.status == "completed", result.reason
    summary = write_report(run_dir, tmp_path / "out")
    for name in PLOT_FILES:
        assert_valid_png(tmp_path / "out" / name)

    records = read_journal(run_dir)
    counted = counted_from_records(records)
    reported = dataclasses.asdict(summary) | {"recoveries": summary.recoveries}
    assert {k: reported[k] for k in counted} == counted
    # the situations the plots are about happened
    assert summary.moves >= 1 and summary.episodes_ended >= 1 and summary.bad_samples >= 1
    assert summary.contact_recoveries >= 1 and summary.crash_recoveries >= 1

    # and the loop's own bookkeeping (the stop record) says the same
    c = records[-1]["counters"]
    assert summary.frames_recorded - summary.bad_samples == c["frames"]
    assert (summary.good_frames, summary.bad_samples, summary.episodes_started) == (
        c["good_probe_frames"], c["bad_samples"], c["episodes"])
    assert (summary.actions, summary.reset_actions, summary.moves) == (c["actions"], c["reset_actions"], c["moves"])
    assert (summary.contact_recoveries, summary.crash_recoveries) == (c["contact_recoveries"], c["crash_recoveries"])
    assert summary.episodes_ended == len(c["episode_lengths"])
    assert summary.mean_actions_per_episode == pytest.approx(float(np.mean(c["episode_lengths"])))
    assert math.isclose(summary.uptime_s, records[-1]["t_wall"] - records[0]["t_wall"])
