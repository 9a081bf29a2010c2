"""Replay and resume: the unchanged run loop driven from a journal.

Three stand-ins let the loop re-live a recorded run without knowing it:
- `ReplayInstrument` answers each instrument call from the journal (replies, timeouts, disconnects, error
  replies alike) and checks that the same operation is asked for with the same arguments;
- `ReplayJournal` checks each record the loop writes against the recorded one at the same seq;
- `ReplayBrain` gives the recorded net outputs (or recomputes them with a checkpoint and compares).
`ReplayControl` delivers recorded operator requests (and the stop at the recorded point) at the same seq.

Each has an optional *live* counterpart: once the journal is used up it hands over to the real
instrument, journal and nets. That is resume: the loop fast-forwards through the journal, rebuilding its
planner maps, counters, episode and replay buffer exactly, then carries on live with no gap and no
duplicate. A command the journal has no outcome for (the run was killed during it) fails with
`Interrupted` (a `ConnectionLost`: outcome unknown), so a pulse or dip that may have happened is never repeated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepspm.controller.brain import ActionDecision, Brain
from deepspm.controller.documents import (
    ActionChosen,
    Classification,
    Entry,
    Failure,
    LineJudgement,
    OperatorRequestRecord,
    Reply,
    Written,
    record_kind,
    record_of,
)
from deepspm.controller.executor import digest, result_from_record
from deepspm.controller.journal import Journal, frame_ref
from deepspm.controller.runcontrol import OperatorRequest, RequestKind, RequestSource, RunControl
from deepspm.controller.runfold import RecordedCall, Relived, Tape, fold_records
from deepspm.io import errors as io_errors
from deepspm.io import instrument as io_instrument
from deepspm.io.errors import Interrupted
from deepspm.io.instrument import OPERATIONS, Instrument
from deepspm.nets.dqn import select_action

# Which fields of a record must match for the replay to count as identical (values compared loosely for floats).
_KEY_FIELDS: dict[str, tuple[str, ...] | None] = {
    "command": None,  # every field
    "reply": ("of", "op", "digest"),
    "failure": ("of", "op", "error", "digest"),
    "transition": ("trigger", "source", "dest"),
    "decision": ("decision", "frame", "trigger", "verdict", "action"),
    "operator": ("request",),
    "note": None,
}


class Divergence(BaseException):
    """The replayed controller did something the journal does not have. A BaseException, like
    CancelledError: it must pass straight through the loop's own error handling and end the replay."""

    def __init__(self, seq: int | None, expected: Any, got: Any) -> None:
        super().__init__(f"diverged at seq {seq}: the journal has {expected!r}, the controller produced {got!r}")
        self.seq = seq
        self.expected = expected
        self.got = got


def same(a: Any, b: Any) -> bool:
    """Equality with float tolerance, through lists and dicts (JSON round trips keep floats exact)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-21)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def _plain(value: Any) -> Any:
    """What a value looks like after a JSON round trip (tuples -> lists, numpy -> Python, enums -> values)."""
    from deepspm.controller.journal import to_jsonable

    return to_jsonable(value)


# -- errors as they were recorded -------------------------------------------------------------------------------

_ERROR_TYPES: dict[str, type[Exception]] = {
    name: obj
    for module in (io_errors, io_instrument)
    for name, obj in vars(module).items()
    if isinstance(obj, type) and issubclass(obj, Exception)
}


def rebuild_error(name: str, message: str, attributes: dict[str, Any] | None = None) -> Exception:
    """An exception of the recorded type with the recorded message and attributes (its `command`, `code`,
    `timeout_s`, ...: what code catching it may read)."""
    cls = _ERROR_TYPES.get(name, io_errors.InstrumentError)
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    for key, value in (attributes or {}).items():
        setattr(err, key, value)
    return err


# -- the instrument ---------------------------------------------------------------------------------------------


def recorded_calls(records: list[dict[str, Any]]) -> list[RecordedCall]:
    """The journal's instrument calls in order, with their outcomes (settle, wait and stall never reach the
    instrument): the fold's selection (`runfold.Relived.calls`)."""
    relived = fold_records(records, replay=True).relived
    return list(relived.calls) if relived is not None else []


class ReplayInstrument:
    """The `Instrument` protocol answered from recorded calls, then (optionally) by a live instrument."""

    def __init__(self, calls: Tape[RecordedCall], load_frame: Callable[[str], np.ndarray],
                 live: Instrument | None = None) -> None:
        self._calls = calls
        self._load_frame = load_frame
        self.live = live

    @property
    def exhausted(self) -> bool:
        return self._calls.peek() is None

    async def _call(self, op: str, **args: Any) -> Any:
        call = self._calls.peek()
        if call is None:
            if self.live is None:
                raise Divergence(None, "the end of the journal", {"op": op, **args})
            return await getattr(self.live, op)(**args)
        # the record also holds journal-only fields (a scan's purpose, an action's index): compare what is passed
        if call.op != op or not set(args) <= set(call.args) or not all(same(call.args[k], _plain(v)) for k, v in args.items()):
            raise Divergence(call.seq, {"op": call.op, **call.args}, {"op": op, **args})
        self._calls.take()
        outcome = call.outcome
        if outcome is None:
            if self.live is None:
                raise Divergence(call.seq, "a recorded outcome", "the journal ends inside this command")
            raise Interrupted(op)
        _check_digest(outcome)
        if isinstance(outcome.doc, Failure):
            raise rebuild_error(outcome.doc.error, outcome.doc.message, outcome.doc.attributes)
        if not isinstance(outcome.doc, Reply):  # the fold pairs commands with replies and failures only
            raise Divergence(outcome.seq, "a reply or failure", outcome.doc)
        return result_from_record(outcome.doc.result, self._load_frame)

    async def connect(self) -> None:
        if self.live is not None:
            await self.live.connect()

    async def close(self) -> None:
        if self.live is not None:
            await self.live.close()

    def __getattr__(self, op: str) -> Callable[..., Any]:
        """Every operation of `OPERATIONS`, answered by `_call` (arguments are passed by keyword)."""
        if op not in OPERATIONS:
            raise AttributeError(op)

        async def call(**args: Any) -> Any:
            return await self._call(op, **args)

        return call


def _check_digest(outcome: Entry) -> None:
    doc = outcome.doc
    if isinstance(doc, Reply):
        kind, body = "reply", doc.result
    elif isinstance(doc, Failure):
        kind, body = "failure", [doc.error, doc.message]
    else:
        return
    if digest(body) != doc.digest:
        raise Divergence(outcome.seq, f"a {kind} with digest {doc.digest}",
                         f"content that hashes to {digest(body)} (the record was altered after the run)")


# -- the journal ------------------------------------------------------------------------------------------------


class ReplayJournal:
    """Checks each record the loop writes against the recorded one; past the end, writes to `live`
    (resume) or keeps the new documents (replay). Frames already recorded are not written again.
    `entries`: the records the loop writes, as the fold selected them (`runfold.Relived.entries`)."""

    def __init__(self, run_dir: Path, entries: Tape[Entry], live: Journal | None = None) -> None:
        self.run_dir = Path(run_dir)
        self._recorded = entries
        self.live = live
        self.extra: list[Written] = []  # documents produced after the journal ended (replay only)
        self.closed = False

    @property
    def replaying(self) -> bool:
        return self._recorded.peek() is not None

    @property
    def next_seq(self) -> int:
        """The seq the next record will get (for scheduling recorded operator requests)."""
        rec = self._recorded.peek()
        if rec is not None:
            return rec.seq
        return self.live.next_seq if self.live is not None else -1

    def write(self, doc: Written) -> int:
        rec = self._recorded.peek()
        if rec is None:
            if self.live is not None:
                return self.live.write(doc)
            self.extra.append(doc)
            return -len(self.extra)
        kind = record_kind(doc)
        expected, got = {"kind": rec.kind, **record_of(rec.doc)}, {"kind": kind, **record_of(doc)}
        keys = _KEY_FIELDS.get(kind, ())
        fields_ = [k for k in expected if k != "kind"] if keys is None else [k for k in keys if k in expected]
        if rec.kind != kind or not all(same(expected.get(k), got.get(k)) for k in fields_):
            raise Divergence(rec.seq, {k: expected.get(k) for k in ("kind", *fields_)},
                             {k: got.get(k) for k in ("kind", *fields_)})
        self._recorded.take()
        return rec.seq

    async def flush(self) -> None:
        if self.live is not None and not self.replaying:
            await self.live.flush()

    async def save_frame(self, array: np.ndarray) -> str:
        ref = frame_ref(array)
        if (self.run_dir / "frames" / f"{ref}.npy").exists() or self.live is None:
            return ref
        return await self.live.save_frame(array)


# -- the nets -----------------------------------------------------------------------------------------------------


@dataclass
class DecisionPoint:
    seq: int
    frame: str | None
    kind: str  # "classify" or "action"
    recorded: Any
    new: Any


@dataclass
class ReplayBrain:
    """Recorded decisions in order. Modes: "recorded" (inject the journal's outputs), "recompute" (run `nets`
    and require the same decisions, within `tolerance` on p(good)), "whatif" (run `nets` and stop at the first
    decision that differs). Past the journal's decisions it hands over to `live` (resume)."""

    decisions: Tape[Entry]  # Classification, ActionChosen and LineJudgement entries (`runfold.Relived.decisions`)
    threshold: float
    mode: str = "recorded"
    nets: Brain | None = None
    live: Brain | None = None
    tolerance: float = 1e-4
    classifier_version: str = "journal"
    points: list[DecisionPoint] = field(default_factory=list)
    max_p_difference: float = 0.0

    def _next(self, kind: type[Classification] | type[ActionChosen] | type[LineJudgement]) -> Entry | None:
        # decisions no net answered: an interleaved evaluation's random choices, and the verdict on a frame stopped
        # early (the line-window judgement that stopped it was the answer)
        while (entry := self.decisions.peek()) is not None:
            doc = entry.doc
            if not ((isinstance(doc, ActionChosen) and doc.agent == "random")
                    or (isinstance(doc, Classification) and doc.lines is not None)):
                break
            self.decisions.take()
        if entry is None:
            return None
        self.decisions.take()
        if not isinstance(entry.doc, kind):
            raise Divergence(entry.seq, f"a {record_of(entry.doc).get('decision')} decision", f"a {kind.name} decision")
        return entry

    def _nets(self) -> Brain:
        if self.nets is None:
            raise ValueError(f"a {self.mode} replay needs nets to recompute with")
        return self.nets

    async def classify(self, image: np.ndarray) -> float:
        entry = self._next(Classification)
        if entry is None:
            if self.live is None:
                raise Divergence(None, "the end of the recorded decisions", "a classification")
            return await self.live.classify(image)
        rec = entry.doc
        if not isinstance(rec, Classification):  # _next checked it
            raise TypeError(rec)
        if self.mode == "recorded":
            return rec.p_good
        p = await self._nets().classify(image)
        self.max_p_difference = max(self.max_p_difference, abs(p - rec.p_good))
        good = p > self.threshold
        self.points.append(DecisionPoint(entry.seq, rec.frame, "classify", rec.good, good))
        if good != rec.good or (self.mode == "recompute" and abs(p - rec.p_good) > self.tolerance):
            raise Divergence(entry.seq, {"p_good": rec.p_good, "good": rec.good}, {"p_good": p, "good": good})
        return p

    async def classify_lines(self, image: np.ndarray) -> float:
        entry = self._next(LineJudgement)
        if entry is None:
            if self.live is None:
                raise Divergence(None, "the end of the recorded decisions", "a line-window judgement")
            return await self.live.classify_lines(image)
        rec = entry.doc
        if not isinstance(rec, LineJudgement):  # _next checked it
            raise TypeError(rec)
        if self.mode == "recorded":
            return rec.p_good
        p = await self._nets().classify_lines(image)
        self.max_p_difference = max(self.max_p_difference, abs(p - rec.p_good))
        if self.mode == "recompute" and abs(p - rec.p_good) > self.tolerance:
            raise Divergence(entry.seq, {"lines p_good": rec.p_good}, {"lines p_good": p})
        return p

    async def choose(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> ActionDecision:
        entry = self._next(ActionChosen)
        if entry is None:
            if self.live is None:
                raise Divergence(None, "the end of the recorded decisions", "an action")
            return await self.live.choose(image, mask, rng)
        rec = entry.doc
        if not isinstance(rec, ActionChosen):  # _next checked it
            raise TypeError(rec)
        if self.mode == "recorded":
            # The same draw on the same generator: the loop's random stream advances as it did.
            choice = select_action(rec.q_values, mask, rec.epsilon, rng)
            if choice.action != rec.action:
                raise Divergence(entry.seq, {"action": rec.action}, {"action": choice.action})
            return ActionDecision(choice.action, list(rec.q_values), rec.epsilon, choice.explored, rec.agent)
        decision = await self._nets().choose(image, mask, rng)
        self.points.append(DecisionPoint(entry.seq, rec.frame, "action", rec.action, decision.action))
        if decision.action != rec.action:
            raise Divergence(entry.seq, {"action": rec.action}, {"action": decision.action})
        return decision

    def _learners(self) -> list[Brain]:
        """Who learns from the re-lived experiences: the recomputing nets (their weights must follow the run's,
        update for update) and, on resume, the live nets (rebuilt exactly: memory and weights)."""
        return [b for b in (self.nets if self.mode == "recompute" else None, self.live) if b is not None]

    def store(self, state: np.ndarray, action: int, reward: float, next_state: np.ndarray, terminal: bool,
              next_mask: np.ndarray) -> None:
        for brain in self._learners():
            brain.store(state, action, reward, next_state, terminal, next_mask)

    async def learn(self) -> None:
        for brain in self._learners():
            await brain.learn()


# -- operator requests ----------------------------------------------------------------------------------------------


class ReplayControl(RunControl):
    """Recorded operator requests, delivered when the replayed journal reaches their seq. A run that stopped
    for a budget or by a request is stopped at the same point (`stop_at_seq`)."""

    def __init__(self, journal: ReplayJournal, relived: Relived, live: RunControl | None = None) -> None:
        super().__init__()
        self._journal = journal
        self._scheduled = {seq: _request(r) for seq, r in relived.operator.items()}
        self.stop_at_seq = relived.stop_point
        self.live = live

    def _due(self) -> list[OperatorRequest]:
        seq = self._journal.next_seq
        out = []
        while seq in self._scheduled:
            out.append(self._scheduled.pop(seq))
            seq += 1
        return out

    def pending(self) -> list[OperatorRequest]:
        if not self._journal.replaying and self.live is not None:
            requests = self.live.pending()
            self.paused, self.stop_requested, self.abort_requested = (
                self.live.paused, self.live.stop_requested, self.live.abort_requested)
            return requests
        due = self._due()
        for r in due:
            self._apply(r)
        if self.stop_at_seq is not None and self._journal.next_seq >= self.stop_at_seq and not due:
            self.stop_requested = True
        return due

    async def wait_while_paused(self) -> list[OperatorRequest]:
        out: list[OperatorRequest] = []
        while self.paused and not self.stop_requested:
            due = self._due()
            if not due:
                raise Divergence(self._journal.next_seq, "a recorded resume after the pause", "nothing")
            for r in due:
                self._apply(r)
            out.extend(due)
        return out


def _request(r: OperatorRequestRecord) -> OperatorRequest:
    return OperatorRequest(RequestKind(r.request), RequestSource(r.source), r.detail)
