"""The journal's records as typed documents: one dataclass per record kind, written and read the same way.

Plans yield the decision documents and notes; the engine, the executor and the session write the others
(`Journal.write(doc)`). A document's fields are its record's keys after the journal's header (seq, t_mono,
t_wall, kind); `to_record()` gives them, leaving out optional fields (default None) that are None.

    kind        document                                   written by
    start       Start                                      the session (`Journal.start`)
    command     the `commands.Command` classes             the executor
    reply       Reply (of = the command's seq)              the executor
    failure     Failure (error type and message)            the executor
    decision    ZCheck, SampleVerdict, Classification,      plans (the `decision` field names which)
                ActionChosen, NoRoom, ResetActionChosen
    transition  TransitionRecord (`fsm` calls its rows Transition)   the engine
    operator    OperatorRequestRecord                       the engine
    note        Note                                        plans, the engine
    resume      Resume                                      `Journal(resume=True)`
    stop        Stop                                        `Journal.close`

Readers use `entry_from_record(record, schema)` -> `Entry(seq, t_mono, t_wall, doc)`: every field is checked
against its type (the journal's "nan"/"inf"/"-inf" strings become floats again), and an unknown kind, a
missing or unknown field or a value of the wrong type is a `JournalError` naming the seq and the problem.
Schema 1 journals (before the single-operation instrument commands) are read too: their composite commands
and their one-call scan become `LegacyCommand`s, everything else has the same layout.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from typing import Any, ClassVar, Union

from deepspm.controller.commands import COMMANDS, Command
from deepspm.controller.journal import SCHEMA_VERSION, JournalError, to_jsonable


@dataclass(frozen=True)
class Document:
    kind: ClassVar[str]

    def to_record(self) -> dict[str, Any]:
        """The record's fields (after the header); optional fields that are None are left out."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.default is None and getattr(self, f.name) is None)}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> typing.Self:
        """The document of a record's fields (header keys removed); ValueError naming the problem."""
        doc = _build(cls, data, f"a {cls.kind} record")
        if not isinstance(doc, cls):
            raise TypeError(f"built a {type(doc).__name__} for a {cls.__name__} record")
        return doc


# -- run bracket --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start(Document):
    """seq 0: what the run is (design.md section 7). `schema` is the record layout's version."""

    kind = "start"
    schema: int = SCHEMA_VERSION
    run_id: str | None = None
    config: dict[str, Any] | None = None  # `config_to_dict` of the resolved config
    seed: int | None = None
    versions: dict[str, str] | None = None
    fsm_table: list[Any] | None = None
    fsm_hash: str | None = None
    checkpoints: dict[str, str] | None = None  # content ids of the nets
    checkpoint_paths: dict[str, str] | None = None
    instrument: dict[str, Any] | None = None
    argv: list[str] | None = None
    failed_before_start: bool | None = None  # written only by a session that failed before its loop started


@dataclass(frozen=True)
class Resume(Document):
    """A killed or stopped run continues: what was found, and the run time the earlier processes spent."""

    kind = "resume"
    previous_seq: int
    previous_kind: str
    torn_bytes: int
    removed_temp_files: list[str]
    time_spent_s: float


@dataclass(frozen=True)
class Stop(Document):
    """The last record of a process: exit status and reason, and the loop's own counters if it ran."""

    kind = "stop"
    status: str
    reason: str = ""
    counters: dict[str, Any] | None = None
    final_state: str | None = None
    saved: dict[str, str] | None = None  # nets this process saved (run directory relative paths), by name


# -- the instrument ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply(Document):
    """The result of the command at seq `of` (`executor.result_to_record`), and its digest."""

    kind = "reply"
    of: int
    op: str
    result: Any
    digest: str

    @property
    def frame(self) -> str | None:
        """The frame reference of a reply that carries a frame."""
        r = self.result
        return r.get("frame") if isinstance(r, dict) and r.get("type") == "Frame" else None


@dataclass(frozen=True)
class Failure(Document):
    """The command at seq `of` failed: the error's type name, message and attributes (those JSON can hold), so a
    replay raises the same error with the same fields."""

    kind = "failure"
    of: int
    op: str
    error: str
    message: str
    digest: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LegacyCommand(Document):
    """A schema-1 command this version has no class for (the composite approach, set_z_extension,
    retract_after_crash, move_area, and the one-call scan); read only."""

    kind = "command"
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"op": self.op, **self.args}


LEGACY_OPS = frozenset({"approach", "set_z_extension", "retract_after_crash", "move_area", "scan"})


# -- the run's decisions ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision(Document):
    """A decision of the run: `name` is the record's `decision` field."""

    kind = "decision"
    name: ClassVar[str]

    def to_record(self) -> dict[str, Any]:
        return {"decision": self.name, **super().to_record()}


@dataclass(frozen=True)
class LineJudgement(Decision):
    """The line-window net's p(good) for a frame's first `lines` scan lines, judged while it is scanned;
    `abort` when it stopped the scan early (a confident bad probe)."""

    name = "lines"
    frame: str  # the partial frame grabbed (its content hash in frames/)
    lines: int
    p_good: float
    abort: bool = False


@dataclass(frozen=True)
class ZCheck(Decision):
    """Lost contact or crash, judged from the z extension after a scan."""

    name = "z_check"
    extension: float
    verdict: str  # "contact_lost" or "crashed"


@dataclass(frozen=True)
class SampleVerdict(Decision):
    """A frame failed the roughness rule: its region (radius `radius_m`) is forbidden."""

    name = "sample"
    frame: str
    verdict: str
    radius_m: float


@dataclass(frozen=True)
class Classification(Decision):
    """A judged frame: p(good), what the episode logic made of it, and the trigger fired.

    With a target state other than "good" (`[probe] target_state`, issue 12 part 4) `target` names it, and
    `p_good` / `good` are p(target) and "in the target state" (what the episode logic compared). A record without
    `target` (every journal before it) is about "good"."""

    name = "classify"
    frame: str
    ransac_seed: int
    p_good: float
    good: bool
    classifier: str
    trigger: str
    context: dict[str, Any]
    bad_probe_count: int
    in_episode: bool
    episode: int
    episode_started: bool
    episode_ended: bool
    reward: float | None
    free_side_m: float
    episode_truncated: bool = False
    episode_actions: int = 0
    labels: list[list[Any]] = field(default_factory=list)  # [frame ref, good image?] decided by this frame
    sxm: str | None = None  # the frame's .sxm file, relative to the run directory (written by the engine)
    lines: int | None = None  # an early-aborted frame: judged on this many scanned lines (by the line-window net)
    changed_at_line: int | None = None  # the line-window judgement changed (good <-> bad) after this many lines
    target: str | None = None  # the tip state judged (None: "good", as in journals before target states)


@dataclass(frozen=True)
class ActionChosen(Decision):
    """The agent's choice of a conditioning action for `frame`."""

    name = "action"
    frame: str
    action: int
    q_values: list[float]
    mask: list[bool]
    epsilon: float
    explored: bool
    agent: str
    site_xy_m: list[float]
    free_side_m: float
    target: str | None = None  # the tip state the episode aims for (None: "good")


@dataclass(frozen=True)
class NoRoom(Decision):
    """No allowed action fits the free area of `frame`."""

    name = "action"
    frame: str
    verdict: str = "no_room"


@dataclass(frozen=True)
class ResetActionChosen(Decision):
    """Training: a random reset action that damages a good probe."""

    name = "reset_action"
    frame: str
    action: int


DECISIONS: tuple[type[Decision], ...] = (
    LineJudgement, ZCheck, SampleVerdict, Classification, ActionChosen, NoRoom, ResetActionChosen,
)


# -- the engine and the operator ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransitionRecord(Document):
    """An FSM trigger taken, from `source` to `dest` (state names)."""

    kind = "transition"
    trigger: str
    source: str
    dest: str


@dataclass(frozen=True)
class OperatorRequestRecord(Document):
    """An operator request (`runcontrol.RequestKind` value) and where it came from."""

    kind = "operator"
    request: str
    source: str
    detail: str = ""


@dataclass(frozen=True)
class Note(Document):
    """Something a person reading the journal should know (a fault, an action with unknown outcome); `data`
    holds further fields of the record."""

    kind = "note"
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"message": self.message, **self.data}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Note:
        rest = dict(data)
        message = rest.pop("message", None)
        if not isinstance(message, str):
            raise ValueError("a note needs a message (a string)")
        return cls(message, rest)


Written = Document | Command  # what `Journal.write` takes


def record_kind(doc: Written) -> str:
    """The record kind a document is written as."""
    return "command" if isinstance(doc, Command) else doc.kind


def record_of(doc: Written) -> dict[str, Any]:
    """A document's record fields, as plain JSON types (what a reader gets back)."""
    return to_jsonable(doc.to_record())


# -- reading -------------------------------------------------------------------------------------------------------

HEADER = ("seq", "t_mono", "t_wall", "kind")
_BY_KIND: dict[str, type[Document]] = {
    c.kind: c for c in (Start, Resume, Stop, Reply, Failure, TransitionRecord, OperatorRequestRecord, Note)
}


@dataclass(frozen=True)
class Entry:
    """One journal record: its header and its typed document."""

    seq: int
    t_mono: float
    t_wall: float
    doc: Written

    @property
    def kind(self) -> str:
        return record_kind(self.doc)


def entry_from_record(record: dict[str, Any], schema: int = SCHEMA_VERSION) -> Entry:
    """The typed entry of one journal record of a journal with layout version `schema`."""
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise JournalError(f"a record without a valid seq ({seq!r}): {_short(record)}")
    for key in ("t_mono", "t_wall"):
        value = record.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise JournalError(f"seq {seq}: {key} is {value!r}, not a number")
    data = {k: v for k, v in record.items() if k not in HEADER}
    try:
        doc = _document(record.get("kind"), data, schema)
    except ValueError as e:
        raise JournalError(f"seq {seq}: {e}") from None
    return Entry(seq, float(record["t_mono"]), float(record["t_wall"]), doc)


def _document(kind: Any, data: dict[str, Any], schema: int) -> Written:
    if schema < 1 or schema > SCHEMA_VERSION:
        raise ValueError(f"journal schema {schema} is not one this version reads (1..{SCHEMA_VERSION})")
    if kind == "command":
        op = data.get("op")
        args = {k: v for k, v in data.items() if k != "op"}
        if schema == 1 and op in LEGACY_OPS:
            return LegacyCommand(str(op), args)
        command_cls = COMMANDS.get(op) if isinstance(op, str) else None
        if command_cls is None:
            raise ValueError(f"a command record with the unknown op {op!r}")
        return _build(command_cls, args, f"a {op} command")
    if kind == "decision":
        name = data.get("decision")
        args = {k: v for k, v in data.items() if k != "decision"}
        candidates = [c for c in DECISIONS if c.name == name]
        if not candidates:
            raise ValueError(f"a decision record of the unknown decision {name!r}")
        if name == "action":  # one decision name, two layouts
            candidates = [NoRoom if args.get("verdict") == "no_room" else ActionChosen]
        return _build(candidates[0], args, f"a {name} decision")
    cls = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"a record of the unknown kind {kind!r}")
    if cls is Start and "schema" not in data:
        raise ValueError("the start record has no schema version")
    if cls is Note:
        return Note.from_record(data)
    return _build(cls, data, f"a {kind} record")


# -- field checks ----------------------------------------------------------------------------------------------------


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict[str, Any], what: str | None = None) -> Any:
    what = what or f"a {cls.__name__}"
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown}")
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{what} lacks the fields {missing}")
    hints = _hints(cls)
    values = {}
    for name, value in data.items():
        try:
            values[name] = _checked(value, hints[name])
        except TypeError as e:
            raise ValueError(f"{what}: field {name!r} {e}") from None
    return cls(**values)


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _checked(value: Any, hint: Any) -> Any:
    """`value` if it has the type `hint` (non-finite float strings become floats); TypeError if not."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _checked(value, option)
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(" or ".join(errors) if len(errors) == 1 else f"is {_short(value)}, not {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value in _NON_FINITE:
            return _NON_FINITE[value]
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(hint) or (Any,)
            return [_checked(v, item) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"has a type this reader does not check ({hint})")
    name = getattr(hint, "__name__", str(hint))
    raise TypeError(f"should be {name}, not {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
