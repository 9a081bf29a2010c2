"""The run directory and its journal: what a run leaves behind (design.md section 7), the contract that
replay and resume rely on.

    RUN_DIR/journal.jsonl   one JSON object per line: {"seq", "t_mono", "t_wall", "kind", ...data}
    RUN_DIR/frames/         <sha256>.npy side files, referenced from records by that hash
    RUN_DIR/checkpoints/    what a run that learned online saved at its end: agent (net), learner (LearnerState)

Records: "start" (seq 0, once), event kinds ("command", "reply", "failure", "decision", "transition",
"operator", "note"), "resume" (written when a killed or stopped run continues) and "stop" (exit status and
reason, from the loop's `finally`). Each kind is a typed document (controller/documents.py): writers hand
documents to `write()` (`start()`, `close()` and resume build theirs), readers get them back through
`documents.entry_from_record` and the one fold of a journal, `controller/runfold.py`. `event(kind, **data)`
is the low-level writer underneath. Sequence numbers are contiguous from 0; `check_journal` verifies it.

Schema versions (the start record's "schema"): 1, composite instrument commands (approach,
set_z_extension, retract_after_crash, move_area, scan); 2, single-operation commands (start_approach,
approach_running, stop_approach, motor_move, wait, start_scan, wait_scan_end, stop_scan, grab_frame,
set_bias, set_setpoint) and the reset phase's own triggers (reset_continues, reset_over); 3, the line judgement
that stops a scan early is journaled before the stop_scan it causes (a kill during that stop_scan left no record
of why the scan stopped, and the re-live took the next frame's judgement). Report and status read all three;
replay and resume re-live 2 and 3 (`check_schema`), the plans following the journal's order (`RunState.schema`).

Writing never blocks the event loop: `event()` encodes the record and assigns its seq synchronously, then
only appends it to an in-memory queue. `writer()` (a task in the loop's TaskGroup) drains the queue in
batches; each batch is one write + flush in a worker thread (`asyncio.to_thread`), with `os.fsync` if
`fsync=True`. `flush()` returns once every record enqueued before the call is on disk (it works with or
without the writer task). A batch is written in seq order even if batches are taken by several callers:
a worker waits for its turn (`_on_disk_next`).

Durability: a record is durable once `flush()` returned. Call `await journal.flush()` before a command
that changes the instrument (pulse, dip, motor), so a resumed run knows it may have happened. A kill -9
can leave at most the last line torn (no trailing newline); readers drop it and report it, and resume
truncates it.

JSON encoding (`to_jsonable`): numpy scalars -> Python numbers, arrays -> nested lists, non-finite floats
-> the strings "nan", "inf", "-inf" (strict JSON has no such numbers, and null would lose which one it
was; `float(value)` reads them back), Enums -> their value, dataclasses -> dicts of their fields, Paths ->
str, tuples/sets -> lists (sets sorted), mapping keys -> str. Anything else is a TypeError at the call
site of `event()`, not later in the writer.

Frames are content-addressed: ref = sha256 of (dtype, shape, C-order bytes), written to a temp file in
frames/ and renamed with `os.replace`, so frames/<ref>.npy is either complete or absent. Saving a ref
that exists is a no-op. Leftover temp files (a kill mid-write) are ignored by readers and removed when a
journal is opened on the directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from deepspm.controller.runlock import RunDirLock
from deepspm.io.atomic import TEMP_SUFFIX, write_atomic

if TYPE_CHECKING:  # documents.py imports this module
    from deepspm.controller.documents import Start, Written

SCHEMA_VERSION = 3  # of the record layout; start() adds it to the start record as "schema"
RELIVABLE_SCHEMAS = (2, 3)  # what replay and resume re-live (the plans follow the journal's order: RunState.schema)
# What each older schema lacks, for the refusal to replay or resume it.
SCHEMA_HISTORY = {
    1: "before the single-operation instrument commands",
    2: "the line judgement that stops a scan journaled after the stop",
}
JOURNAL_FILE = "journal.jsonl"
FRAMES_DIR = "frames"
CHECKPOINTS_DIR = "checkpoints"

START, STOP, RESUME = "start", "stop", "resume"
# The event kinds the run writes (documents.py); the low-level `event()` accepts any lower-case name.
COMMAND, REPLY, FAILURE, DECISION, TRANSITION, OPERATOR, NOTE = (
    "command", "reply", "failure", "decision", "transition", "operator", "note")
_RESERVED = frozenset({START, STOP, RESUME})
_HEADER_KEYS = ("seq", "t_mono", "t_wall", "kind")
_KIND = re.compile(r"[a-z][a-z0-9_]*\Z")
_REF = re.compile(r"[0-9a-f]{64}\Z")


class JournalError(RuntimeError):
    """The journal cannot be written, read or resumed as asked."""


# The stop status of a run that stopped because its disk was full: `--resume` accepts it (every other stop is final).
SUSPENDED = "suspended"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFull(JournalError):
    """A run directory's file could not be written: no space left (or the disk quota is used up)."""

    def __init__(self, path: Path, error: OSError) -> None:
        self.path = str(path)
        self.errno = error.errno
        self.free_bytes: int | None = None
        try:
            self.free_bytes = shutil.disk_usage(Path(path).parent).free
        except OSError:
            pass
        free = f"{_size(self.free_bytes)} free there" if self.free_bytes is not None else "free space unknown"
        super().__init__(f"disk full: cannot write {path} ({os.strerror(error.errno or errno.ENOSPC)}; {free})")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    x, units = n / 1024, ["KB", "MB", "GB"]
    while x >= 1024 and len(units) > 1:
        x, units = x / 1024, units[1:]
    return f"{x:.1f} {units[0]}"


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def _append_all(fd: int, data: bytes) -> None:
    """Write all of `data` at the end of the file (`os.write` may write part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class TornJournalWarning(UserWarning):
    """The journal's last line was incomplete (the process was killed mid-write); it was left out."""


# -- clocks -----------------------------------------------------------------------------------------------


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (differences only)."""

    def wall(self) -> float:
        """Seconds since the Unix epoch (for people; may jump)."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class RunClock(SystemClock):
    """Monotonic time from the run's clock (the simulator's, when simulating: the clock the loop's waits
    and time budget use), wall time from the system."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic

    def monotonic(self) -> float:
        return self._monotonic()


@dataclass
class ManualClock:
    """A clock that moves only when told (tests, replay): both readings advance together."""

    t_mono: float = 0.0
    t_wall: float = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.t_mono

    def wall(self) -> float:
        return self.t_wall

    def advance(self, dt_s: float) -> None:
        self.t_mono += dt_s
        self.t_wall += dt_s


# -- encoding ---------------------------------------------------------------------------------------------


def _float(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def to_jsonable(obj: Any) -> Any:
    """`obj` as plain JSON types (see the module docstring for the rules)."""
    if isinstance(obj, Enum):  # before str/int: str- and int-Enums are also str and int
        return to_jsonable(obj.value)
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _float(float(obj))
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError("cannot journal an object array")
        return to_jsonable(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"cannot journal a value of type {type(obj).__name__}: {obj!r:.80}")


def _key(k: Any) -> str:
    if isinstance(k, Enum):
        k = k.value
    if isinstance(k, np.generic):
        k = k.item()
    return k if isinstance(k, str) else str(k)


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One journal line (UTF-8, newline-terminated, strict JSON)."""
    text = json.dumps(to_jsonable(record), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


# -- frames -----------------------------------------------------------------------------------------------


def frame_ref(array: np.ndarray) -> str:
    """The content hash naming a frame: sha256 over dtype, shape and the C-order bytes."""
    a = np.ascontiguousarray(array)
    if a.dtype == object:
        raise TypeError("frames must be numeric arrays")
    h = hashlib.sha256()
    h.update(json.dumps({"dtype": a.dtype.str, "shape": list(a.shape)}).encode())
    h.update(b"\n")
    h.update(a.tobytes())
    return h.hexdigest()


def frame_path(run_dir: Path, ref: str) -> Path:
    if not isinstance(ref, str) or not _REF.match(ref):
        raise JournalError(f"not a frame reference: {ref!r}")
    return Path(run_dir) / FRAMES_DIR / f"{ref}.npy"


def load_frame(run_dir: Path, ref: str, *, verify: bool = True) -> np.ndarray:
    """The frame saved under `ref`; with `verify`, its content must still hash to `ref`."""
    path = frame_path(run_dir, ref)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise JournalError(f"frame {ref} not in {path.parent}") from None
    if verify and frame_ref(array) != ref:
        raise JournalError(f"frame {path} does not match its hash (corrupted)")
    return array


def list_frames(run_dir: Path) -> list[str]:
    """Refs of every complete frame in the run directory (temp files are not frames)."""
    folder = Path(run_dir) / FRAMES_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.npy") if _REF.match(p.stem))


def _remove_temp_files(folder: Path) -> list[str]:
    removed = []
    for p in folder.glob(f".*{TEMP_SUFFIX}"):
        try:
            p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed


# -- reading ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalContents:
    """What is in a journal file. torn_tail: bytes after the last newline (b"" if the file ended cleanly);
    valid_bytes: the length of the file without them."""

    records: list[dict[str, Any]]
    torn_tail: bytes
    valid_bytes: int


class JournalReader:
    """The records of journal.jsonl one at a time, in order, read as they are asked for: memory holds one line, not
    the journal (a resumed multi-day run reads 10^5-10^6 records). Only the last line may be incomplete; any other
    bad line is a JournalError naming it. After the last record: `torn_tail` (the bytes after the last newline) and
    `valid_bytes` (the length without them). `limit`: read only the first `limit` bytes (a journal that is being
    appended to is read as it was)."""

    def __init__(self, run_dir: Path, limit: int | None = None) -> None:
        self.path = Path(run_dir) / JOURNAL_FILE
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed after the last record, or by close())
        except FileNotFoundError:
            raise JournalError(f"no journal in {run_dir}") from None
        self._left = limit
        self._line = 0
        self.torn_tail = b""
        self.valid_bytes = 0
        self.done = False

    def __iter__(self) -> JournalReader:
        return self

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also when the caller stops early (a schema error, the start record only)

    def __next__(self) -> dict[str, Any]:
        if self.done:
            raise StopIteration
        if self._left is None:
            line = self._file.readline()
        else:
            line = self._file.readline(self._left) if self._left > 0 else b""
            self._left -= len(line)
        if not line.endswith(b"\n"):  # the end of the file (or of the limit): a torn last line, or nothing
            self.torn_tail = line
            self.close()
            raise StopIteration
        self._line += 1
        self.valid_bytes += len(line)
        return self._parse(line)

    def _parse(self, line: bytes) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.close()
            raise JournalError(f"{self.path}: line {self._line} is not JSON ({e})") from None
        if not isinstance(record, dict):
            self.close()
            raise JournalError(f"{self.path}: line {self._line} is not a JSON object")
        return record

    def close(self) -> None:
        """Stop reading (closing twice is harmless)."""
        self.done = True
        self._file.close()


def scan_journal(run_dir: Path) -> JournalContents:
    """Parse journal.jsonl. Only the last line may be incomplete; any other bad line is a JournalError."""
    with JournalReader(run_dir) as reader:
        records = list(reader)
    return JournalContents(records, reader.torn_tail, reader.valid_bytes)


def read_journal(run_dir: Path) -> list[dict[str, Any]]:
    """The journal's records; a torn last line is left out and reported with a TornJournalWarning."""
    contents = scan_journal(run_dir)
    if contents.torn_tail:
        warnings.warn(
            f"{Path(run_dir) / JOURNAL_FILE}: incomplete last line ({len(contents.torn_tail)} bytes) left out",
            TornJournalWarning,
            stacklevel=2,
        )
    return contents.records


@dataclass
class RunTime:
    """Run time on the journal's monotonic clock: each process's span (a resume record starts a new process
    and a new clock), summed. The time between a process's last record and its death is lost."""

    _spent_before: float = 0.0  # run time of the processes before the last resume
    _process_span: tuple[float, float] | None = None  # (first, last) t_mono of the current process

    @property
    def spent_s(self) -> float:
        span = self._process_span
        return self._spent_before + (span[1] - span[0] if span else 0.0)

    def add(self, kind: Any, t_mono: Any) -> None:
        """Count one record (its header's kind and t_mono)."""
        if not isinstance(t_mono, (int, float)) or isinstance(t_mono, bool):
            return
        if kind == RESUME or self._process_span is None:
            self._spent_before = self.spent_s
            self._process_span = (t_mono, t_mono)
        else:
            self._process_span = (self._process_span[0], t_mono)


def time_spent_s(records: list[dict[str, Any]]) -> float:
    """`RunTime.spent_s` of a whole journal."""
    run_time = RunTime()
    for r in records:
        run_time.add(r.get("kind"), r.get("t_mono"))
    return run_time.spent_s


def check_schema(start: Mapping[str, Any], verb: str) -> None:
    """JournalError unless the journal whose start record is `start` has this version's layout, which replay
    and resume need (`verb`: "replayed", "resumed"); report and status read older journals too."""
    schema = start.get("schema")
    if schema in RELIVABLE_SCHEMAS and not isinstance(schema, bool):
        return
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise JournalError(f"the journal's start record has no valid schema version ({schema!r})")
    version = (start.get("versions") or {}).get("deepspm", "?")
    if schema > SCHEMA_VERSION:
        raise JournalError(f"journal schema {schema} (written by deepspm {version}) is newer than this version "
                           f"(schema {SCHEMA_VERSION}); it cannot be {verb} here")
    raise JournalError(f"journal schema {schema} (written by deepspm {version}, {SCHEMA_HISTORY.get(schema, 'older')}) "
                       f"cannot be {verb} by this version (schema {SCHEMA_VERSION}); deepspm report and status still "
                       f"read it")


class JournalCheck:
    """`check_journal`, one record at a time (`add`), in O(1) memory but for the problems found."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.records = 0
        self.first: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None
        self._expected, self._last_mono, self._previous_kind = 0, -math.inf, None
        self._previous_seq: int | None = None

    def add(self, r: dict[str, Any]) -> None:
        index, problems = self.records, self.problems
        self.records += 1
        if index == 0:
            self.first = r
            if r.get("kind") != START or r.get("seq") != 0:
                problems.append(f"missing start: the first record is {r.get('kind')!r} with seq {r.get('seq')!r}")
        self.last = r
        missing = [k for k in _HEADER_KEYS if k not in r]
        if missing:
            problems.append(f"record {index} lacks {', '.join(missing)}")
        seq, kind = r.get("seq"), r.get("kind")
        if not isinstance(seq, int) or isinstance(seq, bool):
            problems.append(f"record {index}: seq {seq!r} is not an integer")
            return
        if seq == self._previous_seq:
            problems.append(f"duplicate seq {seq} (records {index - 1} and {index})")
        elif seq < self._expected:  # seqs only rise: a lower one repeats an earlier record or is out of order
            problems.append(f"seq {seq} out of order at record {index} (expected {self._expected})")
        elif seq > self._expected:
            problems.append(f"gap: seq {self._expected}..{seq - 1} missing before record {index}")
        self._expected, self._previous_seq = max(self._expected, seq + 1), seq
        if kind == START and index != 0:
            problems.append(f"second start at seq {seq}")
        if self._previous_kind == STOP and kind != RESUME:
            problems.append(f"record after stop at seq {seq} without a resume")
        t_mono = r.get("t_mono")
        if kind == RESUME:
            self._last_mono = -math.inf  # a new process: its monotonic clock has a new origin
        if isinstance(t_mono, (int, float)):
            if t_mono < self._last_mono:
                problems.append(f"t_mono goes backwards at seq {seq}")
            self._last_mono = t_mono
        self._previous_kind = kind

    def finish(self, *, require_stop: bool = False) -> list[str]:
        if not self.records:
            return ["no records (missing start)"]
        if require_stop and (self.last or {}).get("kind") != STOP:
            return [*self.problems, "no stop record at the end"]
        return self.problems


def check_journal(records: Iterable[dict[str, Any]], *, require_stop: bool = False) -> list[str]:
    """Problems of a journal's records (empty = sound): missing or repeated start, seq gaps, duplicates
    or disorder, missing header fields, records after a stop that is not followed by a resume, t_mono
    going backwards within one process's segment; with `require_stop`, a missing final stop."""
    check = JournalCheck()
    for r in records:
        check.add(r)
    return check.finish(require_stop=require_stop)


# -- writing ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeInfo:
    """What `Journal(..., resume=True)` found: the start record, the last record before the resume,
    how many bytes of a torn last line it cut off, and the run time the earlier processes spent."""

    start: dict[str, Any]
    last: dict[str, Any]
    torn_bytes: int
    removed_temp_files: tuple[str, ...]
    time_spent_s: float = 0.0


class Journal:
    """Writes one run directory. Call `start()` once (new runs), then `event()` from the event loop's
    thread (or any thread: it is locked), run `writer()` as a task, and `close()` from a `finally`."""

    replaying = False  # always live (`ReplayJournal` re-lives recorded records)

    def __init__(self, run_dir: Path, clock: Clock, *, resume: bool = False, fsync: bool = False,
                 lock: RunDirLock | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.clock = clock
        self.fsync = fsync
        self.path = self.run_dir / JOURNAL_FILE
        self.frames_dir = self.run_dir / FRAMES_DIR
        self.checkpoints_dir = self.run_dir / CHECKPOINTS_DIR
        for folder in (self.run_dir, self.frames_dir, self.checkpoints_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # One writer per run directory, locked before anything is removed, truncated or appended. A caller
        # that must hold the lock for longer (the session, from before it reads the journal) passes it in.
        if lock is None:
            lock = RunDirLock(self.run_dir)
            lock.acquire()
        elif not lock.held:
            raise ValueError("the run directory lock passed to Journal must be held")
        self._run_lock = lock
        try:
            self._open(resume)
        except BaseException:
            self._run_lock.release()
            raise

    def _open(self, resume: bool) -> None:
        removed = tuple(_remove_temp_files(self.frames_dir) + _remove_temp_files(self.checkpoints_dir))

        self._lock = threading.Lock()  # seq assignment + queue
        self._pending: list[tuple[int, bytes]] = []
        self._next_seq = 0
        self._started = False
        self._closing = False
        self._disk = threading.Condition()  # guards _on_disk_next, _file, _good_bytes, _failure
        self._on_disk_next = 0  # every seq below this is written and flushed
        self._file: int | None = None  # the journal's file descriptor (O_APPEND), opened by the first batch
        self._good_bytes = 0  # the file's length after the last complete batch
        self._failure: BaseException | None = None
        # The first full disk this journal met (a frame or a journal append): sticky, so the loop stops at its next
        # safe point even if a later write got through.
        self.disk_problem: DiskFull | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.resume_info: ResumeInfo | None = None

        exists = self.path.exists() and self.path.stat().st_size > 0
        if not resume:
            if exists:
                raise JournalError(f"{self.path} already exists; resume the run or choose another directory")
            self.path.touch()  # the directory is recognisably a run directory from the start
            return
        if not self.path.exists():
            raise JournalError(f"nothing to resume: no journal in {self.run_dir}")
        # One pass over the journal, a record at a time (a multi-day journal is hundreds of MB of records).
        check, run_time = JournalCheck(), RunTime()
        with JournalReader(self.run_dir) as reader:
            for record in reader:
                check.add(record)
                run_time.add(record.get("kind"), record.get("t_mono"))
        first, last = check.first, check.last
        if first is None or last is None:  # killed before the start record was complete: begin afresh
            os.truncate(self.path, 0)
            return
        problems = check.finish()
        if problems:
            raise JournalError(f"cannot resume {self.path}: " + "; ".join(problems[:5]))
        check_schema(first, "resumed")
        torn = len(reader.torn_tail)
        if torn:
            os.truncate(self.path, reader.valid_bytes)
        self._next_seq = self._on_disk_next = last["seq"] + 1
        self._started = True
        spent = run_time.spent_s
        self.resume_info = ResumeInfo(first, last, torn, removed, spent)
        from deepspm.controller.documents import Resume  # documents.py builds on this module

        self._enqueue(RESUME, Resume(previous_seq=last["seq"], previous_kind=last["kind"], torn_bytes=torn,
                                     removed_temp_files=list(removed), time_spent_s=spent).to_record())

    # -- records ------------------------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def closed(self) -> bool:
        return self._closing

    def start(self, record: Mapping[str, Any] | Start) -> int:
        """Write the start record (seq 0): a `documents.Start`, or its fields. design.md section 7 asks for the
        run id, the resolved config (`config_to_dict`), the root seed, package versions, the FSM table and its
        hash and the checkpoint ids. "schema" (SCHEMA_VERSION) is added unless given."""
        from deepspm.controller.documents import Start

        if self._started:
            raise JournalError("the journal already has a start record")
        if isinstance(record, Start):
            start = record
        else:
            self._check_data(record)
            try:
                start = Start.from_record({"schema": SCHEMA_VERSION, **record})
            except ValueError as e:
                raise ValueError(f"start record: {e}") from None
        self._started = True
        return self._enqueue(START, start.to_record())

    def write(self, doc: Written) -> int:
        """Enqueue a typed document (a decision, note, transition, operator request, command, reply or
        failure) as its record; returns its seq. Start, stop and resume are written by `start()`, `close()`
        and `Journal(resume=True)`."""
        from deepspm.controller.documents import record_kind

        return self.event(record_kind(doc), **doc.to_record())

    def event(self, kind: str, **data: Any) -> int:
        """Enqueue a record and return its seq (the low-level writer under `write`). Never blocks; encoding
        errors raise here."""
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ValueError(f"event kind must be a lower-case name, got {kind!r}")
        if kind in _RESERVED:
            raise ValueError(f"{kind!r} records are written by start()/close()/resume, not event()")
        if not self._started:
            raise JournalError("event() before start()")
        self._check_data(data)
        return self._enqueue(kind, data)

    @staticmethod
    def _check_data(data: Mapping[str, Any]) -> None:
        clash = [k for k in _HEADER_KEYS if k in data]
        if clash:
            raise ValueError(f"record fields {clash} are set by the journal")

    def _enqueue(self, kind: str, data: Mapping[str, Any], *, last: bool = False) -> int:
        """Assign the next seq and queue the encoded line; `last` closes the journal in the same step,
        so nothing can slip in after the stop record."""
        with self._lock:
            if self._closing:
                raise JournalError(f"journal closed; cannot record {kind!r}")
            seq = self._next_seq
            line = encode_record({"seq": seq, "t_mono": self.clock.monotonic(), "t_wall": self.clock.wall(),
                                  "kind": kind, **data})
            self._pending.append((seq, line))
            self._next_seq = seq + 1
            self._closing = last
        self._notify()
        return seq

    def _notify(self) -> None:
        wake, loop = self._wake, self._loop
        if wake is None or loop is None:
            return
        try:
            if asyncio.get_running_loop() is loop:
                wake.set()
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(wake.set)

    # -- the disk side (worker threads) --------------------------------------------------------------------
    def _take(self) -> list[tuple[int, bytes]]:
        with self._lock:
            batch, self._pending = self._pending, []
        return batch

    def _write_batch(self, batch: list[tuple[int, bytes]]) -> None:
        """Append a batch in seq order (waiting for earlier batches taken by other callers), then flush.

        On a full disk the file is cut back to its last complete batch (no torn or half line is left behind for
        a later append to follow), the batch goes back to the queue, and `DiskFull` is raised (and kept: the
        next write raises it too, until `close()` tries once more)."""
        first, last = batch[0][0], batch[-1][0]
        with self._disk:
            self._disk.wait_for(lambda: self._on_disk_next == first or self._failure is not None)
            if self._failure is not None:
                if isinstance(self._failure, DiskFull):
                    self._requeue(batch)
                    raise self._failure
                raise JournalError("journal writing failed earlier") from self._failure
            try:
                if self._file is None:  # held open across batches, closed by close()
                    self._file = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    self._good_bytes = os.fstat(self._file).st_size
                _append_all(self._file, b"".join(line for _, line in batch))
                if self.fsync:
                    os.fsync(self._file)
            except BaseException as e:
                self._failure = self._disk_full(e)
                self._disk.notify_all()
                if isinstance(self._failure, DiskFull):
                    self._requeue(batch)
                    raise self._failure from e
                raise
            self._good_bytes += sum(len(line) for _, line in batch)
            self._on_disk_next = last + 1
            self._disk.notify_all()

    def _disk_full(self, error: BaseException) -> BaseException:
        """What a failed append leaves: `DiskFull` (retryable) if the disk was full and the file could be cut back
        to its last complete batch; otherwise the error itself (the journal is broken)."""
        if not isinstance(error, OSError) or not is_disk_full(error) or self._file is None:
            return error
        try:
            os.ftruncate(self._file, self._good_bytes)
        except OSError:
            return error
        full = DiskFull(self.path, error)
        self.disk_problem = self.disk_problem or full
        return full

    def _requeue(self, batch: list[tuple[int, bytes]]) -> None:
        with self._lock:
            self._pending = sorted(batch + self._pending, key=lambda item: item[0])
        self._notify()  # the writer task ends on a full disk, whoever's write met it (it may be `flush`'s)

    def _wait_on_disk(self, target: int) -> None:
        with self._disk:
            self._disk.wait_for(lambda: self._on_disk_next > target or self._failure is not None)
            if isinstance(self._failure, DiskFull):
                raise self._failure
            if self._failure is not None:
                raise JournalError("journal writing failed") from self._failure

    def _close_file(self) -> None:
        with self._disk:
            if self._file is not None:
                os.close(self._file)
                self._file = None

    # -- the event-loop side -------------------------------------------------------------------------------
    async def writer(self) -> None:
        """Drain the queue until `close()`; a long-running task of the run loop's TaskGroup."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._wake.set()  # records enqueued before the writer started
        while True:
            await self._wake.wait()
            self._wake.clear()
            if isinstance(self._failure, DiskFull):  # met by another caller's write (flush): stop as below
                return
            batch = self._take()
            if batch:
                try:
                    await asyncio.to_thread(self._write_batch, batch)
                except DiskFull:  # the loop sees `disk_problem` at its next safe point; close() tries once more
                    return
            if self._closing and not self._pending:
                return

    async def flush(self) -> None:
        """Return once every record enqueued before this call is written (and fsynced if asked)."""
        target = self._next_seq - 1
        while self._on_disk_next <= target:
            if isinstance(self._failure, DiskFull):
                raise self._failure
            if self._failure is not None:
                raise JournalError("journal writing failed") from self._failure
            batch = self._take()
            if batch:
                await asyncio.to_thread(self._write_batch, batch)
            else:  # the records are in a batch another task is writing
                await asyncio.to_thread(self._wait_on_disk, target)

    async def close(self, status: str, reason: str = "", **data: Any) -> int | None:
        """Write the stop record, drain, stop the writer and close the file. Idempotent: a second call
        returns None. If the journal was never started, nothing is written. After a full disk the records
        still queued are tried once more; if the disk is still full, `DiskFull` is raised and the file ends at
        its last complete batch (without a stop record: the run resumes as after a kill)."""
        if self._closing:
            return None
        seq = None
        if self._started:
            from deepspm.controller.documents import Stop

            self._check_data(data)
            stop = Stop.from_record({"status": status, "reason": reason, **data})  # ValueError for a wrong field
            seq = self._enqueue(STOP, stop.to_record(), last=True)
        else:
            with self._lock:
                self._closing = True
            self._notify()
        with self._disk:
            if isinstance(self._failure, DiskFull):
                self._failure = None  # space may be back
        try:
            await self.flush()
        finally:
            await asyncio.to_thread(self._close_file)
            self._run_lock.release()
        return seq

    # -- side files ----------------------------------------------------------------------------------------
    async def save_frame(self, array: np.ndarray) -> str:
        """Store `array` as frames/<ref>.npy (atomically, in a worker thread) and return its ref; saving
        the same content again is a no-op. The array is copied first, so the caller may reuse it."""
        snapshot = np.array(array, copy=True, order="C")
        if snapshot.dtype == object:
            raise TypeError("frames must be numeric arrays")
        return await asyncio.to_thread(self._save_frame_sync, snapshot)

    def _save_frame_sync(self, array: np.ndarray) -> str:
        ref = frame_ref(array)
        path = frame_path(self.run_dir, ref)
        if not path.exists():
            try:
                write_atomic(path, lambda f: np.save(f, array, allow_pickle=False), fsync=self.fsync)
            except OSError as e:
                if not is_disk_full(e):
                    raise
                self.disk_problem = self.disk_problem or DiskFull(path, e)
                raise DiskFull(path, e) from e
        return ref

