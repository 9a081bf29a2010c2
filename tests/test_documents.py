"""Typed journal documents and the one fold of a journal: every record kind written and read back as the same
document, unsound records refused with their seq and problem, schema 1 journals reported but not replayed or
resumed, status folding in constant memory, and the records replay and resume re-live."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import math
import pickle
from pathlib import Path
from typing import Any

import pytest

from deepspm.cli import main
from deepspm.controller import runfold
from deepspm.controller.commands import MotorMove, Pulse, ReadZ, StartScan, Withdraw
from deepspm.controller.config import load_config
from deepspm.controller.documents import (
    ActionChosen,
    Classification,
    Entry,
    Failure,
    LegacyCommand,
    NoRoom,
    Note,
    OperatorRequestRecord,
    Reply,
    ResetActionChosen,
    Resume,
    SampleVerdict,
    Start,
    Stop,
    TransitionRecord,
    ZCheck,
    entry_from_record,
)
from deepspm.controller.journal import JournalError, read_journal
from deepspm.controller.replay_run import replay_run
from deepspm.controller.report import write_report
from deepspm.controller.runfold import fold_records, read_fold
from deepspm.controller.session import run_session
from deepspm.controller.status import status_text
from tests.test_journal import new_journal
from tests.test_report import NM, ScriptedRun, counted_from_records

GOLDEN_V1 = Path(__file__).parent / "golden" / "journal_schema1.jsonl.gz"

DOCUMENTS = [
    Withdraw(), ReadZ(), MotorMove(4, 20, "retract after a crash"), StartScan(1e-9, -2e-9, 10e-9, "creep"),
    Pulse(1e-9, 2e-9, 3.0, 0.02, 1),
    Reply(of=1, op="z_state", result={"type": "ZState", "z_m": 1e-7, "z_low_m": -5e-7, "z_high_m": 5e-7,
                                      "controller_on": True}, digest="0123456789abcdef"),
    Reply(of=2, op="withdraw", result=None, digest="0123456789abcdef"),
    Failure(of=3, op="start_scan", error="CommandTimeout", message="no reply in 60 s", digest="fedcba9876543210"),
    ZCheck(extension=math.inf, verdict="crashed"),  # a non-finite float is journaled as "inf" and read back
    SampleVerdict(frame="a" * 64, verdict="bad_sample", radius_m=25e-9),
    Classification(frame="b" * 64, ransac_seed=7, p_good=0.25, good=False, classifier="c@1", trigger="probe_bad",
                   context={"training": False, "bad_probe_count": 1, "in_episode": True, "bad_probe_threshold": 3},
                   bad_probe_count=1, in_episode=True, episode=2, episode_started=True, episode_ended=False,
                   reward=None, free_side_m=5e-9, episode_actions=0, labels=[["b" * 64, False]]),
    ActionChosen(frame="b" * 64, action=3, q_values=[0.5, -1.0], mask=[True, False], epsilon=0.05, explored=False,
                 agent="a@1", site_xy_m=[1e-9, 2e-9], free_side_m=5e-9),
    NoRoom(frame="b" * 64),
    ResetActionChosen(frame="b" * 64, action=11),
    TransitionRecord("moved", "moving", "approaching"),
    OperatorRequestRecord("pause", "signal", ""),
    Note("instrument fault in scanning: CommandTimeout", {"consecutive": 2}),
]


def test_every_document_is_written_and_read_back_as_itself(tmp_path: Path) -> None:
    async def write() -> None:
        journal = new_journal(tmp_path)
        journal.start(Start(run_id="r", seed=3, config={"run": {"hours": None}}))
        for doc in DOCUMENTS:
            journal.write(doc)
        await journal.close("completed", "frame budget reached", counters={"frames": 0}, final_state="stopped")
        resumed = new_journal(tmp_path, resume=True)
        await resumed.close("stopped", "operator stop")

    asyncio.run(write())
    entries = [entry_from_record(r) for r in read_journal(tmp_path)]
    assert [e.seq for e in entries] == list(range(len(DOCUMENTS) + 4))
    assert entries[0].doc == Start(run_id="r", seed=3, config={"run": {"hours": None}})
    assert [e.doc for e in entries[1:-3]] == DOCUMENTS
    assert entries[-3].doc == Stop("completed", "frame budget reached", {"frames": 0}, "stopped")
    resume = entries[-2].doc
    assert isinstance(resume, Resume) and resume.previous_seq == len(DOCUMENTS) + 1 and resume.previous_kind == "stop"
    assert entries[-1].doc == Stop("stopped", "operator stop")
    assert [e.kind for e in entries[1:6]] == ["command"] * 5 and entries[-2].kind == "resume"


def test_start_stop_and_resume_are_not_written_by_write(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    with pytest.raises(ValueError, match="start record: a start record: field 'seed' should be int, not 'x'"):
        journal.start({"seed": "x"})
    journal.start(Start(run_id="r"))
    for doc in (Start(), Stop("ok"), Resume(0, "start", 0, [], 0.0)):
        with pytest.raises(ValueError, match="written by start"):
            journal.write(doc)
    with pytest.raises(ValueError, match="a stop record has unknown fields \\['colour'\\]"):
        asyncio.run(journal.close("ok", "", colour="red"))


def rec(kind: str, seq: int = 5, **data: Any) -> dict[str, Any]:
    return {"seq": seq, "t_mono": 1.0, "t_wall": 2.0, "kind": kind, **data}


@pytest.mark.parametrize("record, problem", [
    (rec("checkpoint", name="x"), "seq 5: a record of the unknown kind 'checkpoint'"),
    (rec("decision", decision="guess", frame="x"), "seq 5: a decision record of the unknown decision 'guess'"),
    (rec("command", op="approach"), "seq 5: a command record with the unknown op 'approach'"),
    (rec("command", op="motor_move", direction=4), "seq 5: a motor_move command lacks the fields ['steps']"),
    (rec("command", op="withdraw", force=True), "seq 5: a withdraw command has unknown fields ['force']"),
    (rec("transition", trigger="moved", source="moving", dest=3),
     "seq 5: a transition record: field 'dest' should be str, not 3"),
    (rec("decision", decision="sample", frame="x", verdict="bad_sample", radius_m="far"),
     "seq 5: a sample decision: field 'radius_m' should be float, not 'far'"),
    (rec("decision", decision="action", frame="x", action=1, q_values=[0.1, "high"], mask=[True], epsilon=0.1,
         explored=False, agent="a", site_xy_m=[0.0, 0.0], free_side_m=1e-9),
     "seq 5: a action decision: field 'q_values' should be float, not 'high'"),
    (rec("decision", decision="reset_action", frame="x", action=True),
     "seq 5: a reset_action decision: field 'action' should be int, not True"),
    (rec("note", detail="no message"), "seq 5: a note needs a message (a string)"),
    (rec("start", seq=0, run_id="r"), "seq 0: the start record has no schema version"),
    (rec("reply", of=4, op="withdraw", result=None), "seq 5: a reply record lacks the fields ['digest']"),
    ({"seq": "5", "t_mono": 1.0, "t_wall": 2.0, "kind": "note", "message": "m"}, "a record without a valid seq ('5')"),
    ({"seq": 5, "t_mono": None, "t_wall": 2.0, "kind": "note", "message": "m"}, "seq 5: t_mono is None, not a number"),
])
def test_an_unsound_record_is_a_journal_error_naming_seq_and_problem(record: dict[str, Any], problem: str) -> None:
    with pytest.raises(JournalError) as error:
        entry_from_record(record)
    assert str(error.value).split(": {")[0] == problem  # a record without a seq is quoted after the problem


def test_a_schema_1_record_reads_only_in_a_schema_1_journal() -> None:
    old = rec("command", op="move_area", direction=0)
    assert entry_from_record(old, schema=1).doc == LegacyCommand("move_area", {"direction": 0})
    with pytest.raises(JournalError, match="unknown op 'move_area'"):
        entry_from_record(old)
    with pytest.raises(JournalError, match="the journal does not begin with a start record"):
        fold_records([rec("note", seq=0, message="m")])
    with pytest.raises(JournalError, match="journal schema 4 is not one this version reads"):
        fold_records([rec("start", seq=0, schema=4)])


# -- schema 1 ---------------------------------------------------------------------------------------------


@pytest.fixture
def v1_run(tmp_path: Path) -> Path:
    """A real schema-1 journal (an eventful 40-frame simulated run made by the code before the single-operation
    commands); its frame files are not kept."""
    run_dir = tmp_path / "v1"
    run_dir.mkdir()
    (run_dir / "journal.jsonl").write_bytes(gzip.decompress(GOLDEN_V1.read_bytes()))
    return run_dir


def test_a_schema_1_journal_is_reported_and_shown(v1_run: Path, tmp_path: Path) -> None:
    records = read_journal(v1_run)
    assert records[0]["schema"] == 1 and {"approach", "set_z_extension", "retract_after_crash", "move_area", "scan"} <= {
        r.get("op") for r in records}
    summary = write_report(v1_run, tmp_path / "out")
    counted = counted_from_records(records)
    reported = dataclasses.asdict(summary) | {"recoveries": summary.recoveries}
    assert {k: reported[k] for k in counted} == counted
    c = records[-1]["counters"]
    assert (summary.frames_recorded - summary.bad_samples, summary.good_frames, summary.moves) == (
        c["frames"], c["good_probe_frames"], c["moves"])
    assert (summary.contact_recoveries, summary.crash_recoveries) == (c["contact_recoveries"], c["crash_recoveries"])
    assert summary.moves >= 1 and summary.crash_recoveries >= 1 and summary.bad_samples >= 1
    regions = read_fold(v1_run, history=True).fold.history
    assert regions is not None and {r.x_m for r in regions.regions} != {0.0}  # placed by the schema-1 scan commands
    text = status_text(v1_run, now=records[-1]["t_wall"])
    assert "STOPPED: completed" in text and "40 classified" in text and "warning" not in text


def test_a_schema_1_journal_is_not_replayed(v1_run: Path) -> None:
    with pytest.raises(JournalError) as error:
        asyncio.run(replay_run(v1_run))
    assert str(error.value) == ("journal schema 1 (written by deepspm 0.1.0, before the single-operation instrument "
                                "commands) cannot be replayed by this version (schema 3); deepspm report and status "
                                "still read it")


def test_a_killed_schema_1_run_is_not_resumed_and_its_journal_is_untouched(v1_run: Path, capsys) -> None:
    path = v1_run / "journal.jsonl"
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:300]))  # killed: no stop record
    before = path.read_bytes()
    with pytest.raises(JournalError, match="journal schema 1 .* cannot be resumed by this version \\(schema 3\\)"):
        asyncio.run(run_session(load_config(None, {}), v1_run, resume=True))
    assert main(["run", "--quiet", "--resume", str(v1_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]  # refused at the edge, before "resuming ..." is printed
    assert err[0].startswith("deepspm run: error: argument --resume: ") and "journal schema 1 (written by deepspm 0.1.0" in err[0]
    assert main(["replay", str(v1_run)]) == 2
    assert "cannot be replayed by this version (schema 3)" in capsys.readouterr().err
    assert path.read_bytes() == before  # no resume record, no cut
    assert sorted(p.name for p in v1_run.iterdir()) == [".lock", "journal.jsonl"]  # no frames/, checkpoints/


# -- the fold -----------------------------------------------------------------------------------------------


async def _long_run(run_dir: Path, frames: int) -> None:
    run = ScriptedRun(run_dir).open()
    for k in range(frames):
        await run.frame((k % 7) * NM, (k // 7 % 7) * NM, 0.95 if k % 3 else 0.3)
    await run.close()


def test_the_status_fold_keeps_no_history(tmp_path: Path) -> None:
    """Without history the fold is the same size after 20 frames as after 200: O(1) for multi-day journals."""
    sizes = []
    for frames in (20, 200):
        asyncio.run(_long_run(tmp_path / str(frames), frames))
        fold = read_fold(tmp_path / str(frames)).fold
        assert fold.frames_classified == frames and fold.history is None and fold.relived is None
        sizes.append(len(pickle.dumps(fold)))
    assert abs(sizes[1] - sizes[0]) < 64, sizes
    with_history = read_fold(tmp_path / "200", history=True).fold
    assert with_history.history is not None and len(with_history.history.frames) == 200


def test_the_fold_selects_what_a_replay_relives(tmp_path: Path) -> None:
    async def write() -> ScriptedRun:
        run = ScriptedRun(tmp_path / "run").open()
        ref = await run.frame(0, 0, 0.3, start_episode=True)
        run.action(ref, 1, 1 * NM, 1 * NM, explored=True)
        run.journal.write(OperatorRequestRecord("stop", "stop_file", "enough"))
        run.command(Withdraw())
        await run.close("stopped", "operator stop")
        return run

    asyncio.run(write())
    records = read_journal(tmp_path / "run")
    relived = fold_records(records, replay=True).relived
    assert relived is not None
    assert [e.seq for e in relived.entries] == [r["seq"] for r in records[1:-1]]  # not start, not stop
    commands = [r for r in records if r["kind"] == "command"]
    assert [c.seq for c in relived.calls] == [r["seq"] for r in commands if r["op"] != "stall"]
    assert all(isinstance(c.outcome, Entry) and isinstance(c.outcome.doc, Reply) and c.outcome.doc.of == c.seq
               for c in relived.calls)
    assert [type(e.doc) for e in relived.decisions] == [Classification, ActionChosen]
    operator = next(r for r in records if r["kind"] == "operator")
    assert list(relived.operator) == [operator["seq"]] and relived.operator[operator["seq"]].detail == "enough"
    withdraw = next(r for r in records if r.get("op") == "withdraw" and r["kind"] == "command")
    assert relived.stop_point == withdraw["seq"]  # the loop stops at its safe point before the withdraw


def test_a_killed_run_folds_up_to_its_last_complete_record(tmp_path: Path) -> None:
    async def write() -> None:
        run = ScriptedRun(tmp_path / "run").open()
        await run.frame(0, 0, 0.97)
        await run.abandon()

    asyncio.run(write())
    with open(tmp_path / "run" / "journal.jsonl", "ab") as f:
        f.write(json.dumps(rec("note", seq=99, message="m")).encode()[:20])
    read = read_fold(tmp_path / "run")
    assert read.torn_tail_bytes == 20 and read.fold.stop is None and read.fold.frames_classified == 1


def _scripted_run_with_a_stop(run_dir: Path, frames: int) -> list[dict[str, Any]]:
    async def write() -> None:
        run = ScriptedRun(run_dir).open()
        for i in range(frames):
            ref = await run.frame(i * NM, 0, 0.3 + 0.6 * (i % 2), start_episode=i == 0)
            run.action(ref, 1 + i % 3, i * NM, 1 * NM, explored=i % 4 == 0)
        run.journal.write(OperatorRequestRecord("stop", "stop_file", "enough"))
        run.command(Withdraw())
        await run.close("stopped", "operator stop")

    asyncio.run(write())
    return read_journal(run_dir)


def test_a_journal_is_relived_as_the_loop_goes_holding_a_few_records(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume reads the journal as the loop re-lives it (issue 17: holding a 10 000-frame journal's records
    kept a resumed process ~1 GB above a fresh one): the tapes give what the whole fold gives, in the same order,
    with only a few records read ahead of the loop."""
    records = _scripted_run_with_a_stop(tmp_path / "run", 30)
    whole = fold_records(records, replay=True).relived
    assert whole is not None
    read: list[int] = []

    class CountingReader(runfold.JournalReader):
        def __next__(self) -> dict[str, Any]:
            record = super().__next__()
            read.append(record["seq"])
            return record

    monkeypatch.setattr(runfold, "JournalReader", CountingReader)
    stream = runfold.relive_journal(tmp_path / "run")
    calls, decisions = list(whole.calls), list(whole.decisions)
    ahead = 0
    for entry in whole.entries:  # the loop's order: a record, then its call or decision where it has one
        assert stream.entries.take().seq == entry.seq
        if calls and calls[0].seq == entry.seq:
            call, expected = stream.calls.take(), calls.pop(0)
            assert (call.seq, call.outcome and call.outcome.seq) == (expected.seq, expected.outcome and expected.outcome.seq)
        if decisions and decisions[0].seq == entry.seq:
            assert stream.decisions.take().seq == decisions.pop(0).seq
        ahead = max(ahead, len(read) - stream.entries.taken)
    assert not calls and not decisions
    assert stream.entries.peek() is None and stream.calls.peek() is None and stream.decisions.peek() is None
    assert read == [r["seq"] for r in records]  # each record read once, all of them
    assert len(whole.entries) > 200 and ahead <= 4  # at most a command and its reply beyond the start record
    assert stream.operator == whole.operator and stream.stop_point == whole.stop_point


def test_a_resume_survey_reads_the_journal_once_and_stops_at_the_length_it_found(tmp_path: Path) -> None:
    records = _scripted_run_with_a_stop(tmp_path / "run", 6)
    path = tmp_path / "run" / "journal.jsonl"
    data = path.read_bytes()
    survey = runfold.survey_journal(tmp_path / "run")
    assert survey.valid_bytes == len(data) and survey.first == records[0]
    assert survey.actions == 6 and survey.scan_in_flight is None
    assert survey.fold.relived is not None and list(survey.fold.relived.operator) == [
        next(r["seq"] for r in records if r["kind"] == "operator")]
    with path.open("ab") as f:  # records appended after the survey (the resumed run's own), and a torn line
        f.write(data.splitlines(keepends=True)[-1] + b'{"seq": 1')
    relived = runfold.relive_journal(tmp_path / "run", survey.valid_bytes)
    taken = []
    while relived.entries.peek() is not None:
        taken.append(relived.entries.take().seq)
    whole = fold_records(records, replay=True).relived
    assert whole is not None and taken == [e.seq for e in whole.entries]  # up to the survey's length only

    # cut inside a frame's scan: the survey names the scan a microscope would still be doing
    scan_reply = next(i for i, r in enumerate(records) if r["kind"] == "reply" and r["op"] == "start_scan")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "journal.jsonl").write_bytes(b"".join(data.splitlines(keepends=True)[: scan_reply + 1]))
    cut = runfold.survey_journal(tmp_path / "cut")
    assert isinstance(cut.scan_in_flight, StartScan) and cut.actions == 0
