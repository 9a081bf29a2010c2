"""Disk and clock faults (issue 17) on a real session against the embedded simulator.

A full disk is an OSError(ENOSPC) injected into the writers (no tmpfs needed): during a frame write the run stops
at a safe point with the tip withdrawn and a reason naming the full disk; during a journal append (half a batch
written, then ENOSPC: a torn line) the process ends with the tip withdrawn, and once space is back the run
resumes and completes with a sound journal. A wall-clock jump (NTP stepping time.time() by hours, both ways)
changes nothing the run decides: the run decides on the simulator's monotonic clock."""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path
from typing import Any

import pytest

import deepspm.controller.journal as journal_module
from deepspm.controller.config import load_config
from deepspm.controller.journal import TEMP_SUFFIX, check_journal, read_journal, scan_journal
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


def test_a_full_disk_during_a_frame_write_stops_safely_with_the_tip_withdrawn(tmp_path: Path, monkeypatch) -> None:
    disk = {"full": False}
    write_atomic = journal_module._write_atomic

    def full_write(path: Path, write: Any, fsync: bool) -> None:
        if disk["full"] and path.parent.name == "frames":
            def half_then_full(f: Any) -> None:  # a temp file partly written, then the disk is full
                f.write(b"\x93NUMPY partial")
                raise disk_full(path)
            return write_atomic(path, half_then_full, fsync)
        return write_atomic(path, write, fsync)

    monkeypatch.setattr(journal_module, "_write_atomic", full_write)
    sims: list[Any] = []
    run_dir = tmp_path / "run"
    result = session(run_dir, sims, fill_disk_at(FULL_AT, disk))
    assert result.status == "fault" and "No space left on device" in result.reason
    assert sims[0].microscope.withdrawn()  # the tip is withdrawn before the run ends
    records = read_journal(run_dir)
    assert check_journal(records, require_stop=True) == []
    ops = [r.get("op") for r in records if r["kind"] == "command"]
    assert ops[-1] == "withdraw"
    assert records[-1]["kind"] == "stop" and "No space left on device" in records[-1]["reason"]
    assert not list((run_dir / "frames").glob(f"*{TEMP_SUFFIX}"))  # the partial temp file is gone
    assert len([r for r in records if r.get("decision") == "classify"]) == FULL_AT


def test_a_full_disk_during_a_journal_append_resumes_when_space_is_back(tmp_path: Path, monkeypatch) -> None:
    disk = {"full": False}
    write_batch = journal_module.Journal._write_batch

    class FullFile:
        """The journal's open file on a full disk: a write gets part of its bytes out (a torn line), then ENOSPC."""

        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            self.f.write(data[: data.index(b"\n") + 7] if data.count(b"\n") > 1 else data[: len(data) // 2])
            self.f.flush()
            raise disk_full(self.f.name)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

    def full_batch(self: Any, batch: list[tuple[int, bytes]]) -> None:
        if disk["full"] and self._file is not None and not isinstance(self._file, FullFile):
            self._file = FullFile(self._file)
        return write_batch(self, batch)

    monkeypatch.setattr(journal_module.Journal, "_write_batch", full_batch)
    sims: list[Any] = []
    run_dir = tmp_path / "run"
    with pytest.raises(BaseException) as raised:  # noqa: B017 (the session's TaskGroup raises a group)
        session(run_dir, sims, fill_disk_at(FULL_AT, disk))
    assert "No space left on device" in repr(raised.value)
    assert sims[0].microscope.withdrawn()
    contents = scan_journal(run_dir)
    assert contents.torn_tail  # a torn last line, as after kill -9
    assert check_journal(contents.records) == []

    disk["full"] = False  # space is back
    result = session(run_dir, sims, resume=True)
    assert result.status == "completed", result.reason
    records = read_journal(run_dir)
    assert check_journal(records, require_stop=True) == []
    judged = [r["frame"] for r in records if r.get("decision") == "classify"]
    assert len(judged) == FRAMES == len(set(judged))
    assert [r["kind"] for r in records].count("resume") == 1


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
