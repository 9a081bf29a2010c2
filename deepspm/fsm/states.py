"""The run's states (design.md section 4).

A `str` Enum so a state journals as its plain name (`"classifying"`) and compares equal to it.
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    idle = "idle"
    approaching = "approaching"
    settling = "settling"
    selecting = "selecting"
    scanning = "scanning"
    classifying = "classifying"
    conditioning = "conditioning"
    resetting = "resetting"
    moving = "moving"
    recovering = "recovering"
    stopped = "stopped"
    fault = "fault"

    @property
    def terminal(self) -> bool:
        """A run ends here: the controller loop stops firing triggers."""
        return self in TERMINAL_STATES

    def __str__(self) -> str:
        return self.value


TERMINAL_STATES: frozenset[State] = frozenset({State.stopped, State.fault})
NON_TERMINAL_STATES: tuple[State, ...] = tuple(s for s in State if s not in TERMINAL_STATES)
