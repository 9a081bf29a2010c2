"""The journal: contiguous seq, kill-safety and resume, atomic content-addressed frames, JSON encoding,
and a writer that keeps the event loop free."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path

import numpy as np
import pytest

from deepspm.controller import journal as journal_module
from deepspm.controller.journal import (
    JOURNAL_FILE,
    SCHEMA_VERSION,
    Journal,
    JournalError,
    ManualClock,
    SystemClock,
    TornJournalWarning,
    check_journal,
    encode_record,
    frame_ref,
    list_frames,
    load_frame,
    read_journal,
    scan_journal,
    time_spent_s,
    to_jsonable,
)
from deepspm.controller.runlock import RunDirInUse, RunDirLock


class Colour(str, Enum):
    RED = "red"


class Level(IntEnum):
    HIGH = 3


@dataclass(frozen=True)
class Inner:
    p_good: np.float32
    mask: np.ndarray


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    colour: Colour


def new_journal(run_dir: Path, clock: ManualClock | None = None, **kw: object) -> Journal:
    return Journal(run_dir, clock or ManualClock(), **kw)  # type: ignore[arg-type]


async def write_run(run_dir: Path, n_events: int, *, close: bool = True) -> Journal:
    """A run with a writer task: start, n events (yielding to the loop now and then), then a stop record,
    or (close=False) a process that dies after its last flush: no stop record."""
    clock = ManualClock()
    journal = new_journal(run_dir, clock)
    writer = asyncio.create_task(journal.writer())
    assert journal.start({"run_id": "r1", "seed": 0}) == 0
    for i in range(n_events):
        clock.advance(0.5)
        assert journal.event("note", i=i) == i + 1
        if i % 7 == 0:
            await asyncio.sleep(0)
    if close:
        await journal.close("ok", "done")
        await writer
    else:
        await journal.flush()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        die(journal)
    return journal


def die(journal: Journal) -> None:
    """What the OS does when the writing process is killed: its files close and its lock goes."""
    journal._close_file()
    journal._run_lock.release()


# -- sequence and records ----------------------------------------------------------------------------------


async def test_records_are_contiguous_and_carry_both_times(tmp_path: Path) -> None:
    await write_run(tmp_path, 40)
    records = read_journal(tmp_path)
    assert [r["seq"] for r in records] == list(range(42))
    assert records[0]["kind"] == "start" and records[0]["run_id"] == "r1" and records[0]["schema"] == SCHEMA_VERSION
    assert records[-1] == {"seq": 41, "t_mono": 20.0, "t_wall": 1_700_000_020.0, "kind": "stop", "status": "ok", "reason": "done"}
    assert [r["i"] for r in records[1:-1]] == list(range(40))
    assert check_journal(records, require_stop=True) == []
    assert (tmp_path / "frames").is_dir() and (tmp_path / "checkpoints").is_dir()


async def test_event_rules(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    with pytest.raises(JournalError, match="before start"):
        journal.event("note")
    journal.start({"run_id": "x"})
    with pytest.raises(JournalError, match="already has a start"):
        journal.start({})
    for kind in ("start", "stop", "resume", "Note", "", "two words"):
        with pytest.raises(ValueError):
            journal.event(kind)
    with pytest.raises(ValueError, match="set by the journal"):
        journal.event("note", seq=3)
    with pytest.raises(TypeError, match="cannot journal a value of type object"):
        journal.event("note", thing=object())
    assert journal.event("note", ok=True) == 1  # a failed event consumed no seq
    assert await journal.close("ok", "") == 2
    assert await journal.close("ok", "again") is None  # idempotent
    with pytest.raises(JournalError, match="closed"):
        journal.event("note")
    assert [r["seq"] for r in read_journal(tmp_path)] == [0, 1, 2]


async def test_flush_works_without_a_writer_task_and_makes_records_durable(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    journal.start({})
    journal.event("command", name="Bias.Pulse", args={"bias_V": -8.0})
    assert (tmp_path / JOURNAL_FILE).read_bytes() == b""  # only enqueued
    await journal.flush()
    lines = (tmp_path / JOURNAL_FILE).read_bytes().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["args"] == {"bias_V": -8.0}
    await journal.close("ok")


async def test_a_new_journal_refuses_an_existing_one(tmp_path: Path) -> None:
    await write_run(tmp_path, 1)
    with pytest.raises(JournalError, match="already exists"):
        new_journal(tmp_path)


async def test_events_from_other_threads_get_unique_contiguous_seqs(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    journal.start({})
    writer = asyncio.create_task(journal.writer())
    await asyncio.sleep(0)

    def burst(thread: int) -> list[int]:
        return [journal.event("note", thread=thread, k=k) for k in range(200)]

    results = await asyncio.gather(*(asyncio.to_thread(burst, t) for t in range(4)))
    assert sorted(s for r in results for s in r) == list(range(1, 801))
    await journal.flush()  # the writer was woken from the threads too
    await journal.close("ok")
    await writer
    records = read_journal(tmp_path)
    assert [r["seq"] for r in records] == list(range(802))  # file order is seq order
    for t in range(4):  # each thread's records keep their order
        assert [r["k"] for r in records if r.get("thread") == t] == list(range(200))


# -- the writer keeps the loop free -----------------------------------------------------------------------


async def test_a_stalled_disk_never_blocks_the_event_loop(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    gate = threading.Event()
    writer_threads: list[int] = []
    original = journal._write_batch

    def stalled_write(batch: list) -> None:
        writer_threads.append(threading.get_ident())
        gate.wait(timeout=10)  # a safety net only: the test opens the gate itself
        original(batch)

    journal._write_batch = stalled_write  # type: ignore[method-assign]
    writer = asyncio.create_task(journal.writer())
    journal.start({})
    for i in range(100):
        journal.event("note", i=i)  # returns at once although the disk is stuck
    flusher = asyncio.create_task(journal.flush())
    for _ in range(200):  # the loop keeps running other work while the write is stalled
        await asyncio.sleep(0)
    assert not flusher.done()
    assert (tmp_path / JOURNAL_FILE).read_bytes() == b""
    assert writer_threads and threading.get_ident() not in writer_threads
    gate.set()
    await flusher
    assert len(read_journal(tmp_path)) == 101
    await journal.close("ok")
    await writer
    assert check_journal(read_journal(tmp_path), require_stop=True) == []


async def test_a_failed_write_surfaces_in_flush_and_close_but_not_in_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = new_journal(tmp_path)
    journal.start({})

    def broken(batch: list) -> None:
        with journal._disk:
            journal._failure = OSError(28, "No space left on device")
            journal._disk.notify_all()
        raise journal._failure

    monkeypatch.setattr(journal, "_write_batch", broken)
    writer = asyncio.create_task(journal.writer())
    with pytest.raises(OSError):
        await writer
    journal.event("note")  # the loop can still record (and withdraw the tip) after a disk failure
    with pytest.raises(JournalError, match="failed"):
        await journal.flush()
    with pytest.raises(JournalError, match="failed"):
        await journal.close("fault", "disk full")


async def test_a_full_disk_cuts_the_torn_batch_keeps_the_records_and_close_tries_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC mid-append: the half-written batch is cut off (no torn line for a later append to follow), the
    records stay queued, `disk_problem` names the file and the free space, the writer task ends without raising,
    and close() writes everything once space is back; still full, close() raises DiskFull and the file ends at its
    last complete batch."""
    full = {"on": False}
    append = journal_module._append_all

    def append_on_a_full_disk(fd: int, data: bytes) -> None:
        if full["on"]:
            os.write(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        append(fd, data)

    monkeypatch.setattr(journal_module, "_append_all", append_on_a_full_disk)
    for space_back in (True, False):
        run_dir = tmp_path / f"back-{space_back}"
        journal = new_journal(run_dir)
        writer = asyncio.create_task(journal.writer())
        journal.start({})
        journal.event("note", i=0)
        await journal.flush()
        good = (run_dir / JOURNAL_FILE).read_bytes()
        full["on"] = True
        for i in range(1, 4):
            journal.event("note", i=i)
        with pytest.raises(journal_module.DiskFull, match=r"disk full: cannot write .*journal.jsonl \(No space left "
                                                          r"on device; .* free there\)"):
            await journal.flush()
        await writer  # ended without raising: the loop reads disk_problem at its next safe point
        assert journal.disk_problem is not None and journal.disk_problem.free_bytes is not None
        assert (run_dir / JOURNAL_FILE).read_bytes() == good  # cut back, no torn line
        journal.event("note", i=4)  # the loop can still record (the withdraw) after the failure
        full["on"] = not space_back
        if space_back:
            assert await journal.close("suspended", "disk full") == 6
            records = read_journal(run_dir)
            assert [r.get("i") for r in records[1:-1]] == [0, 1, 2, 3, 4] and records[-1]["status"] == "suspended"
            assert check_journal(records, require_stop=True) == []
        else:
            with pytest.raises(journal_module.DiskFull):
                await journal.close("suspended", "disk full")
            assert (run_dir / JOURNAL_FILE).read_bytes() == good
            lock = RunDirLock(run_dir)
            lock.acquire()  # the lock was released all the same
            lock.release()
        full["on"] = False


def test_a_full_disk_during_a_frame_write_is_disk_full_naming_the_frame(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    journal = new_journal(tmp_path)

    def no_space(path: Path, write: object, *, fsync: bool) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module, "write_atomic", no_space)
    with pytest.raises(journal_module.DiskFull, match=r"cannot write .*/frames/[0-9a-f]{64}\.npy"):
        journal._save_frame_sync(np.zeros((4, 4)))
    assert journal.disk_problem is not None
    monkeypatch.setattr(journal_module, "write_atomic", lambda *a, **k: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):  # any other error is not a full disk
        journal._save_frame_sync(np.ones((4, 4)))


# -- encoding ---------------------------------------------------------------------------------------------


def test_encoding_of_numpy_nan_enum_dataclass() -> None:
    record = {
        "f32": np.float32(0.5), "i64": np.int64(7), "flag": np.bool_(True), "s": np.str_("x"),
        "array": np.array([[1.0, np.nan], [np.inf, -np.inf]], dtype=np.float32),
        "ints": np.arange(3, dtype=np.uint8),
        "nan": float("nan"), "inf": float("inf"), "ninf": -float("inf"),
        "colour": Colour.RED, "level": Level.HIGH,
        "decision": Outer("d", Inner(np.float32(0.25), np.array([True, False])), Colour.RED),
        "path": Path("frames") / "a.npy", "tuple": (1, 2.5), "set": {3, 1, 2},
        "keys": {Colour.RED: 1, 4: "four", np.int64(5): None},
    }
    line = encode_record(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    decoded = json.loads(line)  # strict JSON: no NaN/Infinity tokens
    assert decoded == {
        "f32": 0.5, "i64": 7, "flag": True, "s": "x",
        "array": [[1.0, "nan"], ["inf", "-inf"]], "ints": [0, 1, 2],
        "nan": "nan", "inf": "inf", "ninf": "-inf",
        "colour": "red", "level": 3,
        "decision": {"name": "d", "inner": {"p_good": 0.25, "mask": [True, False]}, "colour": "red"},
        "path": str(Path("frames") / "a.npy"), "tuple": [1, 2.5], "set": [1, 2, 3],
        "keys": {"red": 1, "4": "four", "5": None},
    }
    assert float(decoded["ninf"]) == -float("inf") and np.isnan(float(decoded["nan"]))  # float() reads them back
    assert type(decoded["level"]) is int and type(decoded["i64"]) is int


def test_unencodable_values_fail_loudly() -> None:
    for bad in (b"bytes", np.array([object()], dtype=object), 1 + 2j, {1, "a", object()}):
        with pytest.raises(TypeError):
            to_jsonable(bad)


# -- reading, checking, kill -9 and resume -----------------------------------------------------------------


def test_check_journal_finds_every_kind_of_problem() -> None:
    def rec(seq: object, kind: str = "note", t: float = 0.0) -> dict:
        return {"seq": seq, "t_mono": t, "t_wall": t, "kind": kind}

    good = [rec(0, "start"), rec(1), rec(2, "stop"), rec(3, "resume"), rec(4)]
    assert check_journal(good) == []
    assert check_journal(good, require_stop=True) == ["no stop record at the end"]
    assert check_journal([]) == ["no records (missing start)"]
    cases = {
        "missing start": [rec(0), rec(1)],
        "duplicate seq 1": [rec(0, "start"), rec(1), rec(1)],
        "gap: seq 2..3 missing": [rec(0, "start"), rec(1), rec(4)],
        "out of order": [rec(0, "start"), rec(2), rec(1)],
        "second start": [rec(0, "start"), rec(1, "start")],
        "after stop at seq 2 without a resume": [rec(0, "start"), rec(1, "stop"), rec(2)],
        "t_mono goes backwards at seq 2": [rec(0, "start", 5.0), rec(1, "note", 6.0), rec(2, "note", 1.0)],
        "lacks t_wall": [rec(0, "start"), {"seq": 1, "t_mono": 0.0, "kind": "note"}],
        "is not an integer": [rec(0, "start"), rec("1")],
    }
    for expected, records in cases.items():
        problems = check_journal(records)
        assert any(expected in p for p in problems), (expected, problems)
    # a resume starts a new monotonic clock: going back there is fine
    assert check_journal([rec(0, "start", 50.0), rec(1, "note", 60.0), rec(2, "resume", 1.0)]) == []


async def test_a_torn_last_line_is_left_out_and_reported(tmp_path: Path) -> None:
    await write_run(tmp_path, 5, close=False)
    whole = (tmp_path / JOURNAL_FILE).read_bytes()
    with open(tmp_path / JOURNAL_FILE, "ab") as f:
        f.write(b'{"seq":6,"t_mono":3.0,"t_wa')
    with pytest.warns(TornJournalWarning, match="incomplete last line"):
        records = read_journal(tmp_path)
    assert [r["seq"] for r in records] == list(range(6))
    contents = scan_journal(tmp_path)
    assert contents.torn_tail == b'{"seq":6,"t_mono":3.0,"t_wa' and contents.valid_bytes == len(whole)


async def test_a_bad_line_inside_the_journal_is_an_error(tmp_path: Path) -> None:
    await write_run(tmp_path, 3)
    lines = (tmp_path / JOURNAL_FILE).read_bytes().splitlines(keepends=True)
    lines[2] = b'{"seq": 2, "kind": \n'
    (tmp_path / JOURNAL_FILE).write_bytes(b"".join(lines))
    with pytest.raises(JournalError, match="line 3 is not JSON"):
        read_journal(tmp_path)
    with pytest.raises(JournalError, match="no journal"):
        read_journal(tmp_path / "elsewhere")


@pytest.mark.parametrize("cut", [0, 1, 17, -1])  # bytes of the next record that reached the disk (-1: all but "\n")
async def test_kill_mid_write_then_resume_has_no_gap_and_no_duplicate(tmp_path: Path, cut: int) -> None:
    await write_run(tmp_path, 10, close=False)  # seq 0..10 on disk, no stop: the process died
    next_line = encode_record({"seq": 11, "t_mono": 9.0, "t_wall": 9.0, "kind": "command", "name": "Bias.Pulse"})
    torn = next_line[: len(next_line) - 1 if cut == -1 else cut]
    with open(tmp_path / JOURNAL_FILE, "ab") as f:
        f.write(torn)

    clock = ManualClock(t_mono=0.0)  # a new process: its monotonic clock starts again
    journal = new_journal(tmp_path, clock, resume=True)
    assert journal.resume_info is not None
    assert journal.resume_info.last["seq"] == 10 and journal.resume_info.torn_bytes == len(torn)
    assert journal.resume_info.start["run_id"] == "r1"
    assert (tmp_path / JOURNAL_FILE).read_bytes().endswith(b"\n")  # the torn tail is gone already
    assert journal.event("note", after="resume") == 12
    await journal.close("ok", "finished after resume")

    records = read_journal(tmp_path)
    assert [r["seq"] for r in records] == list(range(14))
    assert records[11]["kind"] == "resume" and records[11]["previous_seq"] == 10
    assert records[11]["torn_bytes"] == len(torn)
    assert check_journal(records, require_stop=True) == []


async def test_resume_after_a_clean_stop_and_twice_in_a_row(tmp_path: Path) -> None:
    await write_run(tmp_path, 2)  # 0 start, 1-2 notes, 3 stop
    for expected_resume_seq in (4, 6):
        journal = new_journal(tmp_path, resume=True)
        assert journal.resume_info is not None and journal.resume_info.last["kind"] == "stop"
        await journal.close("ok", "again")
        records = read_journal(tmp_path)
        assert records[expected_resume_seq]["kind"] == "resume"
    assert check_journal(read_journal(tmp_path), require_stop=True) == []


async def test_resume_refuses_a_broken_or_missing_journal(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="nothing to resume"):
        new_journal(tmp_path, resume=True)
    await write_run(tmp_path, 3)
    lines = (tmp_path / JOURNAL_FILE).read_bytes().splitlines(keepends=True)
    (tmp_path / JOURNAL_FILE).write_bytes(b"".join(lines[:2] + lines[3:]))  # a gap
    with pytest.raises(JournalError, match="gap"):
        new_journal(tmp_path, resume=True)


async def test_resume_before_the_start_record_was_complete_begins_afresh(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_FILE).write_bytes(b'{"seq":0,"t_mono":0.0,"kind":"sta')
    journal = new_journal(tmp_path, resume=True)
    assert journal.resume_info is None
    assert journal.start({"run_id": "again"}) == 0
    await journal.close("ok")
    records = read_journal(tmp_path)
    assert [r["kind"] for r in records] == ["start", "stop"] and check_journal(records) == []


_CHILD = textwrap.dedent("""
    import asyncio, sys
    import numpy as np
    from deepspm.controller.journal import Journal, SystemClock

    async def main():
        journal = Journal(sys.argv[1], SystemClock())
        writer = asyncio.create_task(journal.writer())
        journal.start({"run_id": "killed"})
        rng = np.random.default_rng(0)
        i = 0
        while True:  # until killed
            ref = await journal.save_frame(rng.normal(size=(64, 64)).astype(np.float32))
            journal.event("note", i=i, frame=ref)
            i += 1
            if i % 5 == 0:
                await journal.flush()
            if i == 40:
                print("ready", flush=True)

    asyncio.run(main())
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
async def test_a_real_kill_9_then_resume(tmp_path: Path) -> None:
    """A writer process killed at an arbitrary point while writing records and frames: the resumed journal
    has no gap and no duplicate, and every frame it references is complete."""
    run_dir = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"  # blocks on the pipe, not a timer
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    journal = new_journal(run_dir, resume=True)
    await journal.close("ok", "after kill")
    records = read_journal(run_dir)
    assert check_journal(records, require_stop=True) == []
    assert [r["seq"] for r in records] == list(range(len(records))) and len(records) >= 42
    refs = [r["frame"] for r in records if r["kind"] == "note"]
    assert refs and all(load_frame(run_dir, ref).shape == (64, 64) for ref in refs)  # verified against their hash
    assert not [p for p in (run_dir / "frames").iterdir() if p.suffix != ".npy"]  # no temp file left


# -- frames ------------------------------------------------------------------------------------------------


async def test_save_frame_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    frame = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    ref = await journal.save_frame(frame)
    assert ref == frame_ref(frame) and len(ref) == 64
    path = tmp_path / "frames" / f"{ref}.npy"
    before = path.stat()
    assert await journal.save_frame(frame.copy()) == ref  # the same content again: a no-op
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    loaded = load_frame(tmp_path, ref)
    assert loaded.dtype == np.float32 and loaded.shape == (64, 64) and np.array_equal(loaded, frame)
    # dtype and shape are part of the identity; a later change to the caller's array is not
    assert frame_ref(frame.view(np.int32)) != ref and frame_ref(frame.reshape(32, 128)) != ref
    snapshot = frame.copy()
    ref2_task = asyncio.create_task(journal.save_frame(frame))
    await asyncio.sleep(0)  # the save has started and is in its thread
    frame[:] = 0.0  # the caller reuses its buffer meanwhile
    assert await ref2_task == ref and np.array_equal(load_frame(tmp_path, ref), snapshot)
    assert list_frames(tmp_path) == [ref]
    nan_frame = np.full((8, 8), np.nan, dtype=np.float32)  # a partial frame with missing lines
    assert np.isnan(load_frame(tmp_path, await journal.save_frame(nan_frame))).all()


async def test_a_frame_is_complete_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = new_journal(tmp_path)
    frame = np.arange(64, dtype=np.float32).reshape(8, 8)
    ref = frame_ref(frame)

    def dies_half_way(f: object, array: np.ndarray, allow_pickle: bool = False) -> None:
        f.write(b"\x93NUMPY partial")  # type: ignore[attr-defined]
        raise OSError("killed mid-write")

    monkeypatch.setattr(journal_module.np, "save", dies_half_way)
    with pytest.raises(OSError):
        await journal.save_frame(frame)
    assert list((tmp_path / "frames").iterdir()) == []  # no final file, no temp file
    monkeypatch.undo()

    def rename_fails(src: object, dst: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(journal_module.os, "replace", rename_fails)
    with pytest.raises(OSError):
        await journal.save_frame(frame)
    assert list((tmp_path / "frames").iterdir()) == []
    monkeypatch.undo()
    assert await journal.save_frame(frame) == ref
    assert [p.name for p in (tmp_path / "frames").iterdir()] == [f"{ref}.npy"]


async def test_a_leftover_temp_file_is_ignored_and_cleaned(tmp_path: Path) -> None:
    await write_run(tmp_path, 1, close=False)
    journal = new_journal(tmp_path, resume=True)
    frame = np.ones((8, 8), dtype=np.float32)
    ref = await journal.save_frame(frame)
    await journal.close("killed")  # pretend the next save was killed after its temp file was written:
    leftover = tmp_path / "frames" / f".{'0' * 64}.npy.abcd{journal_module.TEMP_SUFFIX}"
    leftover.write_bytes(b"\x93NUMPY half a frame")
    assert list_frames(tmp_path) == [ref]  # readers never see it
    with pytest.raises(JournalError, match="not in"):
        load_frame(tmp_path, "0" * 64)
    resumed = new_journal(tmp_path, resume=True)
    assert not leftover.exists()
    assert resumed.resume_info is not None and resumed.resume_info.removed_temp_files == (leftover.name,)
    assert list_frames(tmp_path) == [ref] and np.array_equal(load_frame(tmp_path, ref), frame)  # kept
    await resumed.close("ok")
    assert read_journal(tmp_path)[-2]["removed_temp_files"] == [leftover.name]


async def test_load_frame_checks_the_ref_and_the_content(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    ref = await journal.save_frame(np.zeros((8, 8), dtype=np.float32))
    for bad in ("../journal", "ABC", ref[:-1]):
        with pytest.raises(JournalError, match="not a frame reference"):
            load_frame(tmp_path, bad)
    np.save(tmp_path / "frames" / f"{ref}.npy", np.ones((8, 8), dtype=np.float32))  # tampered
    with pytest.raises(JournalError, match="does not match its hash"):
        load_frame(tmp_path, ref)
    assert load_frame(tmp_path, ref, verify=False).sum() == 64





def test_system_clock_reads_both_clocks() -> None:
    clock = SystemClock()
    a, b = clock.monotonic(), clock.monotonic()
    assert b >= a and clock.wall() > 1.6e9


# --- one writer per run directory ------------------------------------------------------------------------


async def test_a_second_writer_of_a_live_run_directory_is_refused(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    writer = asyncio.create_task(journal.writer())
    journal.start({"run_id": "r1", "seed": 0})
    await journal.flush()
    with pytest.raises(RunDirInUse, match=rf"in use by another deepspm process \(pid {os.getpid()}\)"):
        new_journal(tmp_path, resume=True)
    before = (tmp_path / JOURNAL_FILE).read_bytes()
    assert journal.event("note", still="writing") == 1  # the refused resume touched nothing
    await journal.close("ok", "done")
    await writer
    assert (tmp_path / JOURNAL_FILE).read_bytes().startswith(before)
    resumed = new_journal(tmp_path, resume=True)  # the lock went with the close
    await resumed.close("ok", "resumed")
    assert check_journal(read_journal(tmp_path), require_stop=True) == []


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    """A killed holder leaves no stale lock: the OS drops flock locks of dead processes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from deepspm.controller.runlock import RunDirLock; "
         "lock = RunDirLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=f"pid {holder.pid}"):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert lock.held
    lock.release()



def test_time_spent_sums_each_process_span() -> None:
    def rec(seq: int, kind: str, t: float) -> dict:
        return {"seq": seq, "t_mono": t, "t_wall": 0.0, "kind": kind}

    one = [rec(0, "start", 5.0), rec(1, "note", 65.0)]
    assert time_spent_s(one) == 60.0
    # killed at 65 s, resumed on a fresh clock at 2 s and killed at 32 s, resumed at 1 s, still going at 11 s
    three = one + [rec(2, "resume", 2.0), rec(3, "note", 32.0), rec(4, "resume", 1.0), rec(5, "note", 11.0)]
    assert time_spent_s(three) == 60.0 + 30.0 + 10.0
    assert time_spent_s([]) == 0.0


def test_a_reader_left_early_closes_its_file(tmp_path: Path) -> None:
    """`run --resume` reads only the start record, and a survey stops at a record that is not sound: leaving the
    `with` block closes the journal there and then, not when the reader is garbage-collected."""
    lines = [json.dumps({"seq": i, "t_mono": float(i), "t_wall": 0.0, "kind": "note"}) for i in range(3)]
    (tmp_path / JOURNAL_FILE).write_text("\n".join(lines) + "\n")
    with journal_module.JournalReader(tmp_path) as reader:
        assert next(reader)["seq"] == 0
    assert reader._file.closed and list(reader) == []
    (tmp_path / JOURNAL_FILE).write_text(lines[0] + "\n[1, 2]\n" + lines[2] + "\n")
    with pytest.raises(JournalError, match="line 2 is not a JSON object"), journal_module.JournalReader(tmp_path) as bad:
        list(bad)
    assert bad._file.closed
