"""Disk and clock faults (issue 17) on a real session against the embedded simulator (over TCP).

A full disk is an OSError(ENOSPC) injected into the writers (no tmpfs needed). During a frame write, or a journal
append (half a batch on disk, then ENOSPC), the run suspends: the tip is withdrawn, the reason is one line naming the
full disk, the file and the free space, the status is `suspended` (no ExceptionGroup, no `fault`), and `--resume`
accepts it: still full, the resumed process suspends again at once; once space is back the run completes with a
sound journal, no frame judged twice, and a replay of the whole journal is identical. A wall-clock jump (NTP stepping
time.time() by hours, both ways) changes nothing the run decides: the run decides on the simulator's monotonic
clock."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

import deepspm.controller.journal as journal_module
from deepspm.controller import validate
from deepspm.controller.config import load_config
from deepspm.controller.journal import TEMP_SUFFIX, check_journal, read_journal, scan_journal
from deepspm.controller.replay_run import replay_run
from deepspm.controller.session import SimulatorOptions, run_session

pytestmark = pytest.mark.timeout(300)

FRAMES = 8
FULL_AT = 3  # the disk fills once this many frames are judged


def disk_full(path: Any = None) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", *([str(path)] if path else []))


def session(run_dir: Path, sims: list[Any], progress: Any = None, resume: bool = False, **extra: Any) -> Any:
    cfg = load_config(None, {"run.frames": FRAMES, **extra})
    return asyncio.run(run_session(cfg, run_dir, simulator=SimulatorOptions(seed=5), progress=progress,
                                   on_simulator=sims.append, resume=resume))


def fill_disk_at(frames: int, disk: dict[str, bool]) -> Any:
    def progress(loop: Any) -> None:
        if loop.counters.frames >= frames:
            disk["full"] = True
    return progress


def assert_suspended(result: Any, sim: Any, run_dir: Path, names: str) -> None:
    assert result.status == "suspended", result.reason
    assert "\n" not in result.reason
    assert result.reason.startswith(f"disk full: cannot write {run_dir}"), result.reason
    assert names in result.reason and "No space left on device" in result.reason and " free there" in result.reason
    assert "tip withdrawn" in result.reason and f"deepspm run --resume {run_dir}" in result.reason
    assert sim.microscope.withdrawn()  # the tip is withdrawn before the process ends
    assert validate.resumable_run(str(run_dir)) == run_dir  # the command line's check accepts it


def assert_completed_and_replays(run_dir: Path, resumes: int) -> None:
    records = read_journal(run_dir)
    assert check_journal(records, require_stop=True) == []
    assert records[-1]["status"] == "completed"
    judged = [r["frame"] for r in records if r.get("decision") == "classify"]
    assert len(judged) == FRAMES == len(set(judged))
    assert [r["kind"] for r in records].count("resume") == resumes
    report = asyncio.run(replay_run(run_dir))
    assert report.identical, report.text()


def test_a_full_disk_during_a_frame_write_suspends_safely_and_resumes(tmp_path: Path, monkeypatch) -> None:
    disk = {"full": False}
    write_atomic = journal_module.write_atomic

    def full_write(path: Path, write: Any, *, fsync: bool) -> Path:
        if disk["full"] and path.parent.name == "frames":
            def half_then_full(f: Any) -> None:  # a temp file partly written, then the disk is full
                f.write(b"\x93NUMPY partial")
                raise disk_full(path)
            return write_atomic(path, half_then_full, fsync=fsync)
        return write_atomic(path, write, fsync=fsync)

    monkeypatch.setattr(journal_module, "write_atomic", full_write)
    sims: list[Any] = []
    run_dir = tmp_path / "run"
    result = session(run_dir, sims, fill_disk_at(FULL_AT, disk))
    assert_suspended(result, sims[0], run_dir, "/frames/")
    records = read_journal(run_dir)
    assert check_journal(records, require_stop=True) == []
    assert [r.get("op") for r in records if r["kind"] == "command"][-2:] == ["grab_frame", "withdraw"]
    assert records[-1]["kind"] == "stop" and records[-1]["status"] == "suspended"
    assert not list((run_dir / "frames").glob(f"*{TEMP_SUFFIX}"))  # the partial temp file is gone
    assert len([r for r in records if r.get("decision") == "classify"]) == FULL_AT

    disk["full"] = False  # space is back
    result = session(run_dir, sims, resume=True)
    assert result.status == "completed", result.reason
    assert_completed_and_replays(run_dir, resumes=1)


def test_a_full_disk_during_a_journal_append_suspends_and_resumes_once_space_is_back(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    disk = {"full": False}
    append = journal_module._append_all

    def append_on_a_full_disk(fd: int, data: bytes) -> None:
        """The journal on a full disk: part of a batch gets out (a torn line), then ENOSPC."""
        if disk["full"]:
            os.write(fd, data[: data.index(b"\n") + 7] if data.count(b"\n") > 1 else data[: len(data) // 2])
            raise disk_full()
        append(fd, data)

    monkeypatch.setattr(journal_module, "_append_all", append_on_a_full_disk)
    sims: list[Any] = []
    run_dir = tmp_path / "run"
    result = session(run_dir, sims, fill_disk_at(FULL_AT, disk))  # returns: no ExceptionGroup
    assert_suspended(result, sims[0], run_dir, "journal.jsonl")
    assert "the journal ends at its last complete record" in result.reason
    contents = scan_journal(run_dir)
    assert not contents.torn_tail  # the torn batch was cut off
    assert check_journal(contents.records) == [] and contents.records[-1]["kind"] != "stop"

    result = session(run_dir, sims, resume=True)  # the disk is still full: suspended again at once
    assert_suspended(result, sims[1], run_dir, "journal.jsonl")
    assert scan_journal(run_dir).records == contents.records

    disk["full"] = False  # space is back
    result = session(run_dir, sims, resume=True)
    assert result.status == "completed", result.reason
    assert_completed_and_replays(run_dir, resumes=1)


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Everything the run decided and did: the records after the start record, without the wall-clock time."""
    return [{k: v for k, v in r.items() if k != "t_wall"} for r in records[1:]]


def test_a_wall_clock_jump_changes_nothing_the_run_decides(tmp_path: Path, monkeypatch) -> None:
    steady = tmp_path / "steady" / "run"
    session(steady, [])
    calls = {"n": 0}
    real_time = time.time

    def ntp(_real: Any = real_time) -> float:  # steps an hour forward, then two back, then a day forward
        calls["n"] += 1
        jump = 3600.0 if calls["n"] % 90 < 30 else -7200.0 if calls["n"] % 90 < 60 else 86400.0
        return _real() + jump

    monkeypatch.setattr(time, "time", ntp)
    jumped = tmp_path / "jumped" / "run"
    session(jumped, [])
    monkeypatch.undo()
    a, b = read_journal(steady), read_journal(jumped)
    assert calls["n"] > 60  # the jumps happened (the journal's wall times read time.time())
    walls = [r["t_wall"] for r in b]
    assert any(y < x for x, y in zip(walls, walls[1:]))  # the wall clock went backwards in the journal
    assert comparable(a) == comparable(b)
    assert check_journal(b, require_stop=True) == []
