"""The run's explicit state machine: states, transition table (data), guards, machine factory.

Pure: imports none of deepspm's other layers.
"""

from .diagram import mermaid
from .errors import ConcurrentTrigger, GuardRejected, IllegalTransition, MissingContext, UnknownTrigger
from .guards import GUARDS, DecisionContext
from .machine import RunMachine, RunModel, build_machine, is_legal, legal_destinations
from .states import NON_TERMINAL_STATES, TERMINAL_STATES, State
from .table import TABLE, TRIGGERS, Transition, canonical_json, table_as_records, table_hash

__all__ = [
    "GUARDS",
    "NON_TERMINAL_STATES",
    "TABLE",
    "TERMINAL_STATES",
    "TRIGGERS",
    "ConcurrentTrigger",
    "DecisionContext",
    "GuardRejected",
    "IllegalTransition",
    "MissingContext",
    "RunMachine",
    "RunModel",
    "State",
    "Transition",
    "UnknownTrigger",
    "build_machine",
    "canonical_json",
    "is_legal",
    "legal_destinations",
    "mermaid",
    "table_as_records",
    "table_hash",
]
