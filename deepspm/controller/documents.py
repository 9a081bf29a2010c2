"""The run's decisions as typed journal documents.

Plans yield these; an engine journals each one as it is (`kind` and `to_record()`), and readers rebuild
them with `decision_from_record`. The record layout is the journal's: a document's fields are the record's
keys, and `decision` names the kind of decision.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class Document:
    kind: ClassVar[str]

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision(Document):
    """A decision of the run: `name` is the record's `decision` field."""

    kind = "decision"
    name: ClassVar[str]

    def to_record(self) -> dict[str, Any]:
        return {"decision": self.name, **asdict(self)}


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
    """A judged frame: p(good), what the episode logic made of it, and the trigger fired."""

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


@dataclass(frozen=True)
class Note(Document):
    """Something a person reading the journal should know (a fault, an action with unknown outcome)."""

    kind = "note"
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"message": self.message, **self.data}


DECISIONS: tuple[type[Decision], ...] = (ZCheck, SampleVerdict, Classification, ActionChosen, NoRoom, ResetActionChosen)


def decision_from_record(record: dict[str, Any]) -> Decision:
    """The typed decision of a journal record (header keys are ignored; ValueError for an unknown layout)."""
    name = record.get("decision")
    for cls in DECISIONS:
        if cls.name != name:
            continue
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if required <= set(record) and (cls is NoRoom) == (record.get("verdict") == "no_room"):
            return cls(**{k: v for k, v in record.items() if k in names})
    raise ValueError(f"no decision of kind {name!r} with the fields {sorted(record)}")
