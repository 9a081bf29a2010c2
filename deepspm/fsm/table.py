"""The transition table of design.md section 4, as data.

The machine, the legality check used by replay, the Mermaid diagram and the journal's start record
are all generated from `TABLE`, so they cannot disagree. Row order matters only where a trigger has
several rows from one source; those rows carry complementary guards (see `guards`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .states import NON_TERMINAL_STATES, State

S = State


@dataclass(frozen=True)
class Transition:
    """One row: `trigger` moves any of `sources` to `dest` when `guard` (a name in GUARDS) holds."""

    trigger: str
    sources: tuple[State, ...]
    dest: State
    guard: str | None
    note: str

    def as_record(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger,
            "sources": [s.value for s in self.sources],
            "dest": self.dest.value,
            "guard": self.guard,
            "note": self.note,
        }


TABLE: tuple[Transition, ...] = (
    Transition("start", (S.idle,), S.approaching, None, "begin the run with a coarse approach"),
    Transition("approached", (S.approaching,), S.settling, None, "z piezo set to ~80 % extension"),
    Transition("settled", (S.settling,), S.selecting, None, "after the settle time (default 120 s; 0 in tests)"),
    Transition("region_selected", (S.selecting,), S.scanning, None, "planner found a free region in this approach area"),
    Transition("area_exhausted", (S.selecting,), S.moving, None, "piezo range full, or next region > 500 nm away"),
    Transition("moved", (S.moving,), S.approaching, None, "coarse move to a new approach area done"),
    Transition("frame_recorded", (S.scanning,), S.classifying, None, "creep frame discarded, real frame recorded"),
    Transition("scan_aborted", (S.scanning,), S.classifying, None, "line-window net sure the probe is bad: scan stopped"),
    Transition("contact_lost", (S.scanning, S.classifying), S.recovering, None, "z extension beyond the lost-contact threshold"),
    Transition("crashed", (S.scanning, S.classifying), S.recovering, None, "z retraction beyond the crash threshold"),
    Transition("recovered", (S.recovering,), S.scanning, None, "re-approach / retract done; rescan the same position"),
    Transition("sample_bad", (S.classifying,), S.selecting, None, "roughness rule; forbidden radius sqrt(t) x 25 nm"),
    Transition("probe_good", (S.classifying,), S.selecting, "operation_mode",
               "probe in the target state (default good); bad counter := 0; ends an episode (+10)"),
    Transition("probe_good", (S.classifying,), S.resetting, "training_mode",
               "probe in the target state: damage it with random actions until p(target) < 0.1"),
    Transition("probe_bad", (S.classifying,), S.selecting, "still_counting",
               "probe not in the target state; counter < threshold and not in an episode"),
    Transition("probe_bad", (S.classifying,), S.conditioning, "episode_starts",
               "probe not in the target state; counter reaches the threshold, or already in an episode"),
    Transition("conditioned", (S.conditioning,), S.selecting, None, "action executed (reward -1); its area is forbidden"),
    Transition("no_room", (S.conditioning,), S.selecting, None, "no allowed action fits the free area of this image"),
    Transition("reset_continues", (S.classifying,), S.resetting, None,
               "reset phase: p(target) >= 0.1; another random reset action"),
    Transition("reset_over", (S.classifying,), S.selecting, None,
               "reset phase over (p(target) < 0.1 or 5 actions); next frame opens an episode"),
    Transition("reset_done", (S.resetting,), S.selecting, None, "reset action executed; scan a new region"),
    Transition("stop", NON_TERMINAL_STATES, S.stopped, None, "operator or run control stop, at a safe point"),
    Transition("fail", tuple(s for s in State if s is not S.fault), S.fault, None, "unrecoverable; tip withdrawn first"),
)

TRIGGERS: tuple[str, ...] = tuple(dict.fromkeys(row.trigger for row in TABLE))


def rows_for(trigger: str, source: State, table: tuple[Transition, ...] = TABLE) -> tuple[Transition, ...]:
    """The rows `trigger` may take from `source`, in table order (the order the machine tries them)."""
    return tuple(row for row in table if row.trigger == trigger and source in row.sources)


def table_as_records(table: tuple[Transition, ...] = TABLE) -> list[dict[str, Any]]:
    """The table as JSON-serialisable records (journaled in the run's start record)."""
    return [row.as_record() for row in table]


def canonical_json(records: list[dict[str, Any]]) -> str:
    """One canonical text for a list of records: sorted keys, no whitespace, ASCII."""
    return json.dumps(records, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def table_hash(table: tuple[Transition, ...] = TABLE) -> str:
    """sha256 (hex) of the canonical JSON of `table_as_records(table)`.

    Replay can recompute it from the journaled records with `canonical_json` alone.
    """
    return hashlib.sha256(canonical_json(table_as_records(table)).encode("ascii")).hexdigest()
