"""Kill -9 a simulated run at 12 seeded points and resume it each time: one sound journal, every frame once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deepspm.controller.journal import check_journal, read_journal, time_spent_s

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FRAMES = 60
KILLS = 12  # each kill costs a process start (~4 s here); `make soak` kills 20 times over 10 000 frames
NETS: list[str] = []  # extra CLI options for the nets; empty = the shipped ones


def journal_lines(run_dir: Path) -> int:
    try:
        with open(run_dir / "journal.jsonl", "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deepspm.cli", "run", "--quiet", *args, *NETS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_until(proc: subprocess.Popen, run_dir: Path, lines: int, deadline_s: float = 120.0) -> bool:
    """Let the run write `lines` journal lines (and at least two of its own: a resumed run first writes its
    resume record), then kill -9 it; False if it finished first."""
    end = time.monotonic() + deadline_s
    lines = max(lines, journal_lines(run_dir) + 2)
    while proc.poll() is None:
        if journal_lines(run_dir) >= lines:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"the run wrote fewer than {lines} lines in {deadline_s} s")
        time.sleep(0.005)
    return False


def test_kill_9_at_twelve_points_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    rng = np.random.default_rng(2026)
    # an uninterrupted run of this length writes ~650 lines; kill points spread over most of it
    targets = np.sort(rng.choice(np.arange(20, 560), size=KILLS, replace=False))
    proc = start(["--frames", str(FRAMES), "--seed", "7", "--out", str(run_dir)])
    kills = 0
    for target in targets:
        if not run_until(proc, run_dir, int(target)):
            break
        kills += 1
        proc = start(["--resume", str(run_dir)])
    assert proc.wait(timeout=300) == 0
    assert kills >= 9, f"only {kills} kills happened before the run ended"

    records = read_journal(run_dir)
    assert check_journal(records, require_stop=True) == []  # contiguous seq: no gap, no duplicate
    resumes = [r for r in records if r["kind"] == "resume"]
    assert len(resumes) == kills
    stop = records[-1]
    assert stop["status"] == "completed" and stop["counters"]["frames"] == FRAMES
    classified = [r for r in records if r.get("decision") == "classify"]
    assert len(classified) == FRAMES  # every recorded frame judged exactly once, as in an uninterrupted run
    assert len({r["frame"] for r in classified}) == FRAMES
    referenced = {r["result"]["frame"] for r in records if r["kind"] == "reply" and r.get("op") == "grab_frame"}
    on_disk = {p.stem for p in (run_dir / "frames").glob("*.npy")}
    assert referenced <= on_disk
    assert not [p for p in (run_dir / "frames").iterdir() if p.suffix != ".npy"]  # no torn temp files left
    # a command interrupted by a kill gets its outcome ("unknown": ConnectionLost) on resume, never a re-send
    commands = {r["seq"] for r in records if r["kind"] == "command"}
    outcomes = [r["of"] for r in records if r["kind"] in ("reply", "failure")]
    assert sorted(outcomes) == sorted(commands)


def test_a_second_process_cannot_resume_a_live_run(tmp_path: Path) -> None:
    """`run --resume` on a run that is still going is refused before it reads, writes or connects anything."""
    from deepspm.controller.runcontrol import STOP_FILE

    run_dir = tmp_path / "run"
    live = start(["--frames", "5000", "--seed", "3", "--out", str(run_dir)])
    try:
        end = time.monotonic() + 120
        while journal_lines(run_dir) < 30:
            assert live.poll() is None and time.monotonic() < end, "the live run did not get going"
            time.sleep(0.01)
        second = subprocess.run([sys.executable, "-m", "deepspm.cli", "run", "--quiet", "--resume", str(run_dir)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"in use by another deepspm process (pid {live.pid})" in second.stderr
        lines = journal_lines(run_dir)
        while journal_lines(run_dir) < lines + 20:  # the live run carries on, undisturbed
            assert live.poll() is None and time.monotonic() < end
            time.sleep(0.01)
        (run_dir / STOP_FILE).write_text("test over")
        assert live.wait(timeout=120) == 0
    finally:
        if live.poll() is None:
            live.kill()
    records = read_journal(run_dir)
    assert check_journal(records, require_stop=True) == []
    assert not [r for r in records if r["kind"] == "resume"] and records[-1]["status"] == "stopped"


def test_a_resumed_run_keeps_its_time_budget(tmp_path: Path) -> None:
    """Killed twice and resumed, a run with a 0.5 h budget stops after 0.5 h of run time in all, not 0.5 h
    after its last resume; re-lived settles are not waited out again (the simulator's clock would show it)."""
    budget_s = 1800.0
    uninterrupted = tmp_path / "whole"
    assert start(["--frames", "100000", "--hours", "0.5", "--seed", "7", "--out", str(uninterrupted)]).wait(120) == 0
    whole = read_journal(uninterrupted)
    assert whole[-1]["reason"] == "time budget of 0.5 h reached"
    step_s = max(b["t_mono"] - a["t_mono"] for a, b in zip(whole, whole[1:]))  # the longest wait between records

    run_dir = tmp_path / "run"
    proc = start(["--frames", "100000", "--hours", "0.5", "--seed", "7", "--out", str(run_dir)])
    for lines in (150, 350):
        assert run_until(proc, run_dir, lines), "the run ended before the kill"
        proc = start(["--resume", str(run_dir)])
    assert proc.wait(timeout=120) == 0
    records = read_journal(run_dir)
    assert check_journal(records, require_stop=True) == []
    resumes = [r for r in records if r["kind"] == "resume"]
    assert len(resumes) == 2 and 0 < resumes[0]["time_spent_s"] < resumes[1]["time_spent_s"] < budget_s
    assert records[-1]["reason"] == "time budget of 0.5 h reached"
    assert budget_s <= time_spent_s(records) <= budget_s + step_s
    assert abs(records[-1]["counters"]["frames"] - whole[-1]["counters"]["frames"]) <= 5


def test_a_resume_mid_frame_finds_the_embedded_microscope_still_scanning(tmp_path: Path) -> None:
    """Killed between a frame's start_scan reply and its grabs: a real microscope goes on scanning, and so does
    the fresh embedded simulator of the resumed process (`session.continue_scan`); before, the frame came back
    empty and repeated kills in one frame ended the run as a fault."""
    from deepspm.cli import main

    run_dir = tmp_path / "run"
    assert main(["run", "--quiet", "--frames", "3", "--seed", "7", "--out", str(run_dir)]) == 0
    lines = (run_dir / "journal.jsonl").read_text().splitlines(keepends=True)
    records = read_journal(run_dir)
    starts = [r["seq"] for r in records if r["kind"] == "command" and r["op"] == "start_scan"
              and r.get("purpose") == "frame"]
    cut = next(r["seq"] for r in records if r["kind"] == "reply" and r["of"] == starts[1])  # the 2nd frame's
    (run_dir / "journal.jsonl").write_text("".join(lines[:cut + 1]))  # as if killed right after that reply

    assert main(["run", "--quiet", "--resume", str(run_dir)]) == 0
    records = read_journal(run_dir)
    assert records[-1]["status"] == "completed" and records[-1]["counters"]["frames"] == 3
    assert not [r for r in records if r["kind"] == "note" and "incomplete" in r["message"]]
    assert check_journal(records, require_stop=True) == []


def test_a_resume_adopts_the_learners_resume_point_and_learns_the_same_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A run that learns online saves its learner's resume point every few updates; a resume adopts the last one
    behind the journal's end and redoes only the updates after it (issue 17: a long run's resumes spent their time
    re-learning). The weights, and so every later decision, are the ones a resume that redoes every update
    reaches: the two resumes of the same killed run write the same journal and end with the same learner."""
    import shutil

    from deepspm.cli import main
    from deepspm.controller import resume_points
    from deepspm.nets.checkpoints import load_learner, read_meta

    monkeypatch.setattr(resume_points, "RESUME_POINT_EVERY", 5)
    learn = ["--set", "episode.bad_probe_threshold=1", "--set", "classifier.threshold=0.99999",
             "--set", "agent.updates_per_action=1"]
    whole = tmp_path / "whole"
    assert main(["run", "--quiet", "--frames", "40", "--seed", "2", "--out", str(whole), *learn]) == 0
    point = read_meta(whole / resume_points.RESUME_LEARNER)["metadata"]
    assert point["updates"] >= 5
    # as if killed 3 actions after the last resume point
    records = read_journal(whole)
    actions = [r["seq"] for r in records if r["kind"] == "decision" and r["decision"] == "action"]
    assert len(actions) >= point["env_steps"] + 3, "too few actions after the last resume point"
    cut = actions[point["env_steps"] + 2]
    lines = (whole / "journal.jsonl").read_text().splitlines(keepends=True)[:cut + 1]
    runs = {}
    for name, keep_point in (("adopting", True), ("relearning", False)):
        run_dir = tmp_path / name
        shutil.copytree(whole, run_dir)
        (run_dir / "journal.jsonl").write_text("".join(lines))
        if not keep_point:
            shutil.rmtree(run_dir / resume_points.RESUME_LEARNER)
        capsys.readouterr()
        assert main(["run", "--quiet", "--resume", str(run_dir)]) == 0
        assert ("resume_point.adopted" in capsys.readouterr().err) == keep_point
        runs[name] = run_dir
    journals = {name: [{k: v for k, v in r.items() if k not in ("t_mono", "t_wall", "time_spent_s")}
                       for r in read_journal(d)] for name, d in runs.items()}
    assert journals["adopting"] == journals["relearning"]
    learners = {name: load_learner(d / "checkpoints" / "learner")[0] for name, d in runs.items()}
    assert learners["adopting"].updates == learners["relearning"].updates > point["updates"]
    for a, b in zip(*(jax_leaves(learner.state) for learner in learners.values()), strict=True):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree: object) -> list[np.ndarray]:
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_a_kill_during_the_stop_of_an_early_abort_resumes_and_replays_identically(tmp_path: Path) -> None:
    """A confident bad line judgement stops the scan. Killed during that stop_scan, the journal must already say
    why the scan stopped (schema 3 journals the judgement first): before, it held the stop_scan without its
    judgement, the re-live took the next frame's judgement for this one, and the replay of the resumed run
    diverged there (seen once in a soak)."""
    from deepspm.cli import main

    run_dir = tmp_path / "run"
    assert main(["run", "--quiet", "--frames", "12", "--seed", "9", "--out", str(run_dir),
                 "--set", "simulator.degradation_per_frame=0.15"]) == 0
    records = read_journal(run_dir)
    abort = next(r for r in records if r["kind"] == "decision" and r["decision"] == "lines" and r["abort"])
    stop = next(r for r in records[abort["seq"] - 3:abort["seq"] + 2] if r["kind"] == "command" and r["op"] == "stop_scan")
    assert stop["seq"] == abort["seq"] + 1  # the reason first, then the stop
    assert main(["replay", str(as_schema_2(run_dir, tmp_path / "schema2"))]) == 0  # old order
    lines = (run_dir / "journal.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "journal.jsonl").write_text("".join(lines[:stop["seq"] + 1]))  # killed before the stop's reply

    assert main(["run", "--quiet", "--resume", str(run_dir)]) == 0
    records = read_journal(run_dir)
    assert records[-1]["status"] == "completed" and check_journal(records, require_stop=True) == []
    interrupted = [r for r in records if r["kind"] == "failure" and r["of"] == stop["seq"]]
    assert [r["error"] for r in interrupted] == ["Interrupted"]
    assert main(["replay", str(run_dir)]) == 0


def as_schema_2(run_dir: Path, out: Path) -> Path:
    """A copy of `run_dir` whose journal is schema 2: each early abort written after its stop_scan."""
    import json
    import shutil

    shutil.copytree(run_dir, out)
    records = read_journal(run_dir)
    records[0]["schema"] = 2
    for seq in [r["seq"] for r in records if r["kind"] == "decision" and r["decision"] == "lines" and r["abort"]]:
        decision, command, reply = records[seq:seq + 3]
        command["seq"], reply["seq"], reply["of"], decision["seq"] = seq, seq + 1, seq, seq + 2
        records[seq:seq + 3] = [command, reply, decision]
    (out / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_freed_heap_is_handed_back_at_the_first_live_frame_and_every_100_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not while re-living (the re-live's records are still held), then at the handover and every
    TRIM_EVERY_FRAMES live frames (the soak's memory check: glibc keeps freed pages otherwise)."""
    from types import SimpleNamespace

    from deepspm.controller import session

    trims: list[int] = []
    seen: list[int] = []
    loop = SimpleNamespace(counters=SimpleNamespace(frames=0), journal=SimpleNamespace(replaying=True))
    monkeypatch.setattr(session, "_malloc_trim", lambda: trims.append(loop.counters.frames))
    hook = session._trimming_heap(lambda lp: seen.append(lp.counters.frames))
    for frame in range(1, 400):
        loop.counters.frames = frame
        loop.journal.replaying = frame < 50
        hook(loop)  # type: ignore[arg-type]
    assert trims == [50, 150, 250, 350] and seen == list(range(1, 400))
