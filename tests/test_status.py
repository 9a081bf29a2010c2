"""`deepspm status`: the live view of a run, read from its journal while it is written, stopped or torn."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from deepspm.controller.journal import Journal
from deepspm.controller.status import CLEAR_SCREEN, LABEL_WIDTH, JournalFollower, follow, status_text
from tests.test_report import NM, ScriptedRun, write_scripted_run

T0 = 1_700_000_000.0  # ManualClock's wall time at the start


async def live_run(run_dir: Path) -> ScriptedRun:
    """A run in the middle of a conditioning episode, still writing (no stop record)."""
    run = ScriptedRun(run_dir).open()
    await run.frame(0, 0, 0.97)
    await run.bad_sample(10 * NM, 0, 25 * NM)
    await run.frame(0, 10 * NM, 0.3)
    ref = await run.frame(-10 * NM, 0, 0.25, start_episode=True)
    run.action(ref, 1, -11 * NM, 1 * NM)
    run.failure()
    await run.z_trouble(0, -10 * NM, crashed=False)
    await run.frame(0, -10 * NM, 0.41, select=False)
    await run.journal.flush()
    return run


def lines_of(text: str) -> dict[str, str]:
    """Each line by its first word(s): the label column of the status view."""
    return {line[:LABEL_WIDTH].strip(): line[LABEL_WIDTH:].strip() for line in text.splitlines()[1:]}


async def test_status_of_a_live_run(tmp_path: Path) -> None:
    run = await live_run(tmp_path / "run")
    now = run.clock.t_wall + 5.0
    text = status_text(tmp_path / "run", now=now)
    header = text.splitlines()[0]
    assert header == "deepspm run run   RUNNING   state: conditioning"
    lines = lines_of(text)
    elapsed = now - T0
    assert lines["elapsed"].startswith(f"00:{int(elapsed // 60):02d}:{int(elapsed % 60):02d} since 2023-11-14 22:13:20 UTC")
    assert lines["elapsed"].endswith("last record 5.0 s ago")
    assert lines["frames"] == "5 recorded, 4 classified, 1 good probe (25.0%), 1 bad sample"
    assert lines["last frame"] == "#4 p(good) 0.410 -> bad probe, 5.0 s ago"
    assert lines["probe"] == "bad-probe counter 1/3; episode 1 under way, actions so far: 1"
    assert lines["counters"] == ("episodes 1, actions 1, moves 0, recoveries 1 (contact 1, crash 0), failures 1")
    assert lines["last note"].startswith("instrument fault in scanning: CommandTimeout (")
    assert lines["last failure"].startswith("start_scan failed: CommandTimeout: no reply in 60 s (")
    assert "stopped" not in lines


async def test_a_silent_live_run_is_flagged(tmp_path: Path) -> None:
    run = await live_run(tmp_path / "run")
    text = status_text(tmp_path / "run", now=run.clock.t_wall + 3600.0)
    assert "last record 01:00:00 ago (no record for a long time: is the run still alive?)" in text


async def test_status_of_a_stopped_run(tmp_path: Path) -> None:
    run = await write_scripted_run(tmp_path / "run")
    text = status_text(tmp_path / "run", now=run.clock.t_wall + 86400.0)  # read a day later
    assert text.splitlines()[0] == "deepspm run run   STOPPED: completed   state: stopped"
    lines = lines_of(text)
    assert lines["stopped"] == "completed: frame budget reached"
    assert lines["elapsed"] == "00:17:00 since 2023-11-14 22:13:20 UTC"  # first to last record, not to now
    assert lines["frames"] == "16 recorded, 14 classified, 5 good probe (35.7%), 1 bad sample"
    assert lines["last frame"] == "#14 p(good) 0.300 -> bad probe"
    assert lines["counters"] == ("episodes 3, actions 6 (+1 reset), moves 1, recoveries 2 (contact 1, crash 1), "
                                 "failures 1")


async def test_a_torn_last_line_is_left_out_until_it_is_complete(tmp_path: Path) -> None:
    run = await live_run(tmp_path / "run")
    path = tmp_path / "run" / "journal.jsonl"
    whole = json.dumps({"seq": run.journal.next_seq, "t_mono": 0.0, "t_wall": run.clock.t_wall + 1, "kind": "stop",
                        "status": "stopped", "reason": "operator stop"}).encode() + b"\n"
    with open(path, "ab") as f:
        f.write(whole[:25])
    follower = JournalFollower(tmp_path / "run")
    status = follower.poll()
    assert not status.stopped and follower.pending_bytes == 25
    text = status_text(tmp_path / "run", now=run.clock.t_wall)
    assert "RUNNING" in text and "an incomplete last line of 25 bytes is not read yet" in text
    records_before = status.records

    with open(path, "ab") as f:  # the writer finishes the line
        f.write(whole[25:])
    status = follower.poll()
    assert status.stop is not None and (status.stop.status, status.stop.reason) == ("stopped", "operator stop")
    assert status.records == records_before + 1 and follower.pending_bytes == 0
    assert "STOPPED: stopped" in status_text(tmp_path / "run", now=run.clock.t_wall)


async def test_the_follower_reads_only_what_was_appended(tmp_path: Path) -> None:
    run = await live_run(tmp_path / "run")
    path = tmp_path / "run" / "journal.jsonl"
    follower = JournalFollower(tmp_path / "run")
    first = follower.poll()
    assert follower.offset == path.stat().st_size
    records, frames = first.records, first.frames_recorded
    await run.frame(10 * NM, 10 * NM, 0.95)
    await run.journal.flush()
    status = follower.poll()
    assert status.frames_recorded == frames + 1 and status.frames_classified == 5  # nothing counted twice
    # region_selected, 2 scans x 3 x (command, reply), frame_recorded, classify, probe_good
    assert status.records == records + 16
    assert follower.offset == path.stat().st_size
    assert follower.poll().records == status.records  # nothing new: nothing read


async def test_a_journal_cut_shorter_is_read_again(tmp_path: Path) -> None:
    await live_run(tmp_path / "run")
    path = tmp_path / "run" / "journal.jsonl"
    follower = JournalFollower(tmp_path / "run")
    follower.poll()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]))
    assert follower.poll().records == 5


def test_no_journal_yet(tmp_path: Path) -> None:
    assert "no journal yet" in status_text(tmp_path / "run", now=T0)


async def test_follow_refreshes_until_the_run_stops(tmp_path: Path) -> None:
    run = await live_run(tmp_path / "run")
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:  # the run goes on while the view waits
        sleeps.append(seconds)
        if len(sleeps) == 1:
            await run.frame(10 * NM, 10 * NM, 0.95, end_episode=True)
            await run.journal.flush()
        elif len(sleeps) == 3:
            await run.close("stopped", "operator stop")

    out = io.StringIO()  # not a TTY: a block is appended when something changed
    status = await follow(tmp_path / "run", 5.0, sleep=sleep, out=out, now=lambda: run.clock.t_wall)
    assert status.stop is not None and status.stop.reason == "operator stop"
    assert sleeps == [5.0, 5.0, 5.0]
    blocks = out.getvalue().strip().split("\n\n")
    assert len(blocks) == 3  # start, after the new frame, stopped (the unchanged poll printed nothing)
    assert "#4 p(good) 0.410" in blocks[0] and "#5 p(good) 0.950 -> good probe" in blocks[1]
    assert blocks[2].startswith("deepspm run run   STOPPED: stopped")
    assert CLEAR_SCREEN not in out.getvalue()


async def test_follow_on_a_terminal_redraws_every_interval(tmp_path: Path) -> None:
    run = await live_run(tmp_path / "run")

    async def sleep(seconds: float) -> None:
        pass

    out = io.StringIO()
    status = await follow(tmp_path / "run", 1.0, sleep=sleep, out=out, clear=True, now=lambda: run.clock.t_wall,
                          max_polls=3)
    assert not status.stopped
    assert out.getvalue().count(CLEAR_SCREEN) == 3


@pytest.mark.parametrize("garbage, problem", [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "a line that is not a JSON object"),
    (b'{"seq": 999, "t_mono": 0.0, "t_wall": 0.0, "kind": "decision", "decision": "guess"}\n',
     "seq 999: a decision record of the unknown decision 'guess'"),
    (b'{"seq": 999, "t_mono": 0.0, "t_wall": 0.0, "kind": "transition", "trigger": "moved", "source": 3}\n',
     "seq 999: a transition record lacks the fields ['dest']"),
])
async def test_a_bad_complete_line_is_counted_not_fatal(tmp_path: Path, garbage: bytes, problem: str) -> None:
    run = await live_run(tmp_path / "run")
    with open(tmp_path / "run" / "journal.jsonl", "ab") as f:
        f.write(garbage)
    text = status_text(tmp_path / "run", now=run.clock.t_wall)
    assert lines_of(text)["warning"] == f"1 journal lines are not sound records (the first: {problem})"
    assert lines_of(text)["frames"] == "5 recorded, 4 classified, 1 good probe (25.0%), 1 bad sample"  # not counted


async def test_a_resumed_run_counts_on_across_the_resume(tmp_path: Path) -> None:
    run = await live_run(tmp_path / "run")
    await run.abandon()  # killed
    with open(tmp_path / "run" / "journal.jsonl", "ab") as f:
        f.write(b'{"seq": 99999, "kind": "trans')  # torn by the kill; the resume cuts it off
    run.journal = Journal(tmp_path / "run", run.clock, resume=True)
    await run.frame(10 * NM, 10 * NM, 0.95, end_episode=True)
    await run.close("completed", "frame budget reached")
    lines = lines_of(status_text(tmp_path / "run", now=run.clock.t_wall))
    assert lines["frames"] == "6 recorded, 5 classified, 2 good probe (40.0%), 1 bad sample"
    assert lines["counters"].endswith("failures 1, resumes 1")
    assert lines["stopped"] == "completed: frame budget reached"
    assert lines["run time"] == "00:06:30 (all processes)"  # 330 s before the kill, 60 s after the resume
