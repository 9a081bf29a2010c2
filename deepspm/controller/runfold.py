"""The one typed fold of a run's journal: what `report`, `status`, `replay` and resume read.

`RunFold.add(record)` turns a record into its typed `Entry` (`documents.entry_from_record`, by the schema
of the journal's start record) and folds it in, in journal order:
- always, in O(1) memory (the live status of a multi-day run): counts, the state, the latest frame, note,
  failure and operator request, the run time;
- with `history=True` (the report's plots): every scanned region, classified frame, action and episode,
  and the moves (`History`);
- with `replay=True` (replay, resume): what the loop re-lives: the records it writes, the instrument calls
  with their outcomes, the net decisions, the operator requests and the recorded stop point (`Relived`).
A record that is not a sound document raises `JournalError` (seq and problem) before anything is counted.

Counting rules (the loop's record layout, see controller/plans.py):
- frames recorded = "frame_recorded" transitions; each is then judged by a classify decision (probe good or
  bad) or a sample decision (bad sample; the frame is discarded); a run stopped in between leaves it
  unjudged. Discarded scans with a z_check decision (contact lost, crashed) are counted apart.
- an episode starts at a classify decision with episode_started and ends at one with episode_ended: with a
  good probe (succeeded) or a bad one (truncated at the action cap); still open when the run stopped.
  Conditioning actions (`ActionChosen`) belong to the episode of the classify decision before them;
  `explored` marks an epsilon-greedy random pick. Reset actions (training) are outside episodes.
- approach areas: area 1 until the first "moved" transition, then one more per "moved".
- recoveries = "recovered" transitions, attributed to the contact_lost / crashed transition before them.
- run time: each process's span on the journal's monotonic clock, summed (`journal.RunTime`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from deepspm.controller.commands import Command, Dip, Pulse, StartScan
from deepspm.controller.documents import (
    ActionChosen,
    Classification,
    Entry,
    Failure,
    LegacyCommand,
    LineJudgement,
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
from deepspm.controller.journal import (
    SCHEMA_VERSION,
    SUSPENDED,
    JournalError,
    JournalReader,
    RunTime,
)

DEFAULT_THRESHOLD = 0.9
DEFAULT_PIEZO_RANGE_M = 850e-9
DEFAULT_FRAME_SIZE_M = 10e-9
DEFAULT_BAD_PROBE_THRESHOLD = 10
MESSAGE_CHARS = 160

T = TypeVar("T")

GOOD, BAD, BAD_SAMPLE, CONTACT_LOST, CRASHED, UNJUDGED = (
    "good probe", "bad probe", "bad sample", "contact lost", "crashed", "not judged")
SUCCEEDED, TRUNCATED, OPEN = "succeeded", "truncated", "open"
SCAN_OPS = ("start_scan", "scan")  # the commands that place a frame (centre_x_m, centre_y_m, size_m); scan: schema 1


def _short(text: Any) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


# -- what is kept -----------------------------------------------------------------------------------------------


@dataclass
class LastFrame:
    number: int  # classified frames so far (0 for a discarded frame before the first one)
    verdict: str  # good probe / bad probe / bad sample / contact lost / crashed
    p_good: float | None
    t_wall: float


@dataclass
class Episode:
    index: int  # the tracker's episode number
    start_frame: int  # number of the classified frame that started it
    end_frame: int | None = None
    outcome: str = OPEN
    agent_actions: int = 0
    random_actions: int = 0
    policy: str = "agent"  # "random" for an interleaved evaluation's uniformly random episode

    @property
    def actions(self) -> int:
        return self.agent_actions + self.random_actions


@dataclass
class ScannedRegion:
    """One scan shown on the map: its centre and side (metres), approach area (1-based) and verdict."""

    seq: int
    area: int
    x_m: float
    y_m: float
    size_m: float
    verdict: str
    radius_m: float = 0.0  # the forbidden circle of a bad-sample verdict


@dataclass
class ClassifiedFrame:
    index: int  # 1-based, in order of classification
    seq: int
    t_wall: float
    ref: str
    p_good: float
    good: bool
    area: int


@dataclass
class TakenAction:
    """A conditioning or reset action where it was done (the report's map)."""

    seq: int
    area: int
    action: int
    x_m: float | None  # None until the pulse/dip command (reset actions) names the site
    y_m: float | None
    explored: bool
    reset: bool
    episode: int | None


@dataclass
class LineCurve:
    """A frame judged line by line while it was scanned: p(good) after each number of lines, the partial frame
    last judged (the aborted frame's data, for an early abort), and why it is kept."""

    seq: int
    frame: str
    judgements: list[tuple[int, float]]
    aborted: bool
    changed_at_line: int | None = None


@dataclass
class History:
    """Everything the report draws (kept only when asked: it grows with the run)."""

    regions: list[ScannedRegion] = field(default_factory=list)
    frames: list[ClassifiedFrame] = field(default_factory=list)
    actions: list[TakenAction] = field(default_factory=list)
    episodes: dict[int, Episode] = field(default_factory=dict)
    move_after_frame: list[int] = field(default_factory=list)  # classified frames before each move
    line_curves: list[LineCurve] = field(default_factory=list)  # early-aborted frames and mid-scan tip changes
    _unjudged: int | None = None  # index in `regions` of a recorded frame not judged yet
    _awaiting_site: int | None = None  # index in `actions` of a reset action whose site is not known yet


@dataclass(frozen=True)
class RecordedCall:
    """An instrument command of the journal and its outcome (a Reply or Failure entry; None if the run
    ended during the command)."""

    seq: int
    command: Command
    outcome: Entry | None

    @property
    def op(self) -> str:
        return self.command.op

    @property
    def args(self) -> dict[str, Any]:
        """Every field of the command as recorded (journal-only fields included)."""
        return {k: v for k, v in self.command.to_record().items() if k != "op"}


class Tape(Generic[T]):
    """Items the loop re-lives, taken front to back. A tape of a whole fold holds them all; a tape of a journal
    re-lived as the loop goes (`relive_journal`) asks `read_more` for the next record when it runs dry (False: the
    journal has ended), so it holds a few at a time. Iterating shows the items held now."""

    def __init__(self, read_more: Callable[[], bool] | None = None) -> None:
        self._items: deque[T] = deque()
        self._read_more = read_more
        self.taken = 0

    def put(self, item: T) -> None:
        self._items.append(item)

    def peek(self) -> T | None:
        """The next item (None: the journal has no more)."""
        while not self._items and self._read_more is not None:
            if not self._read_more():
                self._read_more = None
        return self._items[0] if self._items else None

    def take(self) -> T:
        item = self.peek()
        if item is None:
            raise IndexError("the re-lived journal has no more")
        self._items.popleft()
        self.taken += 1
        return item

    def drain(self) -> Iterator[T]:
        """Take every item held now (without reading more)."""
        while self._items:
            self.taken += 1
            yield self._items.popleft()

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class Relived:
    """What a replay or resume re-lives (kept only when asked): three tapes of entries, in journal order, and the
    operator requests and the stop point. A record reaches the tapes once nothing later can change it: a command
    once its reply or failure is folded (a killed process's last command gets the resumed process's Interrupted
    failure), the records of a withdraw once the next record shows it was not the withdraw of a full disk's
    suspension (which a resumed run does not re-live). At the journal's end everything folded is on the tapes."""

    def __init__(self, read_more: Callable[[], bool] | None = None) -> None:
        self.entries: Tape[Entry] = Tape(read_more)  # every record the loop writes (no start, stop, resume)
        self.calls: Tape[RecordedCall] = Tape(read_more)  # commands that reach the instrument, with their outcomes
        self.decisions: Tape[Entry] = Tape(read_more)  # Classification, ActionChosen, LineJudgement: the nets'
        self.operator: dict[int, OperatorRequestRecord] = {}  # by seq
        self.stop_point: int | None = None  # where the loop decided to stop at a safe point (budget or operator)
        self._entries: deque[Entry] = deque()  # folded, not yet on the tape
        self._calls: deque[RecordedCall] = deque()
        self._open_calls: set[int] = set()  # seqs of commands waiting for their outcome
        self._withdraw_from: int | None = None  # first seq of the withdraw records just before

    def add(self, e: Entry) -> None:
        doc = e.doc
        if isinstance(doc, Stop) and doc.status == SUSPENDED and self._withdraw_from is not None:
            # a full disk suspended the run: its withdraw was no step of a plan, and the resumed run does not re-live it
            cut = self._withdraw_from
            while self._entries and self._entries[-1].seq >= cut:
                self._entries.pop()
            while self._calls and self._calls[-1].seq >= cut:
                self._open_calls.discard(self._calls.pop().seq)
        if isinstance(doc, (Start, Stop, Resume)):
            # (a command the killed process left without an outcome stays open: the resumed process journals its
            # Interrupted failure)
            self._withdraw_from = None
            self.release()
            return
        self._entries.append(e)
        if isinstance(doc, Command) and doc.touches_instrument:
            self._open_calls.add(e.seq)
            self._calls.append(RecordedCall(e.seq, doc, None))
        elif isinstance(doc, (Reply, Failure)) and doc.of in self._open_calls:
            self._open_calls.discard(doc.of)
            index = next(i for i in range(len(self._calls) - 1, -1, -1) if self._calls[i].seq == doc.of)
            self._calls[index] = RecordedCall(doc.of, self._calls[index].command, e)
        elif isinstance(doc, (Classification, ActionChosen, LineJudgement)):
            self.decisions.put(e)
        elif isinstance(doc, OperatorRequestRecord):
            self.operator[e.seq] = doc
        # the stop sequence: [operator requests] [withdraw command + reply] stop transition
        if isinstance(doc, (Command, Reply, Failure)) and doc.op == "withdraw":
            self._withdraw_from = e.seq if self._withdraw_from is None else self._withdraw_from
        elif isinstance(doc, TransitionRecord) and doc.trigger == "stop":
            self.stop_point = self._withdraw_from if self._withdraw_from is not None else e.seq
            self._withdraw_from = None
        else:
            self._withdraw_from = None
        self.release()

    def release(self, *, final: bool = False) -> None:
        """Move what nothing later can change onto the tapes (`final`: the journal has ended: everything)."""
        cut = None if final else self._withdraw_from
        while self._entries and (cut is None or self._entries[0].seq < cut):
            self.entries.put(self._entries.popleft())
        while self._calls and (final or (self._calls[0].seq not in self._open_calls
                                         and (cut is None or self._calls[0].seq < cut))):
            self.calls.put(self._calls.popleft())


# -- the fold ------------------------------------------------------------------------------------------------------


@dataclass
class RunFold:
    """The run as its journal says, so far. `history`, `relived`: see the module docstring."""

    run_id: str = ""
    history: History | None = None
    relived: Relived | None = None
    start: Start | None = None
    schema: int | None = None
    stop: Stop | None = None  # the last stop record, unless a resume followed it
    records: int = 0
    last_seq: int | None = None
    last_kind: str | None = None
    first_wall: float | None = None
    last_wall: float | None = None
    run_time: RunTime = field(default_factory=RunTime)
    # from the start record
    threshold: float = DEFAULT_THRESHOLD
    target_state: str = "good"  # the tip state the run conditions towards ([probe] target_state; absent: good)
    bad_probe_threshold: int = DEFAULT_BAD_PROBE_THRESHOLD
    budget_hours: float | None = None  # the run's time budget (run.hours), if any
    simulated: bool = False  # against the embedded simulator: run time is its clock's
    piezo_range_xy_m: tuple[float, float] = (DEFAULT_PIEZO_RANGE_M, DEFAULT_PIEZO_RANGE_M)
    envelope_fraction: float = 0.95
    # counts
    state: str = "not started"  # the last transition's destination
    frames_recorded: int = 0
    frames_classified: int = 0
    frames_aborted: int = 0  # recorded frames stopped early by a confident bad line-window judgement
    good_frames: int = 0
    bad_samples: int = 0
    discarded_contact_lost: int = 0
    discarded_crashed: int = 0
    episodes_started: int = 0
    episodes_ended: int = 0
    episodes_succeeded: int = 0
    episodes_truncated: int = 0
    ended_episode_actions: int = 0  # summed over ended episodes (for the mean)
    succeeded_episode_actions: int = 0
    agent_actions: int = 0  # conditioning actions (ActionChosen), greedy and random picks
    random_actions: int = 0
    reset_actions: int = 0
    good_images: int = 0  # "good image" labels the episode logic decided (reference 1.1 step 10)
    not_good_images: int = 0
    moves: int = 0
    area: int = 1
    failures: int = 0
    resumes: int = 0
    recoveries: dict[str, int] = field(default_factory=lambda: {"contact": 0, "crash": 0})
    bad_probe_count: int = 0
    in_episode: bool = False
    episode: Episode | None = None  # the latest episode (counts of the open one while in_episode)
    last_frame: LastFrame | None = None
    last_note: tuple[float, str] | None = None
    last_failure: tuple[float, str] | None = None
    last_operator: tuple[float, str] | None = None
    last_scan: Command | LegacyCommand | None = None
    _trouble: str = "contact"
    _episode_open: bool = False  # actions now belong to `episode`
    _lines: list[tuple[int, float]] = field(default_factory=list)  # line judgements of the frame being scanned

    @classmethod
    def new(cls, run_id: str = "", *, history: bool = False, replay: bool = False) -> RunFold:
        return cls(run_id=run_id, history=History() if history else None, relived=Relived() if replay else None)

    # -- derived ------------------------------------------------------------------------------------------------
    @property
    def actions(self) -> int:
        return self.agent_actions + self.random_actions

    @property
    def time_spent_s(self) -> float:
        return self.run_time.spent_s

    @property
    def stopped(self) -> bool:
        return self.stop is not None

    @property
    def episode_actions(self) -> int:
        return self.episode.actions if self.episode is not None else 0

    def mean_actions_per_episode(self) -> float | None:
        return self.ended_episode_actions / self.episodes_ended if self.episodes_ended else None

    def mean_actions_per_successful_episode(self) -> float | None:
        return self.succeeded_episode_actions / self.episodes_succeeded if self.episodes_succeeded else None

    # -- folding ------------------------------------------------------------------------------------------------
    def parse(self, record: dict[str, Any]) -> Entry:
        """The typed entry of the next record (JournalError if it is not sound; nothing is counted)."""
        if self.schema is None:
            if record.get("kind") != "start":
                raise JournalError(f"seq {record.get('seq')!r}: the journal does not begin with a start record")
            schema = record.get("schema")
            if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= SCHEMA_VERSION:
                raise JournalError(f"seq {record.get('seq')!r}: journal schema {schema!r} is not one this version "
                                   f"reads (1..{SCHEMA_VERSION})")
            return entry_from_record(record, schema)
        return entry_from_record(record, self.schema)

    def add(self, record: dict[str, Any]) -> Entry:
        """Parse and fold one record; returns its entry."""
        entry = self.parse(record)
        self.add_entry(entry)
        return entry

    def add_entry(self, e: Entry) -> None:
        doc = e.doc
        self.records += 1
        self.last_seq, self.last_kind = e.seq, e.kind
        self.first_wall = e.t_wall if self.first_wall is None else self.first_wall
        self.last_wall = e.t_wall
        self.run_time.add(e.kind, e.t_mono)
        if isinstance(doc, Start):
            self._start(doc)
        elif isinstance(doc, TransitionRecord):
            self._transition(e, doc)
        elif isinstance(doc, (Command, LegacyCommand)):
            self._command(doc)
        elif isinstance(doc, Failure):
            self.failures += 1
            self.last_failure = (e.t_wall, f"{doc.op} failed: {doc.error}: {_short(doc.message)}")
        elif isinstance(doc, Note):
            self.last_note = (e.t_wall, _short(doc.message))
        elif isinstance(doc, OperatorRequestRecord):
            self.last_operator = (e.t_wall, f"{doc.request} (from {doc.source})"
                                            + (f": {_short(doc.detail)}" if doc.detail else ""))
        elif isinstance(doc, Resume):
            self.resumes += 1
            self.stop = None
        elif isinstance(doc, Stop):
            self.stop = doc
        elif isinstance(doc, Classification):
            self._classify(e, doc)
        elif isinstance(doc, SampleVerdict):
            self.bad_samples += 1
            self.last_frame = LastFrame(self.frames_classified, BAD_SAMPLE, None, e.t_wall)
            if self.history is not None:
                self._judge(self.history, e.seq, BAD_SAMPLE).radius_m = doc.radius_m
        elif isinstance(doc, ZCheck):
            verdict = CRASHED if doc.verdict == "crashed" else CONTACT_LOST
            if verdict == CRASHED:
                self.discarded_crashed += 1
            else:
                self.discarded_contact_lost += 1
            self.last_frame = LastFrame(self.frames_classified, verdict, None, e.t_wall)
            if self.history is not None:
                self.history.regions.append(self._region(e.seq, verdict))
        elif isinstance(doc, LineJudgement):
            self._lines.append((doc.lines, doc.p_good))
            if doc.abort and self.history is not None:
                self.history.line_curves.append(LineCurve(e.seq, doc.frame, list(self._lines), True))
        elif isinstance(doc, ActionChosen):
            self._action(e, doc)
        elif isinstance(doc, ResetActionChosen):
            self.reset_actions += 1
            if self.history is not None:
                self.history.actions.append(TakenAction(e.seq, self.area, doc.action, None, None, True, True, None))
                self.history._awaiting_site = len(self.history.actions) - 1
        if self.relived is not None:
            self.relived.add(e)

    def _start(self, s: Start) -> None:
        self.start, self.schema = s, s.schema
        self.run_id = s.run_id or self.run_id
        config = s.config or {}
        self.threshold = float((config.get("classifier") or {}).get("threshold", DEFAULT_THRESHOLD))
        self.target_state = str((config.get("probe") or {}).get("target_state", "good"))
        self.bad_probe_threshold = int((config.get("episode") or {}).get("bad_probe_threshold",
                                                                         DEFAULT_BAD_PROBE_THRESHOLD))
        hours = (config.get("run") or {}).get("hours")
        self.budget_hours = float(hours) if isinstance(hours, (int, float)) else None
        instrument = s.instrument or {}
        self.simulated = bool(instrument.get("simulated"))
        piezo = instrument.get("piezo_range_m") or (config.get("planner") or {}).get("piezo_range_xy_m")
        if piezo:
            self.piezo_range_xy_m = (float(piezo[0]), float(piezo[1]))
        self.envelope_fraction = float((config.get("safety") or {}).get("piezo_fraction", self.envelope_fraction))

    def _transition(self, e: Entry, t: TransitionRecord) -> None:
        self.state = t.dest
        if t.trigger in ("contact_lost", "crashed"):
            self._trouble = "contact" if t.trigger == "contact_lost" else "crash"
        elif t.trigger == "recovered":
            self.recoveries[self._trouble] += 1
        elif t.trigger in ("frame_recorded", "scan_aborted"):
            self.frames_recorded += 1
            self.frames_aborted += t.trigger == "scan_aborted"
            if self.history is not None:
                self.history._unjudged = len(self.history.regions)
                self.history.regions.append(self._region(e.seq, UNJUDGED))
        elif t.trigger == "moved":
            self.moves += 1
            self.area += 1
            if self.history is not None:
                self.history.move_after_frame.append(self.frames_classified)

    def _command(self, c: Command | LegacyCommand) -> None:
        if c.op in SCAN_OPS:
            self._lines = []
            self.last_scan = c
        elif isinstance(c, (Pulse, Dip)) and self.history is not None and self.history._awaiting_site is not None:
            site = self.history.actions[self.history._awaiting_site]
            site.x_m, site.y_m = c.x_m, c.y_m
            self.history._awaiting_site = None

    def _region(self, seq: int, verdict: str) -> ScannedRegion:
        scan = self.last_scan

        def where(name: str, default: float) -> float:
            value = scan.args.get(name) if isinstance(scan, LegacyCommand) else getattr(scan, name, None)
            return float(value) if isinstance(value, (int, float)) else default

        return ScannedRegion(seq, self.area, where("centre_x_m", 0.0), where("centre_y_m", 0.0),
                             where("size_m", DEFAULT_FRAME_SIZE_M), verdict)

    def _judge(self, h: History, seq: int, verdict: str) -> ScannedRegion:
        """The verdict on the recorded frame waiting for one (or a new region if the journal has no
        frame_recorded transition for it)."""
        if h._unjudged is not None:
            region = h.regions[h._unjudged]
            region.verdict = verdict
            h._unjudged = None
            return region
        region = self._region(seq, verdict)
        h.regions.append(region)
        return region

    def _classify(self, e: Entry, c: Classification) -> None:
        self.frames_classified += 1
        if c.changed_at_line is not None and self.history is not None:
            self.history.line_curves.append(LineCurve(e.seq, c.frame, list(self._lines), False, c.changed_at_line))
        for _, good_image in c.labels:
            self.good_images += bool(good_image)
            self.not_good_images += not good_image
        self.good_frames += c.good
        self.bad_probe_count = c.bad_probe_count
        self.in_episode = c.in_episode
        p_good = c.p_good if math.isfinite(c.p_good) else None
        self.last_frame = LastFrame(self.frames_classified, GOOD if c.good else BAD, p_good, e.t_wall)
        if c.episode_started:
            self.episodes_started += 1
            self.episode = Episode(c.episode, self.frames_classified)
            if self.history is not None:
                self.history.episodes[c.episode] = self.episode
        episode = self.episode if self.episode is not None and self.episode.index == c.episode else None
        if c.episode_ended and episode is not None and episode.outcome == OPEN:
            episode.end_frame = self.frames_classified
            episode.outcome = SUCCEEDED if c.good else TRUNCATED
            self.episodes_ended += 1
            self.ended_episode_actions += episode.actions
            if c.good:
                self.episodes_succeeded += 1
                self.succeeded_episode_actions += episode.actions
            else:
                self.episodes_truncated += 1
        self._episode_open = c.in_episode and episode is not None
        if self.history is not None:
            self._judge(self.history, e.seq, GOOD if c.good else BAD)
            self.history.frames.append(ClassifiedFrame(self.frames_classified, e.seq, e.t_wall, c.frame, c.p_good,
                                                       c.good, self.area))

    def _action(self, e: Entry, a: ActionChosen) -> None:
        if a.explored:
            self.random_actions += 1
        else:
            self.agent_actions += 1
        if self._episode_open and self.episode is not None:
            if a.agent == "random":
                self.episode.policy = "random"
            if a.explored:
                self.episode.random_actions += 1
            else:
                self.episode.agent_actions += 1
        if self.history is not None:
            x, y = (float(a.site_xy_m[0]), float(a.site_xy_m[1])) if len(a.site_xy_m) == 2 else (None, None)
            number = self.episode.index if self._episode_open and self.episode is not None else None
            self.history.actions.append(TakenAction(e.seq, self.area, a.action, x, y, a.explored, False, number))


def fold_records(records: Iterable[dict[str, Any]], run_id: str = "", *, history: bool = False,
                 replay: bool = False) -> RunFold:
    """The fold of a whole journal's records (with `replay`: all of what is re-lived on its tapes)."""
    fold = RunFold.new(run_id, history=history, replay=replay)
    for record in records:
        fold.add(record)
    if fold.relived is not None:
        fold.relived.release(final=True)
    return fold


def relive_journal(run_dir: Path, limit: int | None = None) -> Relived:
    """What a resumed loop re-lives, read from `run_dir`'s journal as the loop goes: a record is read and folded
    when a tape runs dry, so memory holds a few records, not the journal. `limit`: the journal's length in bytes
    when it was surveyed (the records appended since are the resumed run's own)."""
    reader = JournalReader(Path(run_dir), limit)
    fold = RunFold.new(Path(run_dir).name)

    def read_more() -> bool:
        record = next(reader, None)
        if record is None:
            relived.release(final=True)
            return False
        fold.add(record)
        return True

    relived = fold.relived = Relived(read_more)
    return relived


@dataclass
class JournalSurvey:
    """A journal read once, a record at a time, for a resume or a replay: its fold (the tapes emptied as it went; the operator
    requests and the stop point kept), and what the resume needs of the re-lived records."""

    fold: RunFold
    actions: int = 0  # conditioning actions chosen (ActionChosen): the learner's resume point is found by it
    scan_in_flight: StartScan | None = None  # the scan the last process started and had not finished with
    valid_bytes: int = 0  # the journal's length without a torn last line
    first: dict[str, Any] | None = None  # the start record as written (None: the journal has no complete record)
    classifications: list[Classification] | None = None  # every frame's classification, when asked (replay's what-if)

    def _call(self, call: RecordedCall) -> None:
        """Follow the scans: a microscope outlives its controller and is still scanning a frame the killed process
        started (no stop, no complete frame grabbed since)."""
        if isinstance(call.command, StartScan):
            self.scan_in_flight = call.command if call.outcome is not None and isinstance(call.outcome.doc, Reply) else None
        elif call.op == "stop_scan":
            self.scan_in_flight = None
        elif call.op == "grab_frame" and call.outcome is not None and isinstance(call.outcome.doc, Reply):
            result = call.outcome.doc.result
            if isinstance(result, Mapping) and result.get("complete"):
                self.scan_in_flight = None

    @property
    def relived(self) -> Relived:
        """The fold's Relived, its tapes emptied: the operator requests and the stop point a replay control needs."""
        assert self.fold.relived is not None  # survey_journal folds with replay=True
        return self.fold.relived

    def _take(self) -> None:
        relived = self.relived
        for call in relived.calls.drain():
            self._call(call)
        for entry in relived.decisions.drain():
            if isinstance(entry.doc, ActionChosen):
                self.actions += 1
            elif isinstance(entry.doc, Classification) and self.classifications is not None:
                self.classifications.append(entry.doc)
        deque(relived.entries.drain(), maxlen=0)  # the loop's records: not needed to survey


def survey_journal(run_dir: Path, *, classifications: bool = False) -> JournalSurvey:
    """Read `run_dir`'s journal once for a resume or a replay (JournalError for a record that is not sound)."""
    survey = JournalSurvey(RunFold.new(Path(run_dir).name, replay=True), classifications=[] if classifications else None)
    with JournalReader(Path(run_dir)) as reader:
        for record in reader:
            survey.first = survey.first or record
            survey.fold.add(record)
            survey._take()
    survey.relived.release(final=True)
    survey._take()
    survey.valid_bytes = reader.valid_bytes
    return survey


@dataclass(frozen=True)
class JournalFold:
    """A whole journal file, folded: the fold and the bytes of a torn last line (left out)."""

    fold: RunFold
    torn_tail_bytes: int


def read_fold(run_dir: Path, *, history: bool = False, replay: bool = False) -> JournalFold:
    """Fold a run directory's journal, a record at a time (a torn last line is left out and counted)."""
    with JournalReader(Path(run_dir)) as reader:
        fold = fold_records(reader, Path(run_dir).name, history=history, replay=replay)
    return JournalFold(fold, len(reader.torn_tail))
